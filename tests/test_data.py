"""data.py: invariants of the MAGNET batch over many seeds, the toy world, the corpus cache, readers, errors."""
import re

import numpy as np
import pytest

import data
import eval as ev
import toy
from attention import CONTEXT, PAD, SPAN
from data import IGNORE, BatchConfig, magnet_batch, read_pairs, sample_spans, view_a

from conftest import shared_file


def test_span_sampling_invariants_over_many_seeds():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n, max_spans = int(rng.integers(1, 80)), int(rng.integers(0, 5))
        lo = int(rng.integers(1, 10))
        hi = lo + int(rng.integers(0, 30))
        spans = sample_spans(n, rng, max_spans, lo, hi)
        assert len(spans) <= max_spans and (n < 2 or max_spans == 0 or spans)
        for s, e in spans:
            assert 1 <= s < e <= n and e - s <= hi  # never BOS, inside the row, never longer than span_max
            if (n - 1) // 2 >= max_spans * hi:  # room for every span at full length: none is clipped
                assert e - s >= lo
        for (_, e1), (s2, _) in zip(spans, spans[1:]):
            assert s2 >= e1 + 1  # no overlap, at least one context token between spans
        assert sum(e - s for s, e in spans) <= max(len(spans), (n - 1) // 2)  # spans take about half the row at most


def test_span_counts_and_lengths_are_uniform_on_long_rows():
    """The defaults (docs/design.md §4) at seq_len 512: 1..3 spans, each 8..32 tokens, both uniform (no clipping at
    this size)."""
    rng = np.random.default_rng(0)
    draws = [sample_spans(513, rng, 3, 8, 32) for _ in range(3000)]
    counts = np.bincount([len(spans) for spans in draws], minlength=4)[1:]
    lengths = np.array([e - s for spans in draws for s, e in spans])
    assert np.abs(counts / len(draws) - 1 / 3).max() < 0.03  # 3 sigma of a share of 3000 is ~0.026
    assert lengths.min() == 8 and lengths.max() == 32 and abs(lengths.mean() - 20) < 0.4  # sd 7.2 / sqrt(~6000)


def test_view_a_invariants_over_many_seeds(toy_corpus):
    tok = toy_corpus.tokenizer
    cfg = BatchConfig(seq_len=96, p_causal=0.15)
    rng = np.random.default_rng(1)
    n_eligible = n_picked = n_masked = n_random = n_kept = n_causal = 0
    for _ in range(400):
        chunk = toy_corpus.chunk(rng, cfg.seq_len + 1)
        tokens, roles, mntp, msg = view_a(chunk, cfg, tok, rng)
        assert chunk[0] == tok.bos_id
        if (roles == SPAN).all():  # a p_causal row: plain next-token prediction
            n_causal += 1
            assert (msg[:-1] == chunk[1:]).all() and (mntp == IGNORE).all() and (tokens == chunk).all()
            continue
        assert roles[0] == CONTEXT and tokens[0] == tok.bos_id  # BOS never masked nor in a span
        assert mntp[-1] == IGNORE and msg[-1] == IGNORE
        # labels exist exactly at the positions that predict a selected/span token, shifted by one
        is_span = roles[1:] == SPAN
        assert ((msg[:-1] != IGNORE) == is_span).all() and (msg[:-1][is_span] == chunk[1:][is_span]).all()
        picked = np.flatnonzero(mntp[:-1] != IGNORE) + 1
        assert (roles[picked] == CONTEXT).all() and (mntp[picked - 1] == chunk[picked]).all()
        assert ((mntp[:-1] != IGNORE) & (msg[:-1] != IGNORE)).sum() == 0
        unpicked = np.setdiff1d(np.arange(len(chunk)), picked)
        assert (tokens[unpicked] == chunk[unpicked]).all()  # only selected positions are ever changed
        assert (chunk[picked] != tok.bos_id).all()  # never a BOS, also not one inside the chunk
        n_eligible += int(((roles == CONTEXT) & (chunk != tok.bos_id)).sum())
        n_picked += len(picked)
        n_masked += int((tokens[picked] == tok.mask_id).sum())
        same = tokens[picked] == chunk[picked]
        n_kept += int(same.sum())
        n_random += int(((tokens[picked] != tok.mask_id) & ~same).sum())
    assert abs(n_picked / n_eligible - 0.2) < 0.01
    assert abs(n_masked / n_picked - 0.8) < 0.02
    # a random replacement can hit the original (or mask) token by chance: ~1/256 here, inside the tolerance
    assert abs(n_random / n_picked - 0.1) < 0.015 and abs(n_kept / n_picked - 0.1) < 0.015
    assert abs(n_causal / 400 - 0.15) < 0.05


def test_batch_shapes_padding_and_determinism(toy_files, toy_corpus):
    cfg = BatchConfig(batch_size=6, seq_len=64, sscl_len=20)
    pairs = read_pairs(toy_files[1])
    b1 = magnet_batch(toy_corpus, cfg, np.random.default_rng(5), pairs)
    b2 = magnet_batch(toy_corpus, cfg, np.random.default_rng(5), pairs)
    assert all((b1[k] == b2[k]).all() for k in b1)
    assert b1["tokens"].shape == b1["roles"].shape == b1["mntp_labels"].shape == (6, 65)
    pad = b1["roles"] == PAD
    assert (b1["mntp_labels"][pad] == IGNORE).all() and (b1["msg_labels"][pad] == IGNORE).all()
    st, sr, last = b1["sscl_tokens"], b1["sscl_roles"], b1["sscl_last"]
    assert st.shape[0] == 12 and (st[:, 0] == toy_files[2].bos_id).all()
    assert (st[range(12), last] == toy_files[2].eos_id).all() and (sr[range(12), last] == CONTEXT).all()
    assert ((sr == CONTEXT) | (sr == PAD)).all()
    # without pairs, views B and C are the same text (SimCSE)
    b3 = magnet_batch(toy_corpus, cfg, np.random.default_rng(5))
    assert (b3["sscl_tokens"][:6] == b3["sscl_tokens"][6:]).all()


def test_toy_world_blanks_are_determined_by_the_right_context_only():
    blanks = toy.blanks(300, seed=7)
    answers = [a for _, a, _ in blanks]
    assert set(answers) == set(toy.OBJECTS)  # all objects occur: chance from the left is 1/8
    for left, answer, right in blanks:
        assert answer not in left and right.startswith(" ") and f"The {answer} was" in right
    assert toy.blanks(5, seed=7) == blanks[:5]  # deterministic


def test_toy_pairs_scores_and_heldout_split():
    test = toy.sts_pairs(200, seed=1, split="test")
    train = toy.sts_pairs(200, seed=1, split="train")
    assert {s for _, _, s in test} == {0.0, 1.25, 2.5, 3.75, 5.0}
    assert all(a != b for a, b, _ in test)  # a paraphrase is a different surface form
    test_sentences = {a for a, _, _ in test}
    assert not test_sentences & {a for a, _, _ in train}


def test_toy_tags_are_contextual_where_the_lexicon_is_ambiguous():
    assert toy.tag_words("The drum was light/ADJ and it gave a warm light.")[1] == \
        ["DET", "NOUN", "VERB", "ADJ", "OTHER", "PRON", "VERB", "DET", "ADJ", "NOUN", "PUNCT"]
    for s in toy.tagged_sentences(50, seed=0):
        assert len(s["words"]) == len(s["pos"]) and "/" not in "".join(s["words"])


def test_corpus_cache_and_split(toy_files, tmp_path):
    corpus_path, _, tok = toy_files
    train = data.TextCorpus(corpus_path, tok, cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.tokens.npy"))
    assert len(cached) == 1
    val = data.TextCorpus(corpus_path, tok, split="val", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.tokens.npy"))) == 1  # reused, not re-tokenized
    assert len(train.starts) + len(val.starts) == 600 and len(val.starts) == 30
    assert val.starts.min() > train.starts.max()
    assert tok.decode(train.tokens[train.starts[0]:train.ends[0]]) == data.read_paragraphs(corpus_path)[0]
    changed = tmp_path / "changed.txt"
    changed.write_text("Mia found a kite.\n\nTom found a ball.\n")
    data.TextCorpus(changed, tok, cache_dir=tmp_path, val_fraction=0.5)
    assert len(list(tmp_path.glob("*.tokens.npy"))) == 2  # other source -> other cache


def test_clear_errors(tmp_path, toy_files):
    bad = tmp_path / "pairs.tsv"
    bad.write_text("a\tb\nonly one field\n")
    with pytest.raises(ValueError, match=r"pairs\.tsv, line 2: expected 'text<TAB>positive'"):
        read_pairs(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="has no text"):
        data.TextCorpus(empty, toy_files[2], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        data.TextCorpus(tmp_path / "missing.txt", toy_files[2], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        data.Tokenizer(tmp_path / "missing.model")
    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t2012\t0001\t4.0\tA man.\tA person.\ng\tf\t2012\t0002\tnot-a-number\tA.\tB.\n")
    with pytest.raises(ValueError, match=r"sts\.csv, line 2"):
        ev.read_sts(sts)
    conll = tmp_path / "c.txt"
    conll.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP\n")
    with pytest.raises(ValueError, match=r"c\.txt, line 2: expected 4 columns"):
        ev.read_conll(conll)


def test_real_readers_and_llama2_mask_token():
    assert len(ev.read_sts(shared_file("data/stsb/sts-dev.csv"))) == 1500
    assert len(ev.read_conll(shared_file("data/conll2003/valid.txt"))) == 3250
    tok = data.Tokenizer(shared_file("assets/llama2-tokenizer/tokenizer.model"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.mask_id) == (32000, 1, 2, 29918)
    assert data.Tokenizer(shared_file("assets/stories260K/tok512.model")).mask_id == 0  # no "_": unk


def test_spans_never_cover_a_bos_anywhere_in_the_chunk(toy_files):
    """WikiText-like chunks: several paragraphs (so several BOS) inside one row. In every row that has context, no
    SPAN role sits on a BOS and no MSG target is BOS; the BOS that cut a span stays CONTEXT between its parts."""
    tok, rng = toy_files[2], np.random.default_rng(0)
    cfg = BatchConfig(seq_len=128, span_min=8, span_max=32, max_spans=3, p_causal=0.1)
    hybrid_rows = spans_cut = 0
    for _ in range(3000):
        chunk = rng.integers(3, tok.vocab_size, size=129)  # ids 0-2 are unk/bos/eos: no accidental BOS
        chunk[0] = tok.bos_id
        chunk[rng.choice(np.arange(2, 128), size=int(rng.integers(1, 6)), replace=False)] = tok.bos_id
        tokens, roles, mntp, msg = view_a(chunk, cfg, tok, rng)
        if (roles == SPAN).all():  # a plain causal row may predict a document boundary, as any LM does
            continue
        hybrid_rows += 1
        is_bos = chunk == tok.bos_id
        assert not (roles[is_bos] == SPAN).any() and not (msg == tok.bos_id).any()
        assert not (tokens[is_bos] != tok.bos_id).any() and not (mntp == tok.bos_id).any()
        span = roles == SPAN
        spans_cut += int((is_bos[1:-1] & span[:-2] & span[2:]).sum())  # a BOS with span tokens on both sides
        assert (msg[:-1][span[1:]] == chunk[1:][span[1:]]).all()  # every span token is still a target
    assert hybrid_rows > 2500 and spans_cut > 100  # the case that matters happened often


def test_pieces_tokenize_like_the_whole_text_with_llama2():
    """Meta's tokenizer: encode(" under") is "▁" (29871) + "▁under", which the whole text never contains. The
    left/right ids of Tokenizer.context_ids and the choice ids of encode_after must equal the whole text's ids,
    found here independently from SentencePiece's character offsets."""
    tok = data.Tokenizer(shared_file("assets/llama2-tokenizer/tokenizer.model"))
    assert tok.encode(" under the tree.")[0] == 29871  # the defect that piecewise encoding had
    texts = ["Mia found a kite under the tree.", "The capital of France is Paris, and it's big.",
             "In 1998 , the team 's coach said : \" we 'll win \" .", "Once upon a time, Lily's cat ran away."]
    checked = 0
    for text in texts:
        # each piece's characters in the text: the pieces spell " " + text ("▁" = space, the first one the dummy)
        pieces, spans, at = tok.sp.encode(text, out_type=str), [], -1
        for piece in pieces:
            spans.append((at, at + len(piece)))
            at += len(piece)
        assert at == len(text)  # ASCII text, no byte-fallback pieces: the offsets are exact
        whole = tok.encode(text)
        for a, b in [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]:
            # the space before the gap's word belongs to the gap ("▁kite", or Llama-2's "▁" + "1998")
            want_left = [i for i, (s, e) in zip(whole, spans) if e <= a - (text[a - 1:a] == " ")]
            want_right = [i for i, (s, e) in zip(whole, spans) if s >= b]
            # the gap is one word; the spaces around it go on every side they can (a gap that takes the space after
            # it leaves a right side that starts a new word, which context_ids can only tell from a letter or digit)
            for lo, hi in ((a, b), (max(a - 1, 0), b), (a, min(b + 1, len(text)))):
                left, gap, right = text[:lo], text[lo:hi], text[hi:]
                if gap.endswith(" ") and not right[:1].isalnum():
                    continue
                left_ids, right_ids = tok.context_ids(left, right)
                assert left_ids == [tok.bos_id] + want_left and right_ids == want_right, (left, gap, right)
                # no stray "▁": only those the whole text has (Llama-2 writes " 1998" as "▁" + digits)
                assert (left_ids + right_ids).count(29871) <= whole.count(29871)
                checked += 1
    assert checked > 60
    assert tok.encode_after("The kite was red and", " it flew high.") == tok.encode("The kite was red and it flew "
                                                                                    "high.")[6:]
