"""Figures.

    python plot.py mask [OUT]                   the hybrid mask of one short example row (default docs/hybrid_mask.png)
    python plot.py [RUNS_DIR] [RESULTS_PREFIX]  Setting C's figures (defaults: runs/C results/setting_c)

The mask picture is drawn from attention.hybrid_mask itself. Setting C's figures: RESULTS_PREFIX_losses.png (each
trained variant's MNTP / MSG / SSCL training loss, from its log.jsonl) and RESULTS_PREFIX_claims.png (base / LLM2Vec /
MAGNET on the paper's four claims, from the eval JSON files that `bash experiments.sh C` writes).
matplotlib is needed only to draw (pip install matplotlib); mask_grid() works without it.
"""
import json
import sys
from pathlib import Path

import numpy as np

# one short view-A row: BOS, context, a 3-token span, context, a 1-token span, context, two pads
MASK_EXAMPLE = [("<s>", "C"), ("Mia", "C"), ("found", "C"), ("a", "C"), ("red", "S"), ("paper", "S"), ("kite", "S"),
                ("under", "C"), ("the", "C"), ("old", "S"), ("tree", "C"), (".", "C"), ("<pad>", "P"), ("<pad>", "P")]


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


def mask_grid(example=MASK_EXAMPLE):
    """The example row's (labels, roles, grid): grid[i][j] is True where query i may attend key j, by attention.py."""
    import torch
    from attention import CONTEXT, PAD, SPAN, hybrid_mask
    labels = [word for word, _ in example]
    roles = [{"P": PAD, "C": CONTEXT, "S": SPAN}[role] for _, role in example]
    r = torch.tensor([roles])
    pos = torch.arange(len(roles))[None]  # spans stay in place: positions 0..T-1
    grid = hybrid_mask(r, pos, r, pos)[0, 0]  # (T, T): query rows, key columns
    return labels, roles, grid.tolist()


def plot_mask(plt, out):
    from attention import CONTEXT, PAD, SPAN
    from matplotlib.patches import Patch
    labels, roles, grid = mask_grid()
    color = {CONTEXT: "#4c72b0", SPAN: "#dd8452", PAD: "#999999"}  # a cell takes its key's color
    name = {CONTEXT: "context", SPAN: "span", PAD: "padding"}
    T = len(labels)
    image = np.ones((T, T, 3))
    for i in range(T):
        for j in range(T):
            if grid[i][j]:
                image[i, j] = [int(color[roles[j]][k:k + 2], 16) / 255 for k in (1, 3, 5)]
    fig, ax = plt.subplots(figsize=(6.4, 6.6))
    ax.imshow(image, interpolation="nearest")
    ticks = [f"[{w}]" if r == SPAN else w for w, r in zip(labels, roles)]
    ax.set_xticks(range(T), ticks, rotation=90)
    ax.set_yticks(range(T), ticks)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for text, role in zip(tick_labels, roles):
            text.set_color(color[role])
    ax.set_xticks(np.arange(-0.5, T), minor=True)
    ax.set_yticks(np.arange(-0.5, T), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.legend(handles=[Patch(color=color[r], label=f"key: {name[r]}") for r in (CONTEXT, SPAN, PAD)],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, frameon=False, fontsize=9)
    fig.suptitle("MAGNET's hybrid attention mask (attention.hybrid_mask), one row", fontsize=11)
    fig.text(0.5, 0.015, "Filled = may attend. Context sees all context, both sides; a [span] token sees all context\n"
             "and the span tokens up to itself (causal, across spans); padding sees only itself.",
             ha="center", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib to draw: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def main(runs="runs/C", prefix="results/setting_c"):
    plt = pyplot()
    plot_losses(plt, Path(runs), f"{prefix}_losses.png")
    plot_claims(plt, prefix, f"{prefix}_claims.png")
    print(f"wrote {prefix}_losses.png and {prefix}_claims.png")


if __name__ == "__main__":
    if sys.argv[1:2] == ["mask"]:
        out = sys.argv[2] if len(sys.argv) > 2 else "docs/hybrid_mask.png"
        plot_mask(pyplot(), out)
        print(f"wrote {out}")
    else:
        main(*sys.argv[1:])
