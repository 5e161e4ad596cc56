"""The LLM2Vec baseline (BehnamGhader et al., 2024): MNTP + SSCL with all-bidirectional attention, no MSG.
No spans (max_spans = 0) and no causal rows, so every position of view A is CONTEXT. Give a base with
--init_from=... (e.g. out-pretrain-toy/merged).
SSCL positives: as the run it is compared with (--pairs, else the same text under sscl_dropout noise)."""
out_dir = "out-llm2vec"
init_from = "out-pretrain-toy/merged"
max_spans = 0
p_causal = 0.0
w_msg = 0.0
