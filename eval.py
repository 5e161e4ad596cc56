"""Evaluate checkpoints side by side on the paper's suites (docs/design.md §8):

    python eval.py --suite=ppl,infill,repetition,sts,token,mc --ckpt=base=out/base/merged \
                   --ckpt=magnet=out/merged --limit=200 --out=results.json

A --ckpt is [name=]PATH, where PATH is a Meta directory, a llama2.c .bin, or BASE::ADAPTER (a base plus a LoRA
adapter file). Every suite reads its data by path; the defaults ("toy") are the built-in toy world's held-out
splits, so everything runs on a fresh machine. Results go to one JSON file (with each data file's size and hash,
the checkpoints and the settings) and a markdown table with one column per checkpoint.

  ppl         causal perplexity of held-out text (knowledge retention)
  infill      perplexity of an n-token gap read from both sides (hybrid mask) vs. from the left only (causal);
              exact match on blanks told their length (oracle) and not told it (the model chooses), length accuracy;
              toy world: blanks of 1-4 tokens that only the right context determines; text: gaps of 1..max_gap tokens
  repetition  greedy continuations of held-out prefixes: rep-2/3/4 and rep-sen
  sts         Spearman x100 between cosine similarity of sentence vectors and gold scores (nothing trained)
  token       linear probe on frozen token features: POS / chunk / NER accuracy and entity F1 (or toy tags)
  mc          multiple choice by summed and length-normalised log-likelihood
"""
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import runs
import toy
from attention import CONTEXT, PAD, SPAN
from checkpoint import CheckpointError, tokenizer_beside
from config import ConfigError, parse, validate_eval_config
from data import IGNORE, TextCorpus, pad_rows
from eval_data import EvalError, data_record, read_conll, read_mc, read_sts
from magnet import Magnet

SUITES = ("ppl", "infill", "repetition", "sts", "token", "mc")


@dataclass
class EvalConfig:
    suite: str = ",".join(SUITES)  # comma-separated, among ppl, infill, repetition, sts, token, mc
    tokenizer: str = ""  # "" = tokenizer.model or .json beside the (base) checkpoint
    text_data: str = "toy"  # held-out text for ppl / infill / repetition (a text file: its last 5% of paragraphs)
    sts_data: str = "toy"  # STS TSV: the STS-B layout, or sentence1<TAB>sentence2<TAB>score
    token_data: str = "toy"  # a directory with CoNLL-2003 train.txt, valid.txt, test.txt
    mc_data: str = "toy"  # JSONL: {"context", "choices", "label"}
    limit: int = 200  # examples per suite (0 = all); the token probe's training split has its own key
    probe_train: int = 0  # sentences the token probe trains on (0 = the whole train split; toy world: 300)
    seed: int = 0  # of the toy world's evaluation data, the blanks' places and the probe
    max_len: int = 256  # tokens per held-out passage
    gap: int = 8  # infill: gap length in tokens of the gap perplexity
    max_gap: int = 8  # infill: a text file's blanks are 1..max_gap tokens; not told, the model chooses 1..max_gap
    length_score: str = "sum"  # infill, not told the length: "sum" log p(gap + right | left), or "mean" per token
    prefix_len: int = 32  # repetition: prompt tokens
    cont_len: int = 96  # repetition: generated tokens
    pooling: str = ""  # "" = what each model was trained with (stored with its adapter), else "last" or "mean"
    out: str = "eval.json"  # the JSON report (results, settings, data hashes, provenance)
    overwrite: bool = False  # replace an existing --out file
    keep_going: bool = False  # record a failing suite's error and go on
    cache_dir: str = ".cache"  # tokenized --text_data (as train.py's)
    device: str = "cpu"  # "cuda" evaluates in the checkpoint's dtype (bf16 for Meta's files) on the GPU


# ----------------------------------------------------------------------------------------------------------------
# Metrics (each checked against hand-computed values in tests/test_eval.py)

