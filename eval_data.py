"""The evaluation sets' files: STS pairs, CoNLL-2003 columns and multiple-choice JSONL, read with an error that names
the file and line; and what a suite's result was computed on (data_record), for the results JSON.
"""
import json
from pathlib import Path

import numpy as np

import runs
from data import read_text


class EvalError(ValueError):
    """Data or a checkpoint an evaluation cannot use; the message names the file or the option."""


def read_sts(path):
    """Sentence pairs with gold scores, (a, b, score), from a tab-separated file in one of two layouts: STS-B's
    (score in field 5, sentences in fields 6 and 7; extra fields ignored) or plain `sentence1<TAB>sentence2<TAB>score`
    (a first line whose score is not a number is a header and skipped)."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        f = line.split("\t")
        a, b, score = (f[0], f[1], f[2]) if len(f) == 3 else (f[5], f[6], f[4]) if len(f) >= 7 else ("", "", "")
        try:
            score = float(score)
        except ValueError:
            if n == 1 and len(f) == 3:
                continue  # a header line
            score = float("nan")
        if not (np.isfinite(score) and a.strip() and b.strip()):
            raise EvalError(f"{path}, line {n}: expected >= 7 tab-separated fields with a finite score in field 5 "
                            f"and sentences in fields 6 and 7 (STS-B), or sentence1<TAB>sentence2<TAB>score; got "
                            f"{line[:80]!r}")
        rows.append((a, b, score))
    if not rows:
        raise EvalError(f"{path}: no sentence pairs")
    return rows


def read_conll(path):
    """CoNLL-2003 columns (word POS chunk NER), blank line between sentences, -DOCSTART- lines skipped.
    Returns a list of sentences, each a dict of equal-length lists: words, pos, chunk, ner."""
    sentences, current = [], []
    for n, line in enumerate(read_text(path).splitlines() + [""], 1):
        if not line.strip() or line.startswith("-DOCSTART-"):
            if current:
                sentences.append({k: [c[i] for c in current] for i, k in enumerate(("words", "pos", "chunk", "ner"))})
            current = []
            continue
        cols = line.split()
        if len(cols) != 4:
            raise EvalError(f"{path}, line {n}: expected 4 columns (word POS chunk NER), got {line[:80]!r}")
        current.append(cols)
    if not sentences:
        raise EvalError(f"{path}: no sentences")
    return sentences


def read_mc(path):
    items = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        try:
            item = json.loads(line)
            assert isinstance(item["choices"], list) and 0 <= item["label"] < len(item["choices"])
            assert all(str(c).strip() for c in item["choices"])  # acc_norm divides by each choice's length
            items.append(dict(context=str(item["context"]), choices=[str(c) for c in item["choices"]],
                              label=int(item["label"])))
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise EvalError(f"{path}, line {n}: expected {{\"context\": str, \"choices\": [non-empty str, ...], "
                            f"\"label\": index}}, got {line[:80]!r}") from None
    return items


def data_record(path, suite):
    """What a suite's result was computed on: the file(s), size and hash (or just "toy" for the built-in toy world)."""
    if path == "toy":
        return {"path": "toy"}
    if suite == "token" and not Path(path).is_dir():
        raise EvalError(f"--token_data={path}: expected a directory with CoNLL-2003 train.txt, valid.txt, test.txt")
    files = [Path(path) / f for f in ("train.txt", "valid.txt", "test.txt")] if suite == "token" else [Path(path)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        need = " (the token suite needs train.txt, valid.txt and test.txt)" if suite == "token" else ""
        raise EvalError(f"{', '.join(missing)}: data file not found{need}")
    return {"path": path, **runs.fingerprint(files)}
