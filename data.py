"""Data for MAGNET: the tokenizer, text corpora, the toy world, the three-view MAGNET batch, and eval-set readers.

One training example is seen through three views (DESIGN §4):
  view A    a corpus chunk with hybrid roles: some spans to generate (MSG), the rest context with 20% of it
            masked for MNTP. Labels use the next-token shift: the output at t-1 predicts the token at t.
  views B/C two short texts for SSCL, all CONTEXT with EOS appended: a text and its positive (a paraphrase when
            the data has pairs, otherwise the same text, made different by dropout noise as in SimCSE).
"""
import hashlib
import io
import json
import os
import random
import re
import shutil
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


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # SentencePiece, or Hugging Face's (+ tokenizer_config.json)


def tokenizer_beside(directory):
    """The tokenizer file a checkpoint directory holds (the first of TOKENIZER_FILES present), else None."""
    return next((Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()), None)


def copy_tokenizer(path, directory):
    """Copy a tokenizer into a checkpoint directory under its usual name; a tokenizer.json brings the
    tokenizer_config.json beside it (its special tokens and BOS convention)."""
    path, directory = Path(path), Path(directory)
    shutil.copyfile(path, directory / TOKENIZER_FILES[path.suffix == ".json"])
    if path.suffix == ".json" and (path.parent / "tokenizer_config.json").is_file():
        shutil.copyfile(path.parent / "tokenizer_config.json", directory / "tokenizer_config.json")


def train_tokenizer(texts, path, vocab_size):
    """Train a small BPE SentencePiece model (unk=0, bos=1, eos=2, as Llama's) on `texts`; writes `path`."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(out.getvalue())
    return Tokenizer(path)


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
    max_spans: int = 3
    span_min: int = 8
    span_max: int = 32
    p_causal: float = 0.1  # rows that are one span after BOS: plain next-token prediction (our choice)
    mntp_rate: float = 0.2
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


# ----------------------------------------------------------------------------------------------------------------
# Eval-set readers

def read_sts(path):
    """STS-B layout: tab-separated, gold score 0-5 in field 5, sentences in fields 6 and 7 (extra fields ignored)."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        f = line.split("\t")
        try:
            rows.append((f[5], f[6], float(f[4])))
            assert np.isfinite(rows[-1][2]) and f[5].strip() and f[6].strip()
        except (IndexError, ValueError, AssertionError):
            raise ValueError(f"{path}, line {n}: expected >= 7 tab-separated fields with a finite score in field 5 "
                             f"and sentences in fields 6 and 7, got {line[:80]!r}") from None
    if not rows:
        raise ValueError(f"{path}: no sentence pairs")
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
            raise ValueError(f"{path}, line {n}: expected 4 columns (word POS chunk NER), got {line[:80]!r}")
        current.append(cols)
    if not sentences:
        raise ValueError(f"{path}: no sentences")
    return sentences


# ----------------------------------------------------------------------------------------------------------------
# The toy world: simple English stories with known answers, generated from a seed (no download)
#
# Every story opens with "<name> found a <object> <place>." The object is drawn independently of everything
# before it and is named again only in the NEXT sentence, so a blank over it is determined by the right context
# alone: a causal model is at chance (1/8), a model that reads both sides is not. Objects are named by 1 to 4
# words ("kite", "story book", "little paper boat", ...), so the blank's LENGTH is also known only from the right:
# the test of infilling without being told the gap's size. Sentences built from a frame
# (name, verb, object, place) have several surface forms, giving paraphrases and pairs of graded similarity.
# Each word carries a part-of-speech tag (lexicon below; "word/TAG" in a template overrides it, e.g. "light"
# is a NOUN in "a warm light" and an ADJ in "the drum was light").

EVAL_SEED = 1_000_000  # toy-world evaluation data comes from seeds >= this; training data from the run's seed
NAMES = ["Mia", "Tom", "Sam", "Lily", "Ben", "Anna", "Max", "Zoe"]
OBJECTS = {"kite": "it flew high in the wind", "ball": "it bounced on the grass",
           "story book": "it had many pages", "birthday cake": "it tasted very sweet",
           "little paper boat": "it floated on the pond", "big toy drum": "it made a loud sound",
           "shiny old oil lamp": "it gave a warm light", "funny straw sun hat": "it kept the sun away"}
PLACES = ["under the tree", "in the garden", "near the river", "in a box", "behind the house", "on the hill"]
ADJECTIVES = ["red", "blue", "green", "yellow", "big", "small", "old", "light/ADJ"]
VERBS = [("found", "discovered"), ("spotted", "noticed"), ("lost", "misplaced"), ("bought", "purchased")]
LEXICON = {tag: words.split() for tag, words in {
    "NOUN": "kite ball story book birthday cake paper boat toy drum oil lamp straw hat tree garden river box house "
            "hill wind grass pages pond sound light sun day morning",
    "VERB": "found discovered spotted noticed lost misplaced bought purchased was flew bounced had tasted floated "
            "made gave kept wanted play played went were",
    "ADJ": "red blue green yellow big small old many sweet loud warm happy good little shiny funny",
    "DET": "a the A The",
    "ADP": "under Under in In near Near behind Behind on On by with to",
    "PRON": "it It They",
    "PUNCT": ". ,",
    "NAME": " ".join(NAMES)}.items()}