def rep_n(tokens, n):
    """1 - unique n-grams / n-grams of one continuation (None when it has no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else None


def rep_sen(text):
    """Fraction of sentences that repeat an earlier sentence of the same text (None when it has none)."""
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return sum(s in sentences[:i] for i, s in enumerate(sentences)) / len(sentences) if sentences else None


def ranks(x):
    """Ranks 1..n, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(x, y):
    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def entities(tags):
    """Entity spans (type, start, end) of an IOB2 tag sequence; an I- without a matching B- starts a new entity."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == kind):
            spans.add((kind, start, i))
            start = None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start, kind = i, tag[2:]
    return spans


def entity_f1(gold_sentences, pred_sentences):
    gold = {(i,) + s for i, g in enumerate(gold_sentences) for s in entities(g)}
    pred = {(i,) + s for i, p in enumerate(pred_sentences) for s in entities(p)}
    hit = len(gold & pred)
    return 2 * hit / (len(gold) + len(pred)) if gold or pred else 1.0


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces

def row_nll(m: Magnet, rows, batch_size=16):
    """rows: (tokens, roles, labels) lists, label[t-1] = target token t or IGNORE. Returns per-row (NLL sum, count)."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        tokens, roles, labels = (pad_rows([np.array(r[j]) for r in chunk], fill).to(m.device)
                                 for j, fill in ((0, m.tok.pad_id), (1, PAD), (2, IGNORE)))
        with torch.no_grad():
            logits = m.model(tokens, roles)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # (B, T)
        out += list(zip(nll.sum(1).tolist(), (labels != IGNORE).sum(1).tolist()))
    return out


def perplexity(nll):
    """exp(mean NLL per target token) of row_nll's (sum, count) pairs."""
    if not sum(c for _, c in nll):
        raise EvalError("no held-out passage is long enough to score (see --max_len and --gap)")
    return float(np.exp(sum(s for s, _ in nll) / sum(c for _, c in nll)))


def causal_row(tokens, first_target):
    """An all-SPAN row whose targets are tokens[first_target:]."""
    labels = [IGNORE] * (first_target - 1) + list(tokens[first_target:]) + [IGNORE]
    return tokens, [SPAN] * len(tokens), labels


def held_out_passages(cfg, tok):
    if cfg.text_data == "toy":
        stories = toy.stories(cfg.limit or 200, toy.EVAL_SEED + cfg.seed)
        return [tok.encode(s, bos=True)[:cfg.max_len] for s in stories]
    corpus = TextCorpus(cfg.text_data, tok, split="val", cache_dir=cfg.cache_dir)
    rows = [corpus.tokens[s:e][:cfg.max_len].tolist() for s, e in zip(corpus.starts, corpus.ends)]
    return rows[:cfg.limit or None]


def limit_split(items, cfg):
    """The first --limit items of an evaluation split (all with --limit=0); an empty split is an error."""
    if not items:
        raise EvalError("the evaluation split is empty")
    return items[:cfg.limit] if cfg.limit else items


# ----------------------------------------------------------------------------------------------------------------
# Suites: each takes (Magnet, EvalConfig) and returns a dict of metrics

def suite_ppl(m, cfg):
    rows = [causal_row(p, 1) for p in limit_split(held_out_passages(cfg, m.tok), cfg) if len(p) > 1]
    return {"ppl": perplexity(row_nll(m, rows))}


def suite_infill(m, cfg):
    rng = np.random.default_rng(cfg.seed)
    hybrid, causal = [], []
    for p in limit_split(held_out_passages(cfg, m.tok), cfg):
        if len(p) < cfg.gap + 8:
            continue
        s = int(rng.integers(4, len(p) - cfg.gap - 3))  # some context on both sides of the gap
        roles = [CONTEXT] * len(p)
        roles[s:s + cfg.gap] = [SPAN] * cfg.gap
        labels = [IGNORE] * len(p)
        labels[s - 1:s - 1 + cfg.gap] = p[s:s + cfg.gap]
        hybrid.append((p, roles, labels))
        causal.append(causal_row(p[:s + cfg.gap], s))
    return dict(gap_ppl_hybrid=perplexity(row_nll(m, hybrid)), gap_ppl_left_only=perplexity(row_nll(m, causal)),
                **blank_metrics(m, cfg))


BLANK_CONTEXT = 64  # tokens of context on each side of a text file's blank


def blanks(m, cfg):
    """(left ids, gap ids, right ids, left text or None) of up to 100 blanks (see the module docstring); a text
    file's are uniform in length, at random places, with up to BLANK_CONTEXT tokens of context on each side."""
    out = []
    if cfg.text_data == "toy":
        for left, answer, right in toy.blanks(min(cfg.limit or 100, 100), toy.EVAL_SEED + cfg.seed):
            left_ids, right_ids = m.tok.context_ids(left, right)
            out.append((left_ids, m.tok.encode_after(left, " " + answer), right_ids, left))
        return out
    rng = np.random.default_rng(cfg.seed + 1)  # not the gap perplexity's: its gaps stay where they were
    for p in limit_split(held_out_passages(cfg, m.tok), cfg)[:100]:
        n = int(rng.integers(1, cfg.max_gap + 1))
        if len(p) < n + 8:
            continue
        s = int(rng.integers(4, len(p) - n - 3))  # some context on both sides of the gap
        out.append((p[:1] + p[max(1, s - BLANK_CONTEXT):s], p[s:s + n], p[s + n:s + n + BLANK_CONTEXT], None))
    return out


