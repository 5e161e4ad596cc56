"""Data for MAGNET: the tokenizer, text corpora and the three-view MAGNET batch (docs/design.md §4, §6).

One training example is seen through three views:
  view A    a corpus chunk with hybrid roles: some spans to generate (MSG), the rest context with 20% of it
            masked for MNTP. Labels use the next-token shift: the output at t-1 predicts the token at t.
  views B/C two short texts for SSCL, all CONTEXT with EOS appended: a text and its positive (a paraphrase when
            the data has pairs, otherwise the same text, made different by dropout noise as in SimCSE).
"""
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from attention import CONTEXT, PAD, SPAN

IGNORE = -100  # label of positions that are not a target (torch's cross_entropy ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """SentencePiece (.model) or Hugging Face byte-level BPE (tokenizer.json), with explicit special ids.

    bos_id is the token that starts a document: the tokenizer's own BOS where its convention adds one (`add_bos`:
    SentencePiece Llama, a tokenizer.json whose post-processor prepends one), else the document separator the model
    was pretrained with, `<|endoftext|>` where the vocabulary has it (SmolLM2: id 0), else EOS. Corpus chunks, infill
    context and token_features start with it; generate() prepends it only where `add_bos`.
    The MNTP mask token is the piece `mask_piece` (default "_": id 29918 in Llama-2, as LLM2Vec uses; a byte-level
    BPE has "_" as one of its 256 byte pieces, SmolLM2: id 79), or unk where the vocabulary has no such piece."""

    def __init__(self, path, mask_piece="_"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer not found (expected a SentencePiece .model or a tokenizer.json)")
        self.path, self.sp, self.hf = path, None, None
        if path.suffix == ".json":
            self._open_tokenizer_json(path)
        else:
            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(path))
            except (RuntimeError, OSError) as e:
                raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
            self.vocab_size, self.add_bos = self.sp.vocab_size(), True
            self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.eos_id  # pad positions also carry role PAD and label IGNORE, so the id never matters
        self.mask_id = self.piece_to_id(mask_piece)
        self.mask_id = self.unk_id if self.mask_id is None else self.mask_id

    def _open_tokenizer_json(self, path):
        """Special tokens from tokenizer_config.json beside it (Hugging Face's convention) where present."""
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ImportError(f"{path}: reading a tokenizer.json needs the 'tokenizers' package: pip install "
                              "tokenizers") from None
        try:
            self.hf = HFTokenizer.from_file(str(path))
            config_path = path.parent / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except Exception as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        role = {k: self.piece_to_id(v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
                if k.endswith("_token") and isinstance(v, (str, dict))}
        with_special, plain = self.hf.encode("a").ids, self.hf.encode("a", add_special_tokens=False).ids
        self.add_bos = with_special[:1] != plain[:1]  # the post-processor prepends a BOS
        doc = self.piece_to_id("<|endoftext|>")
        self.eos_id = role.get("eos_token", doc if doc is not None else self.piece_to_id("</s>"))
        if self.eos_id is None:
            raise ValueError(f"{path}: cannot tell its EOS token; put a tokenizer_config.json naming eos_token beside it")
        self.bos_id = with_special[0] if self.add_bos else (doc if doc is not None else self.eos_id)
        self.unk_id = role.get("unk_token", self.eos_id)  # byte-level BPE never needs one
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)

    def piece_to_id(self, piece):
        """The id of a vocabulary entry, None if there is none."""
        if self.hf is not None:
            return self.hf.token_to_id(piece) if piece else None
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def id_to_piece(self, i):
        """The vocabulary entry of an id: "▁under" (SentencePiece), "Ġunder" (byte-level BPE)."""
        return self.hf.id_to_token(int(i)) if self.hf is not None else self.sp.id_to_piece(int(i))

    def encode(self, text, bos=False, eos=False):
        ids = self.hf.encode(text, add_special_tokens=False).ids if self.hf is not None else self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.hf.decode(ids, skip_special_tokens=True) if self.hf is not None else self.sp.decode(ids)

    def encode_after(self, prefix, text):
        """The ids `text` has where it follows `prefix` in one string (lm-evaluation-harness's rule): encode the
        whole, drop the prefix's ids; whitespace that ends `prefix` moves to `text`. Encoding `text` alone is not
        the same: SentencePiece's dummy prefix turns " under" into a stray "▁" (id 29871 in Llama-2) + "▁under"."""
        head = prefix.rstrip()
        head_ids, ids = self.encode(head), self.encode(prefix + text)
        n = 0
        while n < min(len(head_ids), len(ids)) and head_ids[n] == ids[n]:  # = len(head_ids) unless a merge
            n += 1  # crossed the boundary; then the first differing piece goes with `text`
        return ids[n:]

    def context_ids(self, left, right):
        """BOS + left, and right, for infilling a gap between them, tokenized as in the whole text. A gap holds
        whole words: whitespace at its edges goes with the word after it ("a" + " kite" + " under"), and a right
        side that starts with a letter or digit starts a new word; one that starts with punctuation ("'s") joins
        the gap's last word, which stands in as the left text's."""
        left = left.rstrip()
        if right[:1].isalnum():
            right = " " + right
        return self.encode(left, bos=True), self.encode_after(left or "x", right)


# ----------------------------------------------------------------------------------------------------------------
# Corpora

class TextCorpus:
    """UTF-8 text files, paragraphs separated by blank lines, tokenized once into cached, memory-mapped .npy files.

    The stream is BOS + paragraph tokens, paragraph after paragraph; `starts` holds where each paragraph begins.
    The cache names carry a hash of the sources and the tokenizer, so a change of either re-tokenizes.
    The last `val_fraction` of the paragraphs is held out (split="val") for evaluation.
    """

    def __init__(self, paths, tokenizer: Tokenizer, split="train", val_fraction=0.05, cache_dir=None):
        paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: corpus file not found")
        key = hashlib.sha256(tokenizer.path.read_bytes())
        for p in paths:
            key.update(p.read_bytes())
        stem = Path(cache_dir or paths[0].parent) / f"{paths[0].name}.{key.hexdigest()[:16]}"
        tokens_file, starts_file = Path(f"{stem}.tokens.npy"), Path(f"{stem}.starts.npy")
        if not (tokens_file.exists() and starts_file.exists()):  # tokenize once
            dtype = np.uint16 if tokenizer.vocab_size < 2 ** 16 else np.uint32
            pieces = [np.array(tokenizer.encode(para, bos=True), dtype) for p in paths for para in read_paragraphs(p)]
            starts = np.cumsum([0] + [len(x) for x in pieces[:-1]]) if pieces else np.zeros(0, np.int64)
            tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
            for array, path in ((tokens, tokens_file), (starts, starts_file)):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")  # atomic: never a half-written cache
                np.save(tmp, array)
                tmp.replace(path)
        self.tokens = np.load(tokens_file, mmap_mode="r")  # a 500 MB corpus is not read into memory
        starts = np.load(starts_file)
        if len(starts) == 0:
            raise ValueError(f"{', '.join(map(str, paths))}: the corpus has no text")
        n_val = int(round(len(starts) * val_fraction))
        ends = np.append(starts[1:], len(self.tokens))
        keep = slice(len(starts) - n_val, None) if split == "val" else slice(0, len(starts) - n_val)
        self.starts, self.ends = starts[keep], ends[keep]
        if len(self.starts) == 0:
            raise ValueError(f"{paths[0]}: the {split!r} split is empty ({len(starts)} paragraphs in all)")
        self.tokenizer = tokenizer

    def chunk(self, rng, length):
        """Up to `length` tokens starting at a random paragraph (so it begins with BOS), running on past its end."""
        i = rng.integers(len(self.starts))
        return self.tokens[self.starts[i]:min(self.starts[i] + length, self.ends[-1])].astype(np.int64)

    def n_passages(self, max_len):
        """How many different passages `passage` can return (its distinct start positions)."""
        return int(np.maximum(1, self.ends - self.starts - 1 - max_len // 2).sum())

    def passage(self, rng, max_len):
        """A short passage for SSCL: up to max_len tokens from a random point inside one paragraph (no BOS)."""
        i = rng.integers(len(self.starts))
        lo, hi = self.starts[i] + 1, self.ends[i]
        start = rng.integers(lo, max(lo + 1, hi - max_len // 2))
        return self.tokens[start:min(start + max_len, hi)].astype(np.int64)


def read_text(path):
    """A UTF-8 text file; anything else is an error that names the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_paragraphs(path):
    return [p.strip() for p in re.split(r"\n\s*\n", read_text(path)) if p.strip()]


def read_pairs(path):
    """A paraphrase file for SSCL positives: one `text<TAB>positive` pair a line."""
    pairs = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 2 or not all(f.strip() for f in fields):
            raise ValueError(f"{path}, line {n}: expected 'text<TAB>positive', got {line[:80]!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# The MAGNET batch

@dataclass
class BatchConfig:
    batch_size: int = 16  # rows per micro-step, over all ranks; a step sees batch_size * grad_accum rows
    seq_len: int = 128  # view A: BOS + up to seq_len tokens
    max_spans: int = 3  # MSG: 1..max_spans spans a row (0: none, as the LLM2Vec baseline's all-context rows)
    span_min: int = 8  # MSG: tokens a span, at least (clipped in short rows)
    span_max: int = 32  # MSG: tokens a span, at most
    p_causal: float = 0.1  # rows that are one span after BOS: plain next-token prediction (our choice)
    mntp_rate: float = 0.2  # MNTP: the share of context tokens masked (80% mask token, 10% random, 10% kept)
    sscl_len: int = 48  # max tokens of an SSCL text (before EOS)
    instruction: str = ""  # optional prefix of every SSCL text (the paper mentions one; empty by default)


def sample_spans(n, rng, max_spans, span_min, span_max):
    """Spans [start, end) for a row of n tokens: 1..max_spans, none covering BOS (position 0), >= 1 context token
    between two spans, together at most about half the row so short rows keep context."""
    room = n - 1
    if room < 1 or max_spans == 0:  # max_spans=0: no spans (the LLM2Vec baseline's all-context rows)
        return []
    k = min(int(rng.integers(1, max_spans + 1)), max(1, (room + 1) // 2))
    lengths = [int(rng.integers(span_min, span_max + 1)) for _ in range(k)]
    while sum(lengths) > max(k, room // 2):  # clip for short rows: spans take at most about half of the row
        lengths[int(np.argmax(lengths))] -= 1
    free = room - sum(lengths) - (k - 1)  # context tokens to scatter around the spans
    cuts = np.sort(rng.integers(0, free + 1, size=k))
    gaps = np.diff(np.concatenate([[0], cuts]))  # context before each span (the separators come on top)
    spans, pos = [], 1
    for i, (gap, length) in enumerate(zip(gaps, lengths)):
        pos += int(gap) + (i > 0)
        spans.append((pos, pos + length))
        pos += length
    return spans


def view_a(chunk, cfg: BatchConfig, tok: Tokenizer, rng):
    """One row of view A: (tokens, roles, mntp_labels, msg_labels), each of length len(chunk); label[t-1] = token t."""
    n = len(chunk)
    tokens, roles = chunk.copy(), np.full(n, CONTEXT)
    mntp, msg = np.full(n, IGNORE), np.full(n, IGNORE)
    if rng.random() < cfg.p_causal:  # a plain causal LM row: keeps left-to-right generation intact
        roles[:] = SPAN  # BOS too: "BOS + one span" attends exactly like this, and all-SPAN takes the causal kernel
        msg[:-1] = chunk[1:]
        return tokens, roles, mntp, msg
    is_bos = chunk == tok.bos_id
    in_span = np.zeros(n, dtype=bool)
    for s, e in sample_spans(n, rng, cfg.max_spans, cfg.span_min, cfg.span_max):
        in_span[s:e] = True
    # a BOS inside the chunk (a new paragraph starts there) stays CONTEXT, cutting a span that covers it in two:
    # no span target is ever a document boundary
    span_pos = np.flatnonzero(in_span & ~is_bos)
    roles[span_pos] = SPAN
    msg[span_pos - 1] = chunk[span_pos]
    # never position 0, never a BOS
    eligible = np.flatnonzero((roles == CONTEXT) & ~is_bos & (np.arange(n) > 0))
    picked = eligible[rng.random(len(eligible)) < cfg.mntp_rate]
    mntp[picked - 1] = chunk[picked]
    action = rng.random(len(picked))  # 80% mask token, 10% a random token, 10% unchanged (BERT's recipe)
    tokens[picked[action < 0.8]] = tok.mask_id
    rand = picked[(action >= 0.8) & (action < 0.9)]
    tokens[rand] = rng.integers(0, tok.vocab_size, size=len(rand))
    return tokens, roles, mntp, msg


def pad_rows(rows, fill):
    """Stack 1-D arrays into a (B, T) tensor, right-padding with `fill`."""
    out = np.full((len(rows), max(len(r) for r in rows)), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def sscl_views(texts, tok: Tokenizer, max_len, instruction=""):
    """All-CONTEXT rows (BOS + instruction + text + EOS), right-padded; returns tokens, roles, and each EOS index."""
    prefix = tok.encode(instruction) if instruction else []
    rows = [[tok.bos_id] + prefix + list(t[:max_len]) + [tok.eos_id] for t in texts]
    return pad_rows(rows, tok.pad_id), pad_rows([[CONTEXT] * len(r) for r in rows], PAD), \
        torch.tensor([len(r) - 1 for r in rows])


def text_start(tok: Tokenizer, instruction=""):
    """Where the text starts in an sscl_views row (after BOS + instruction): mean pooling starts there, as LLM2Vec's
    leaves the instruction out; 0 without an instruction (BOS is then averaged in too)."""
    return 1 + len(tok.encode(instruction)) if instruction else 0


def magnet_batch(corpus: TextCorpus, cfg: BatchConfig, rng, pairs=None):
    """The three views for one step; deterministic given the numpy Generator `rng`.

    Returns a dict of tensors: tokens, roles, mntp_labels, msg_labels (view A, (B, T)); sscl_tokens, sscl_roles
    ((2B, T'), view B stacked on view C) and sscl_last ((2B,), the EOS index used for last-token pooling).
    """
    tok = corpus.tokenizer
    rows = [view_a(corpus.chunk(rng, cfg.seq_len + 1), cfg, tok, rng) for _ in range(cfg.batch_size)]
    batch = dict(tokens=pad_rows([r[0] for r in rows], tok.pad_id), roles=pad_rows([r[1] for r in rows], PAD),
                 mntp_labels=pad_rows([r[2] for r in rows], IGNORE), msg_labels=pad_rows([r[3] for r in rows], IGNORE))
    if pairs:
        # distinct pairs (a repeated pair would be its own negative); with replacement only if there are too few
        chosen = [pairs[i] for i in rng.choice(len(pairs), size=cfg.batch_size, replace=len(pairs) < cfg.batch_size)]
        texts = [tok.encode(a) for a, _ in chosen] + [tok.encode(b) for _, b in chosen]
    else:
        texts = [corpus.passage(rng, cfg.sscl_len) for _ in range(cfg.batch_size)]
        texts = texts + texts  # SimCSE: the positive is the same text under different dropout noise
    views = sscl_views(texts, tok, cfg.sscl_len, cfg.instruction)
    batch["sscl_tokens"], batch["sscl_roles"], batch["sscl_last"] = views
    return batch


def batch_rows(batch, i, n):
    """Rows i/n of a magnet_batch (view A's rows and the matching rows of views B and C, so negatives stay aligned)."""
    rows = batch["tokens"].shape[0] // n
    take = slice(i * rows, (i + 1) * rows)
    out = {k: batch[k][take] for k in ("tokens", "roles", "mntp_labels", "msg_labels")}
    for k in ("sscl_tokens", "sscl_roles", "sscl_last"):
        b, c = batch[k].chunk(2)  # views B and C are stacked
        out[k] = torch.cat([b[take], c[take]])
    return out
