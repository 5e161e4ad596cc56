"""Figures for Setting C: python plot.py [RUNS_DIR] [RESULTS_PREFIX]   (defaults: runs/C results/setting_c)

Writes RESULTS_PREFIX_losses.png (each trained variant's MNTP / MSG / SSCL training loss, from its log.jsonl) and
RESULTS_PREFIX_claims.png (base / LLM2Vec / MAGNET on the paper's four claims, from the eval JSON files that
`bash experiments.sh C` writes). matplotlib is needed only here: pip install matplotlib.
"""
import json
import sys
from pathlib import Path

import numpy as np


def smooth(values, window=10):
    """Moving average over the last `window` steps (shorter at the start)."""
    cumulative = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    return (cumulative[i] - cumulative[np.maximum(0, i - window)]) / np.minimum(i, window)


def plot_losses(plt, runs, out):
    logs = {d.name: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            for d in sorted(runs.iterdir()) if (d / "log.jsonl").is_file()}
    color = {name: f"C{i}" for i, name in enumerate(logs)}  # one color per run in every panel
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, loss in zip(axes, ("mntp", "msg", "sscl")):
        for name, rows in logs.items():
            rows = [r for r in rows if loss in r and r[loss] == r[loss]]  # present, not NaN
            if rows and any(r[loss] for r in rows):  # a loss switched off is logged as 0
                ax.plot([r["step"] for r in rows], smooth([r[loss] for r in rows]), label=name, color=color[name])
        ax.set(title=f"{loss.upper()} training loss (moving average of 10 steps)", xlabel="step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_claims(plt, prefix, out):
    read = lambda part: json.loads(Path(f"{prefix}_{part}.json").read_text())["results"]
    text, infill, encode, pooling = read("text"), read("infill"), read("encode"), read("base_pooling")
    base_sts = max(r["sts"]["spearman"] for r in pooling.values())  # the base with the encoder that suits it best
    panels = [  # (title, {model: value}, lower is better)
        ("STS-B Spearman x100", dict(base=base_sts, llm2vec=encode["llm2vec"]["sts"]["spearman"],
                                     magnet=encode["magnet"]["sts"]["spearman"]), False),
        ("CoNLL POS probe accuracy", dict(base=encode["base_causal"]["token"]["pos_acc"],
                                          llm2vec=encode["llm2vec"]["token"]["pos_acc"],
                                          magnet=encode["magnet"]["token"]["pos_acc"]), False),
        ("gap PPL, 8 tokens", dict(base=infill["base"]["infill"]["gap_ppl_left_only"],
                                   llm2vec=infill["llm2vec"]["infill"]["gap_ppl_hybrid"],
                                   magnet=infill["magnet"]["infill"]["gap_ppl_hybrid"]), True),
        ("rep-sen", {m: text[m]["repetition"]["rep_sen"] for m in ("base", "llm2vec", "magnet")},
         True),
        ("held-out WikiText PPL", {m: text[m]["ppl"]["ppl"] for m in ("base", "llm2vec", "magnet")}, True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.4))
    for ax, (title, values, lower) in zip(axes, panels):
        bars = ax.bar(list(values), list(values.values()), color=["#999999", "#4c72b0", "#dd8452"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(title + (" (lower is better)" if lower else ""), fontsize=9)
        ax.set_ylim(0, 1.15 * max(values.values()))
    fig.suptitle("Setting C: SmolLM2-135M, base vs LLM2Vec vs MAGNET (base gap PPL: left context only)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(runs="runs/C", prefix="results/setting_c"):
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plot_losses(plt, Path(runs), f"{prefix}_losses.png")
    plot_claims(plt, prefix, f"{prefix}_claims.png")
    print(f"wrote {prefix}_losses.png and {prefix}_claims.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