def blank_metrics(m, cfg):
    """The blank metrics of the module docstring (not told the length, Magnet.infill_ids chooses among 1..max_gap);
    on the toy world also the causal model's exact match from the left alone (told the length)."""
    hits = dict(blank_em_hybrid=0, blank_em_unknown_length=0, blank_length_exact=0, blank_length_within_1=0)
    items = blanks(m, cfg)
    if not items:
        raise EvalError(f"{cfg.text_data}: no held-out passage is long enough for a blank of 1..{cfg.max_gap} tokens")
    for i, (left_ids, gap, right_ids, left) in enumerate(tqdm(items, desc="blanks", leave=False)):
        told = m.infill_ids(left_ids, right_ids, len(gap))
        chosen = m.infill_ids(left_ids, right_ids, max_tokens=cfg.max_gap, length_score=cfg.length_score)
        for key, hit in (("blank_em_hybrid", told == gap), ("blank_em_unknown_length", chosen == gap),
                         ("blank_length_exact", len(chosen) == len(gap)),
                         ("blank_length_within_1", abs(len(chosen) - len(gap)) <= 1)):
            hits[key] += hit
        if left is not None:  # toy world: the causal model from the left alone
            hits["blank_em_left_only"] = hits.get("blank_em_left_only", 0) + (
                m.generate(left, len(gap)).strip() == m.tok.decode(gap).strip())
        if i < 3:
            print(f"  [{m.tok.decode(gap)}] told the length: [{m.tok.decode(told)}]  "
                  f"not told: [{m.tok.decode(chosen)}]  ...{m.tok.decode(left_ids[-8:])} _ "
                  f"{m.tok.decode(right_ids[:8])}...")
    return {k: v / len(items) for k, v in hits.items()}


def suite_repetition(m, cfg):
    scores = dict(rep_2=[], rep_3=[], rep_4=[], rep_sen=[])
    passages = [p for p in limit_split(held_out_passages(cfg, m.tok), cfg) if len(p) > cfg.prefix_len]
    if not passages:
        raise EvalError(f"no held-out passage is longer than prefix_len={cfg.prefix_len} tokens")
    for p in tqdm(passages, desc="repetition", leave=False):
        text = m.generate(m.tok.decode(p[1:cfg.prefix_len]), cfg.cont_len)
        ids = m.tok.encode(text)
        for k, v in dict(rep_2=rep_n(ids, 2), rep_3=rep_n(ids, 3), rep_4=rep_n(ids, 4), rep_sen=rep_sen(text)).items():
            if v is not None:
                scores[k].append(v)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in scores.items()}


def suite_sts(m, cfg):
    pairs = toy.sts_pairs(cfg.limit or 500, toy.EVAL_SEED + cfg.seed, "test") if cfg.sts_data == "toy" \
        else limit_split(read_sts(cfg.sts_data), cfg)
    gold = [p[2] for p in pairs]
    if len(pairs) < 2 or len(set(gold)) < 2:
        raise EvalError(f"{cfg.sts_data}: Spearman needs >= 2 pairs with different gold scores "
                        f"({len(pairs)} pairs, {len(set(gold))} distinct scores)")
    a = F.normalize(m.encode([p[0] for p in pairs]), dim=-1)
    b = F.normalize(m.encode([p[1] for p in pairs]), dim=-1)
    rho = spearman((a * b).sum(-1).numpy(), gold)
    if not np.isfinite(rho):
        raise EvalError("every pair got the same cosine similarity: Spearman is undefined for this model")
    return {"spearman": 100 * rho}


def word_features(m, sentences):
    """One vector per word of each sentence (a list of words): the feature of the word's first piece
    (Magnet.token_features). Word i starts where the pieces of the words before it end: with SentencePiece and
    byte-level BPE alike a space starts a new piece, so the tokenization of a prefix of the sentence is a prefix of
    the sentence's (a word with no piece is an error). Returns one (words, dim) tensor per sentence."""
    out = []
    for words, (pieces, feats) in zip(sentences, m.token_features([" ".join(w) for w in sentences])):
        starts = [len(m.tok.encode(" ".join(words[:i]))) for i in range(len(words))]
        if any(b <= a for a, b in zip(starts, starts[1:] + [len(pieces)])):
            raise EvalError(f"word pieces do not line up for {' '.join(words)[:60]!r}")
        out.append(feats[starts])
    return out


