"""Paper scale (docs/design.md §7): Llama-2-7B + MAGNET with LoRA r=16 on Wikitext-103 raw text, bf16, FSDP2 over all
GPUs, activation checkpointing. Run with
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py --init_from=/path/to/llama-2-7b \
        --tokenizer=/path/to/tokenizer.model --data=/path/to/wikitext-103-raw/wiki.train.raw
(Meta's download keeps tokenizer.model beside the llama-2-7b directory, not in it.) batch_size is rows per micro-step over all GPUs (8 x 4);
with grad_accum = 4 a step sees 128 rows of 513 tokens. FSDP2 with a bf16 base under fp32 adapters needs torch >= 2.8.
SSCL positives: Wikitext has no pairs, so a passage's positive is itself under SimCSE noise, attention dropout 0.3
(LLM2Vec's Llama-2 SimCSE value) in the SSCL forward only; --pairs=FILE gives paraphrase / entailment positives.
The merged export is float32 (27 GB): folding the adapter into bf16 weights would round most of it away. Evaluate
with --ckpt=llama-2-7b::out-llama2-7b/adapter.pt (base and adapter apart, both
bf16 on a GPU: the adapter's own matrices rounded, not the update against the weight) or the float32 merge."""
out_dir = "out-llama2-7b"
init_from = "llama-2-7b"
data = "wikitext-103-raw/wiki.train.raw"
seq_len = 512
sscl_len = 64
batch_size = 32
grad_accum = 4
lora_rank = 16
lora_alpha = 32.0
lora_dropout = 0.05
max_iters = 1000
warmup_iters = 50
lr = 2e-4
min_lr = 2e-5
activation_checkpointing = True
ckpt_interval = 200
demo = False
sscl_dropout = 0.3
merged_dtype = "float32"
