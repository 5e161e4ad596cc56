#!/usr/bin/env bash
# Reproduce RESULTS.md's tables. Usage:  bash experiments.sh A | B | C | C_ablations | C_seeds
#   A: base = a causal model pretrained here on the toy world; adaptation and evaluation on the toy world.
#   B: base = the real stories260K; adaptation on TinyStories text (its last 5% of stories held out for evaluation);
#      STS-B test, CoNLL-2003, held-out TinyStories. Needs ../shared (or MAGNET_SHARED).
#   C: base = the real SmolLM2-135M-Instruct (converted from ../shared's GGUF); adaptation on WikiText-2 text with
#      SNLI entailment pairs as SSCL positives; LLM2Vec as published (MNTP, then supervised SimCSE); full STS-B test.
#   C_ablations: C's magnet with one loss weight 0 (no_msg, no_sscl, no_mntp), evaluated as C's models.
#   C_seeds: C's magnet and llm2vec retrained with --seed=1 and 2, held-out PPL and STS-B.
# Every model is evaluated on the same data with the same settings. Checkpoints go to runs/ (not committed); the
# JSON results and markdown tables go to results/.
set -euo pipefail
cd "$(dirname "$0")"
setting=${1:?usage: bash experiments.sh A|B|C|C_ablations|C_seeds}
case $setting in A | B | C | C_ablations | C_seeds) ;;
    *) echo "unknown setting $setting (expected A, B, C, C_ablations or C_seeds)" >&2; exit 2 ;; esac
runs=runs/$setting
mkdir -p results "$runs"
start=$(date +%s)
train() { python train.py --seed=0 "$@" --demo=false --overwrite=true; }  # a --seed passed in comes later: it wins

if [ "$setting" = A ]; then
    train config/pretrain_toy.py --out_dir="$runs/base"
    base=$runs/base/merged
    common=(--init_from="$base")
    eval_args=(--tokenizer="$base/tokenizer.model" --suite=ppl,infill,repetition,sts,token,mc --limit=200)
elif [ "$setting" = B ]; then
    shared=${MAGNET_SHARED:-../shared}
    base=$shared/assets/stories260K/stories260K.bin
    tok=$shared/assets/stories260K/tok512.model
    common=(config/stories260k.py --init_from="$base" --tokenizer="$tok" --data="$shared/data/tinystories/tinystories.txt")
    eval_args=(--tokenizer="$tok" --suite=ppl,infill,repetition,sts,token --limit=500
               --text_data="$shared/data/tinystories/tinystories.txt" --sts_data="$shared/data/stsb/sts-test.csv"
               --token_data="$shared/data/conll2003")
else
    # Setting C comes in three parts, each a few hours on a 2-core CPU; all three share one converted base
    shared=${MAGNET_SHARED:-../shared}
    base=runs/C/smollm2
    [ -f "$base/params.json" ] || python convert.py "$shared/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$base"
    common=(config/smollm2.py --init_from="$base" --tokenizer="$base/tokenizer.json"
            --data="$shared/data/wikitext2/valid.txt" --pairs="$shared/data/snli/entailment_pairs.tsv")
    # evaluation: generation-side suites on held-out WikiText; encoders on the full STS-B test and CoNLL-2003 (probe
    # trained on 2000 train sentences, early-stopped on the full dev split, tested on the full test split)
    data=(--tokenizer="$base/tokenizer.json" --text_data="$shared/data/wikitext2/valid.txt"
          --sts_data="$shared/data/stsb/sts-test.csv" --token_data="$shared/data/conll2003" --seed=0 --overwrite=true)
    # evaluate PREFIX CKPT...: the text and infill suites of these checkpoints, into results/setting_c_PREFIXtext.json
    # and results/setting_c_PREFIXinfill.json
    evaluate() {
        local prefix=$1; shift
        python eval.py "$@" "${data[@]}" --suite=ppl,repetition --limit=60 \
            --out="results/setting_c_${prefix}text.json" | tee "results/setting_c_${prefix}text.md"
        # infilling: gap perplexity, and blanks of 1-8 tokens filled told their length and not told it
        python eval.py "$@" "${data[@]}" --suite=infill --limit=60 \
            --out="results/setting_c_${prefix}infill.json" | tee "results/setting_c_${prefix}infill.md"
    }