def train_probe(x, y, x_dev, y_dev, n_classes, seed, epochs=300, patience=20):
    """Softmax regression on standardised frozen features, full-batch Adam, early-stopped on dev accuracy."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    best, best_state, waited = -1.0, None, 0
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(probe((x - mean) / std), y).backward()
        opt.step()
        with torch.no_grad():
            acc = float((probe((x_dev - mean) / std).argmax(-1) == y_dev).float().mean())
        if acc > best:
            best, best_state, waited = acc, {k: v.clone() for k, v in probe.state_dict().items()}, 0
        elif (waited := waited + 1) >= patience:
            break
    probe.load_state_dict(best_state)
    return lambda feats: probe((feats - mean) / std).argmax(-1)


def token_splits(cfg):
    """train / dev / test tagged sentences; --limit cuts dev and test, --probe_train the training split."""
    if cfg.token_data == "toy":
        seed = toy.EVAL_SEED + cfg.seed + 10
        return {s: toy.tagged_sentences(n, seed + i) for i, (s, n) in
                enumerate((("train", cfg.probe_train or 300), ("dev", cfg.limit or 300), ("test", cfg.limit or 300)))}
    d = Path(cfg.token_data)
    splits = {s: limit_split(read_conll(d / f), cfg) for s, f in (("dev", "valid.txt"), ("test", "test.txt"))}
    return dict(train=read_conll(d / "train.txt")[:cfg.probe_train or None], **splits)


def suite_token(m, cfg):
    splits = token_splits(cfg)
    feats = {s: word_features(m, [sent["words"] for sent in v]) for s, v in splits.items()}
    results = {}
    for task in [k for k in ("pos", "chunk", "ner") if k in splits["train"][0]]:
        labels = sorted({t for sent in splits["train"] for t in sent[task]})
        index = {t: i for i, t in enumerate(labels)}
        xy = {s: (torch.cat(feats[s]), torch.tensor([index.get(t, -1) for sent in splits[s] for t in sent[task]]))
              for s in splits}
        predict = train_probe(*xy["train"], *xy["dev"], len(labels), cfg.seed)
        with torch.no_grad():
            pred = predict(xy["test"][0])
        results[f"{task}_acc"] = float((pred == xy["test"][1]).float().mean())
        if task in ("chunk", "ner"):
            lengths = np.cumsum([0] + [len(s[task]) for s in splits["test"]])
            tags = [labels[i] for i in pred.tolist()]
            results[f"{task}_f1"] = entity_f1([s[task] for s in splits["test"]],
                                              [tags[a:b] for a, b in zip(lengths[:-1], lengths[1:])])
    return results


def choice_rows(tok, context, choices):
    """One causal row per choice that scores only the choice's pieces, tokenized as in context + choice (as
    lm-evaluation-harness does; encoding the choice alone would score a stray piece, e.g. Llama-2's "▁")."""
    ctx = tok.encode(context.rstrip(), bos=True)
    return [causal_row(ctx + tok.encode_after(context, c), len(ctx)) for c in choices]


def suite_mc(m, cfg):
    """acc: the choice with the highest summed log-likelihood; acc_norm: per character of the choice's text, as
    lm-evaluation-harness normalises."""
    items = toy.multiple_choice(cfg.limit or 200, toy.EVAL_SEED + cfg.seed) if cfg.mc_data == "toy" \
        else limit_split(read_mc(cfg.mc_data), cfg)
    nll = row_nll(m, [row for it in items for row in choice_rows(m.tok, it["context"], it["choices"])])
    right, right_norm, sums = 0, 0, iter(s for s, _ in nll)
    for it in items:
        scores = [next(sums) for _ in it["choices"]]
        right += int(np.argmin(scores) == it["label"])
        right_norm += int(np.argmin([s / len(c) for s, c in zip(scores, it["choices"])]) == it["label"])
    return {"acc": right / len(items), "acc_norm": right_norm / len(items)}


SUITE_FUNCTIONS = dict(ppl=suite_ppl, infill=suite_infill, repetition=suite_repetition, sts=suite_sts,
                       token=suite_token, mc=suite_mc)