WORD_TAG = {w: tag for tag, words in LEXICON.items() for w in words}  # anything else: OTHER (very, high, and, ...)


def tag_words(sentence):
    """(words, tags) of a marked-up toy sentence."""
    words, tags = [], []
    for w in re.findall(r"[\w/]+|[.,]", sentence):
        word, _, tag = w.partition("/")
        words.append(word)
        tags.append(tag or WORD_TAG.get(word, "OTHER"))
    return words, tags


def plain(text):
    return re.sub(r"/[A-Z]+", "", text)


def frame_sentence(frame, rng, avoid=None):
    """One surface form of a (name, verb, object, place) frame: 3 word orders x 2 synonyms of the verb."""
    name, verb, obj, place = frame
    forms = [(f"{name} {v} a {obj} {place}.", f"{place[0].upper() + place[1:]}, {name} {v} a {obj}.",
              f"A {obj} was {v} by {name} {place}.")[k] for k in range(3) for v in VERBS[verb]]
    return rng.choice([f for f in forms if f != avoid])


def random_frame(rng):
    return rng.choice(NAMES), rng.randrange(len(VERBS)), rng.choice(list(OBJECTS)), rng.choice(PLACES)


def held_out(frame):
    """Object/place combinations reserved for evaluation pairs (never used as SSCL training pairs)."""
    return (list(OBJECTS).index(frame[2]) + PLACES.index(frame[3])) % 4 == 0


def toy_story(rng):
    """A story as marked-up sentences; the first names an object that only the second sentence identifies."""
    name, friend = rng.sample(NAMES, 2)
    obj, place, adj = rng.choice(list(OBJECTS)), rng.choice(PLACES), rng.choice(ADJECTIVES)
    opening = rng.choice(["", "One day, ", "In the morning, "])
    return [f"{opening}{name} found a {obj} {place}.",
            f"The {obj} was {adj} and {OBJECTS[obj]}.",
            rng.choice([f"{name} gave the {obj} to {friend}.", f"{friend} wanted to/OTHER play with the {obj}.",
                        f"{name} and {friend} played with the {obj} all day."]),
            frame_sentence(random_frame(rng), rng),
            rng.choice(["They were very happy.", f"Then {name} went home.", "It was a good day."])]


def toy_stories(n, seed):
    rng = random.Random(seed)
    return [plain(" ".join(toy_story(rng))) for _ in range(n)]


def toy_blanks(n, seed):
    """(left, answer, right) triples: the answer is the object (1-4 words) that only the right context names."""
    out = []
    for text in toy_stories(n, seed):
        found = re.search(" found a (" + "|".join(OBJECTS) + ") ", text)  # the first sentence's object
        out.append((text[:found.start(1) - 1], found.group(1), text[found.end(1):]))
    return out


def toy_pairs(n, seed, split):
    """STS-style (a, b, score) pairs: b changes d of the 4 frame slots, score = 5 (4 - d) / 4; d = 0 is a
    paraphrase. split="test" uses only held-out frames, split="train" only the others."""
    rng, out = random.Random(seed), []
    slot_values = [NAMES, range(len(VERBS)), list(OBJECTS), PLACES]
    while len(out) < n:
        a = random_frame(rng)
        if held_out(a) != (split == "test"):
            continue
        d, b = rng.randint(0, 4), list(a)
        for slot in rng.sample(range(4), d):
            b[slot] = rng.choice([v for v in slot_values[slot] if v != a[slot]])
        first = frame_sentence(a, rng)
        out.append((plain(first), plain(frame_sentence(tuple(b), rng, avoid=first)), 5 * (4 - d) / 4))
    return out


def toy_multiple_choice(n, seed):
    """{"context", "choices", "label"} items: which property does the object named in the context have?"""
    rng, items = random.Random(seed), []
    for _ in range(n):
        name, obj, place = rng.choice(NAMES), rng.choice(list(OBJECTS)), rng.choice(PLACES)
        context = f"{name} found a {obj} {place}. The {obj} was {plain(rng.choice(ADJECTIVES))} and"
        choices = [f" {fact}." for fact in rng.sample(list(OBJECTS.values()), 4)]
        if f" {OBJECTS[obj]}." not in choices:
            choices[rng.randrange(4)] = f" {OBJECTS[obj]}."
        items.append(dict(context=context, choices=choices, label=choices.index(f" {OBJECTS[obj]}.")))
    return items


def toy_tagged(n, seed):
    """Tagged sentences in read_conll's layout (key "pos" holds the toy tags)."""
    rng = random.Random(seed)
    sentences = [s for _ in range(n) for s in toy_story(rng)][:n]
    return [dict(zip(("words", "pos"), tag_words(s))) for s in sentences]


def write_toy_world(directory, n_stories=4000, n_pairs=4000, seed=0, vocab_size=256):
    """Write the toy corpus (stories.txt), SSCL paraphrase pairs (pairs.tsv) and a tokenizer (tok.model).
    Returns (corpus path, pairs path, Tokenizer). Deterministic for a seed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stories = toy_stories(n_stories, seed)
    (d / "stories.txt").write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    pairs = [(a, b) for a, b, score in toy_pairs(4 * n_pairs, seed, "train") if score == 5][:n_pairs]
    (d / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return d / "stories.txt", d / "pairs.tsv", train_tokenizer(stories, d / "tok.model", vocab_size)
