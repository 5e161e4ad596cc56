#!/usr/bin/env bash
# Issue 12's GPU checks, prepared as one run for the rare session with a GPU (README "GPU"):
#     bash gpu_check.sh [OUT]          # OUT: where the results go (default results/gpu)
#   1. one MAGNET step at Llama-2-7B shape, random weights: bf16 base, fp32 adapters under autocast, activation
#      checkpointing (bench.py --bench=magnet): tokens/s, peak memory, MFU against the measured bf16 matmul peak
#   2. the issue's view-A LoRA step here vs HF transformers + PEFT, fp32 on the GPU (bench.py --bench=vs_hf)
#   3. train.py under torchrun at Llama-2-7B shape: 5 steps on the toy world, checkpointed (the CUDA training path)
# A smoke run of this script on a CPU, at tiny shapes: DEVICE=cpu QUICK=1 bash gpu_check.sh /tmp/gpu_check
# (python -m torch.distributed.run is torchrun; the training run's directory is $RUN_DIR, outside OUT.)
set -euo pipefail
cd "$(dirname "$0")"
out=${1:-results/gpu}
device=${DEVICE:-cuda}
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); shape=(--dim=64 --n_layers=2 --n_heads=4 --multiple_of=32)
else quick=(); shape=(--dim=4096 --n_layers=32 --n_heads=32 --multiple_of=256); fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)  # GPU images may have only python3
{ date -u; git rev-parse --short HEAD 2>/dev/null || echo "commit unknown (no git repository here)"; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch; print('torch', torch.__version__)"; } | tee "$out/machine.txt"

echo "[$SECONDS s] 1. one MAGNET step at Llama-2-7B shape"
"$py" bench.py --bench=magnet --device="$device" --dtype=bfloat16 --dim=4096 --n_layers=32 --heads=32 --batch=8 \
    --seq=512 --checkpoint_activations "${quick[@]}" --out "$out/bench_7b.json" | tee "$out/bench_7b.md"
echo "[$SECONDS s] 2. the view-A LoRA step against HF + PEFT"
"$py" bench.py --bench=vs_hf --device="$device" "${quick[@]}" --out "$out/bench_vs_hf.json" | tee "$out/bench_vs_hf.md"

echo "[$SECONDS s] 3. train.py under torchrun at Llama-2-7B shape"
run=${RUN_DIR:-/tmp/magnet_gpu_check}  # the toy world's tokenizer and corpus; random weights, no pretraining
"$py" -m torch.distributed.run --standalone --nproc_per_node=1 train.py config/llama2_7b.py --init_from=scratch --pretrain_iters=0 \
    "${shape[@]}" --max_seq_len=1024 --data=toy --batch_size=4 --grad_accum=1 --max_iters=10 --stop_at=5 --ckpt_interval=5 \
    --device="$device" --out_dir="$run" --overwrite=true
"$py" - "$run/log.jsonl" <<'PY' | tee "$out/train_7b.md"
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
print("train.py, Llama-2-7B shape, toy world, batch 4 x 513 (view A) + SSCL views:")
for s in steps:
    print(f"  step {s['step']}: total loss {s['total']:.3f}, grad norm {s['grad_norm']:.3f}, {s['tokens_per_s']:,.0f} tokens/s")
PY
echo "[$SECONDS s] done: $out"
