"""Adapt the real pretrained stories260K (Karpathy's tiny TinyStories Llama) with MAGNET on TinyStories text.
The defaults point at ../shared; override them with --init_from=, --tokenizer=, --data=.
TinyStories has no paraphrase pairs, so SSCL's positive is the same passage under dropout noise (SimCSE): 0.1."""
out_dir = "out-stories260k"
init_from = "../shared/assets/stories260K/stories260K.bin"
tokenizer = "../shared/assets/stories260K/tok512.model"
data = "../shared/data/tinystories/tinystories.txt"
seq_len = 256
batch_size = 16
sscl_len = 48
max_iters = 300
lr = 1e-3
dropout = 0.1
min_lr = 1e-4
