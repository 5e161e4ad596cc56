"""Adapt the real pretrained stories260K (Karpathy's tiny TinyStories Llama) with MAGNET on TinyStories text.
The defaults point at ../shared; override them with --init_from=, --tokenizer=, --data=.
SSCL positives: TinyStories has no paraphrase pairs, so a passage's positive is the same passage under SimCSE noise:
attention dropout sscl_dropout = 0.3 (train.py's default, LLM2Vec's Llama-2 value) in the SSCL forward only."""
out_dir = "out-stories260k"
init_from = "../shared/assets/stories260K/stories260K.bin"
tokenizer = "../shared/assets/stories260K/tok512.model"
data = "../shared/data/tinystories/tinystories.txt"
seq_len = 256
batch_size = 16
sscl_len = 48
max_iters = 300
lr = 1e-3
min_lr = 1e-4
