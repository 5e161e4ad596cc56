"""Joint MNTP + SSCL (LLM2Vec's two losses trained together in one stage): all-bidirectional attention, no MSG.
No spans (max_spans = 0) and no causal rows, so every position of view A is CONTEXT. Give a base with
--init_from=... (e.g. out-pretrain-toy/merged). This is not LLM2Vec as published (MNTP, merged, then SimCSE with
mean pooling: two runs, as `experiments.sh C` does); RESULTS.md's tables call this run `mntp_sscl`.
SSCL positives: as the run it is compared with (--pairs, else the same text under sscl_dropout noise)."""
out_dir = "out-mntp_sscl"
init_from = "out-pretrain-toy/merged"
max_spans = 0
p_causal = 0.0
w_msg = 0.0
