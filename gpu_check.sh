#!/usr/bin/env bash
# The GPU checks, prepared as one run for the rare session with a GPU (docs/performance.md, "GPU"):
#     bash gpu_check.sh [OUT]          # OUT: where the results go (default results/gpu)
#   1. one MAGNET step at Llama-2-7B shape, random weights: bf16 base, fp32 adapters under autocast, activation
#      checkpointing (bench.py --bench=magnet): tokens/s, peak memory, MFU against the measured bf16 matmul peak
#   2. the issue's view-A LoRA step here vs HF transformers + PEFT, fp32 on the GPU (bench.py --bench=vs_hf)
#   3. train.py under torchrun at Llama-2-7B shape: 5 steps on the toy world, checkpointed. One process, sharded by
#      FSDP2 all the same (nccl, bf16 MixedPrecisionPolicy): the multi-GPU path, on one GPU
#   4. the same at 7B width with 4 layers: stopped after 2 steps, resumed (DCP load), finished and exported (gather)
#   5. train.py as one plain process (no torchrun: bf16 autocast, no FSDP) at 7B width, 4 layers: 3 steps
# Every check runs even when one before it fails; the script then exits non-zero and names the failures.
# Each check's whole output (warnings included) is in OUT/*.log; the training logs, one line per step, in OUT/*.md.
# A smoke run of this script on a CPU, at tiny shapes: DEVICE=cpu QUICK=1 bash gpu_check.sh /tmp/gpu_check
# (SKIP_HF=1 leaves out check 2, which needs transformers and peft.)
# (python -m torch.distributed.run is torchrun; the training runs go under $RUN_DIR, outside OUT.)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-results/gpu}
device=${DEVICE:-cuda}
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick=true); shape=(--dim=64 --n_layers=2 --n_heads=4 --multiple_of=32)
else quick=(); shape=(--dim=4096 --n_layers=32 --n_heads=32 --multiple_of=256); fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)  # GPU images may have only python3
{ date -u; git rev-parse --short HEAD 2>/dev/null || echo "commit unknown (no git repository here)"; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch; print('torch', torch.__version__)"; } | tee "$out/machine.txt"

failed=()
check() {  # check TITLE LOG COMMAND...: one check, its output shown and kept in $out/LOG; a failure does not stop
    local title=$1 log=$2; shift 2  # the checks after it
    echo "[$SECONDS s] $title"
    if ! "$@" 2>&1 | tee "$out/$log"; then echo "[$SECONDS s] FAILED: $title"; failed+=("$title"); fi
}
summary() {  # the training log of run directory $1, one line per step
    "$py" - "$1/log.jsonl" <<'PY'
import json, sys
for s in map(json.loads, open(sys.argv[1])):
    print(f"  step {s['step']}: total loss {s['total']:.3f}, grad norm {s['grad_norm']:.3f}, {s['tokens_per_s']:,.0f} tokens/s")
PY
}
run=${RUN_DIR:-/tmp/magnet_gpu_check}  # training runs: the toy world's tokenizer and corpus; random weights
toy=(config/llama2_7b.py --init_from=scratch --pretrain_iters=0 --max_seq_len=1024 --data=toy --batch_size=4
     --grad_accum=1 --device="$device" --overwrite=true "${shape[@]}")
torchrun=("$py" -m torch.distributed.run --standalone --nproc_per_node=1 train.py)

check "1. one MAGNET step at Llama-2-7B shape" bench_7b.log \
    "$py" bench.py --bench=magnet --device="$device" --dtype=bfloat16 --dim=4096 --n_layers=32 --heads=32 --batch=8 \
    --seq=512 --checkpoint_activations=true "${quick[@]}" --out="$out/bench_7b.json" --overwrite=true
if [ "${SKIP_HF:-0}" = 1 ]; then echo "[$SECONDS s] 2. skipped (SKIP_HF=1: no transformers + peft here)"
else check "2. the view-A LoRA step against HF + PEFT" bench_vs_hf.log \
    "$py" bench.py --bench=vs_hf --device="$device" "${quick[@]}" --out="$out/bench_vs_hf.json" --overwrite=true; fi
check "3. train.py under torchrun (FSDP2, one process) at Llama-2-7B shape, batch 4 x 513 + SSCL views" train_7b.log \
    "${torchrun[@]}" "${toy[@]}" --max_iters=10 --stop_at=5 --ckpt_interval=5 --out_dir="$run/fsdp"
check "   its log" train_7b.md summary "$run/fsdp"
check "4. the same at 7B width, 4 layers: 2 steps, stop" train_resume.log \
    "${torchrun[@]}" "${toy[@]}" --n_layers=4 --max_iters=4 --stop_at=2 --ckpt_interval=2 --out_dir="$run/resume"
check "   resumed: steps 2-3, then the gathered export" train_resumed.log \
    "${torchrun[@]}" "${toy[@]}" --n_layers=4 --max_iters=4 --resume=true --demo=false --out_dir="$run/resume"
check "   its log" train_resume.md summary "$run/resume"
check "5. train.py as one plain process (autocast) at 7B width, 4 layers" train_plain.log \
    "$py" train.py "${toy[@]}" --n_layers=4 --max_iters=10 --stop_at=3 --ckpt_interval=3 --out_dir="$run/plain"
check "   its log" train_plain.md summary "$run/plain"

if [ ${#failed[@]} -gt 0 ]; then echo "[$SECONDS s] FAILED:"; printf '  %s\n' "${failed[@]}"; exit 1; fi
echo "[$SECONDS s] done, every check passed: $out"
