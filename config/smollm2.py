"""Setting C: MAGNET on a real 135M-parameter LM, SmolLM2-135M-Instruct, on a laptop CPU (bash experiments.sh C).
Convert the base first:  python convert.py ../shared/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf runs/C/smollm2
View A text: WikiText-2's validation split (Wikipedia, as the paper's Wikitext-103); its last 5% of paragraphs are
held out for evaluation. SSCL positives: 6,697 SNLI premise -> entailed-hypothesis pairs (supervised SimCSE), so no
SimCSE noise. LoRA r=16 as the paper. Sized to fit about 15 minutes per variant on 2 CPU cores (SmolLM2 trains at ~180 tokens/s there):
8 rows of 129 tokens + 8 SSCL pairs of up to 48 tokens per step, 120 steps. lr as Setting B (a short LoRA run)."""
out_dir = "out-smollm2"
init_from = "runs/C/smollm2"
tokenizer = "runs/C/smollm2/tokenizer.json"
data = "../shared/data/wikitext2/valid.txt"
pairs = "../shared/data/snli/entailment_pairs.tsv"
seq_len = 128
batch_size = 8
sscl_len = 48
max_iters = 120
warmup_iters = 20
lr = 1e-3
min_lr = 1e-4
lora_rank = 16
lora_alpha = 32.0
ckpt_interval = 40