fi
if [ "$setting" = C ]; then  # the base, MAGNET, magnet_paper and LLM2Vec
    train "${common[@]}" --out_dir="$runs/magnet"
    # LLM2Vec as published: MNTP alone (all bidirectional), merged; then supervised SimCSE (mean pooling) on top
    train "${common[@]}" --max_spans=0 --p_causal=0.0 --w_msg=0.0 --w_sscl=0.0 --out_dir="$runs/llm2vec_mntp"
    train "${common[@]}" --init_from="$runs/llm2vec_mntp/merged" --w_mntp=0.0 --w_msg=0.0 --pooling=mean \
        --out_dir="$runs/llm2vec"
    train "${common[@]}" --p_causal=0.0 --out_dir="$runs/magnet_paper"
    adapted=(--ckpt=magnet="$base::$runs/magnet/adapter.pt" --ckpt=magnet_paper="$base::$runs/magnet_paper/adapter.pt"
             --ckpt=llm2vec="$runs/llm2vec_mntp/merged::$runs/llm2vec/adapter.pt")
    evaluate "" --ckpt=base="$base" "${adapted[@]}"
    # the base is read causally (its training) and bidirectionally (MAGNET's way); its four encoder settings on STS-B
    python eval.py --ckpt=base_causal="$base#attention=causal,pooling=mean" --ckpt=base_bidirectional="$base" \
        "${adapted[@]}" "${data[@]}" --suite=sts,token --limit=0 --probe_train=2000 \
        --out=results/setting_c_encode.json | tee results/setting_c_encode.md
    python eval.py "${data[@]}" --suite=sts --limit=0 --out=results/setting_c_base_pooling.json \
        --ckpt=causal_last="$base#attention=causal,pooling=last" --ckpt=causal_mean="$base#attention=causal,pooling=mean" \
        --ckpt=bidirectional_last="$base#pooling=last" --ckpt=bidirectional_mean="$base#pooling=mean" \
        | tee results/setting_c_base_pooling.md
    echo "setting C: $(( $(date +%s) - start )) s wall time on $(nproc) CPU cores" | tee -a results/setting_c_text.md
elif [ "$setting" = C_ablations ]; then  # MAGNET with one loss weight 0, everything else as C's magnet
    ablations=()
    for loss in msg sscl mntp; do
        train "${common[@]}" --w_$loss=0.0 --out_dir="$runs/no_$loss"
        ablations+=(--ckpt="no_$loss=$base::$runs/no_$loss/adapter.pt")
    done
    evaluate ablations_ "${ablations[@]}"
    python eval.py "${ablations[@]}" "${data[@]}" --suite=sts,token --limit=0 --probe_train=2000 \
        --out=results/setting_c_ablations_encode.json | tee results/setting_c_ablations_encode.md
    echo "setting C_ablations: $(( $(date +%s) - start )) s wall time on $(nproc) CPU cores" \
        | tee -a results/setting_c_ablations_text.md
elif [ "$setting" = C_seeds ]; then
    for seed in 1 2; do  # as C's magnet and llm2vec (both stages), another seed: data order, LoRA init, masks
        train "${common[@]}" --seed=$seed --out_dir="$runs/magnet_s$seed"
        train "${common[@]}" --seed=$seed --max_spans=0 --p_causal=0.0 --w_msg=0.0 --w_sscl=0.0 \
            --out_dir="$runs/llm2vec_mntp_s$seed"
        train "${common[@]}" --seed=$seed --init_from="$runs/llm2vec_mntp_s$seed/merged" --w_mntp=0.0 --w_msg=0.0 \
            --pooling=mean --out_dir="$runs/llm2vec_s$seed"
        python eval.py --ckpt=magnet_s$seed="$base::$runs/magnet_s$seed/adapter.pt" \
            --ckpt=llm2vec_s$seed="$runs/llm2vec_mntp_s$seed/merged::$runs/llm2vec_s$seed/adapter.pt" \
            "${data[@]}" --suite=sts,ppl --limit=0 --out=results/setting_c_seed$seed.json \
            | tee results/setting_c_seed$seed.md
    done
fi
if [[ $setting == C* ]]; then exit; fi

# the adapted models: MAGNET, joint MNTP+SSCL (all-bidirectional, no MSG: LLM2Vec's two losses trained together,
# not its published two-stage recipe), and MAGNET's ablations
train "${common[@]}" --out_dir="$runs/magnet"
train "${common[@]}" --max_spans=0 --p_causal=0.0 --w_msg=0.0 --out_dir="$runs/mntp_sscl"
train "${common[@]}" --w_msg=0.0 --out_dir="$runs/no_msg"
train "${common[@]}" --w_sscl=0.0 --out_dir="$runs/no_sscl"
train "${common[@]}" --w_mntp=0.0 --out_dir="$runs/no_mntp"
train "${common[@]}" --p_causal=0.0 --out_dir="$runs/p_causal_0"

ckpts=(--ckpt=base="$base")
for run in magnet mntp_sscl no_msg no_sscl no_mntp p_causal_0; do
    ckpts+=(--ckpt="$run=$base::$runs/$run/adapter.pt")
done
out=results/setting_$(echo "$setting" | tr A-Z a-z)
previous=$runs/previous.json  # the committed results, to compare with
if [ -f "$out.json" ]; then cp "$out.json" "$previous"; else rm -f "$previous"; fi
python eval.py "${ckpts[@]}" "${eval_args[@]}" --seed=0 --out="$out.json" --overwrite=true | tee "$out.md"
echo "setting $setting: $(( $(date +%s) - start )) s wall time on $(nproc) CPU cores" | tee -a "$out.md"
if [ -f "$previous" ]; then  # deterministic on a CPU: every number must come out the same
    python - "$previous" "$out.json" <<'PY'
import json, sys
old, new = (json.load(open(path))["results"] for path in sys.argv[1:])
differ = [(m, s, k, old.get(m, {}).get(s, {}).get(k), v) for m in new for s in new[m] for k, v in new[m][s].items()
          if old.get(m, {}).get(s, {}).get(k) != v]
print("reproduced the previous results exactly" if not differ and old.keys() == new.keys() else
      f"differs from the previous results ({len(differ)} values), e.g. {differ[:3]}")
PY
fi
