"""Plain causal pretraining on the toy world: the base model of the small-scale experiments.
Every parameter trains (no LoRA), every row is one span (p_causal = 1), only the next-token (MSG) loss.
SSCL positives: none (w_sscl = 0)."""
out_dir = "out-pretrain-toy"
init_from = "scratch"
data = "toy"
lora = False
p_causal = 1.0
w_mntp = 0.0
w_sscl = 0.0
max_iters = 1000
demo = False
