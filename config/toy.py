"""The default run (`python train.py`): MAGNET on the built-in toy world, on a CPU, in a few minutes.

Phase 1 trains a small causal base from scratch (pretrain_iters steps, every parameter, next-token loss only);
phase 2 adapts it with LoRA and the three MAGNET losses. These are train.py's defaults, written out.
SSCL positives: the toy world's paraphrase pairs (toy/pairs.tsv, training frames only); no SimCSE noise."""
init_from = "scratch"
pretrain_iters = 1000
data = "toy"
dim = 128
n_layers = 4
n_heads = 4
seq_len = 128
batch_size = 16
max_iters = 400
lr = 2e-3