# ----------------------------------------------------------------------------------------------------------------
# Driver

ENCODER_OPTIONS = {"pooling": ("last", "mean"), "attention": ("bidirectional", "causal")}


def split_spec(spec):
    """--ckpt=[NAME=]PATH[::ADAPTER][#key=value,...] -> (name, path, options); the name defaults to the spec."""
    spec, _, extra = spec.partition("#")
    name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
    return name, path, extra


def load(spec, cfg):
    """--ckpt=[NAME=]PATH[::ADAPTER][#key=value,...]: options for how this model encodes text (ENCODER_OPTIONS),
    e.g. a causal base read causally with mean pooling: base=PATH#attention=causal,pooling=mean."""
    name, path, extra = split_spec(spec)
    base, sep, adapter = path.partition("::")
    if not base or (sep and not adapter):
        raise EvalError(f"--ckpt={spec}: expected [name=]PATH or [name=]BASE::ADAPTER, with no empty part")
    options = dict(pooling=cfg.pooling) if cfg.pooling else {}  # else the model's own (and always its instruction)
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        if value not in ENCODER_OPTIONS.get(key, ()):
            raise EvalError(f"--ckpt=...#{item}: expected one of " + ", ".join(
                f"{k}={v}" for k, vs in ENCODER_OPTIONS.items() for v in vs))
        options[key] = value
    for p in [base] + ([adapter] if adapter else []):
        if not Path(p).exists():
            raise EvalError(f"--ckpt={spec}: no such checkpoint {p} (expected [name=]PATH, PATH a Meta directory, "
                            "a llama2.c .bin or BASE::ADAPTER)")
    tok = cfg.tokenizer or str(tokenizer_beside(base) or Path(base) / "tokenizer.model")
    if not Path(tok).is_file():
        raise EvalError(f"no tokenizer for {base}: pass --tokenizer=PATH")
    return name, Magnet.load(base, tok, adapter=adapter or None, device=cfg.device, **options)


def markdown(results):
    """One table: a row per (suite, metric), a column per checkpoint."""
    names = list(results)
    keys = sorted({(s, k) for r in results.values() for s, v in r.items() for k in v}, key=lambda x: (
        SUITES.index(x[0]), x[1]))
    lines = ["| suite | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for s, k in keys:
        cells = [results[n].get(s, {}).get(k) for n in names]
        lines.append(f"| {s} | {k} | " + " | ".join("—" if c is None else c if isinstance(c, str) else f"{c:.4g}"
                                                      for c in cells) + " |")
    return "\n".join(lines)


def run_config(spec):
    """The train.py config.json beside a checkpoint's adapter (or merged export), if there is one."""
    path = split_spec(spec)[1]
    where = Path(path.partition("::")[2] or path).parent
    return json.loads((where / "config.json").read_text()) if (where / "config.json").is_file() else None


def main(argv):
    try:
        cfg, extra = parse(argv, EvalConfig(), __doc__, repeated=("ckpt",))
        ckpts = extra["ckpt"]
        validate_eval_config(cfg, SUITES, [split_spec(spec)[0] for spec in ckpts])
        runs.check_result_path(cfg.out, cfg.overwrite)  # before hours of evaluation, not after
        suites = cfg.suite.split(",")
        sources = {"ppl": cfg.text_data, "infill": cfg.text_data, "repetition": cfg.text_data,
                   "sts": cfg.sts_data, "token": cfg.token_data, "mc": cfg.mc_data}
        report = {"provenance": runs.provenance(), "settings": asdict(cfg), "checkpoints": {}, "train_configs": {},
                  "data": {s: data_record(sources[s], s) for s in suites}, "results": {}}
        for spec in ckpts:
            name, m = load(spec, cfg)
            report["checkpoints"][name], report["results"][name] = spec, {}
            report["train_configs"][name] = run_config(spec)
            for s in suites:
                print(f"{name}: {s}", file=sys.stderr)
                try:
                    report["results"][name][s] = SUITE_FUNCTIONS[s](m, cfg)
                except (EvalError, ValueError, FileNotFoundError) as e:
                    if not cfg.keep_going:
                        raise
                    report["results"][name][s] = {"error": str(e)}
        print(markdown(report["results"]))  # first: a failed write must not lose the results
        runs.write_result(cfg.out, report, cfg.overwrite)
        print(f"wrote {cfg.out}", file=sys.stderr)
    except (ConfigError, EvalError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
