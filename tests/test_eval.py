"""eval.py: metrics against hand-computed values, every suite on a tiny model, the real stories260K on STS-B and
CoNLL-2003, no test data in the probe, determinism, and clear errors."""
import json
import shutil

import pytest
import torch

import data
import eval as ev
import toy
from checkpoint import save_checkpoint
from model import ModelArgs, Transformer

from conftest import shared_file


def test_rep_n_and_rep_sen_by_hand():
    # bigrams of a b a b a: ab ba ab ba -> 2 unique of 4 -> 1 - 2/4
    assert ev.rep_n([1, 2, 1, 2, 1], 2) == 0.5
    assert ev.rep_n([1, 2, 3], 2) == 0.0 and ev.rep_n([1], 2) is None
    # trigrams of a a a a: aaa aaa -> 1 - 1/2
    assert ev.rep_n([7, 7, 7, 7], 3) == 0.5
    # 4 sentences, the 3rd and 4th repeat earlier ones (case and spacing aside) -> 2/4
    assert ev.rep_sen("The cat sat. A dog ran!  the cat sat. A dog ran!") == 0.5
    assert ev.rep_sen("One. Two. Three.") == 0.0 and ev.rep_sen("") is None


def test_spearman_with_ties_by_hand():
    # x ranks: 1, 2.5, 2.5, 4 ; y ranks: 1, 2, 3, 4
    # pearson of ranks: dx = -1.5, 0, 0, 1.5 ; dy = -1.5, -.5, .5, 1.5 -> 4.5 / sqrt(4.5 * 5)
    assert ev.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert list(ev.ranks([3, 1, 3, 2])) == [3.5, 1.0, 3.5, 2.0]
    assert ev.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_entity_f1_on_iob2_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    # sentence 1: PER right, LOC typed wrong; sentence 2: ORG missed, an extra MISC
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-MISC"]]
    # gold 3 entities, predicted 3, 1 correct -> F1 = 2*1 / (3+3)
    assert ev.entity_f1(gold, pred) == pytest.approx(1 / 3)
    assert ev.entities(["I-LOC", "I-LOC", "B-LOC"]) == {("LOC", 0, 2), ("LOC", 2, 3)}
    assert ev.entity_f1(gold, gold) == 1.0


def test_blanks_are_the_whole_texts_ids_split_in_three(toy_files, tmp_path):
    """Toy blanks: left + gap + right is the whole story's ids, and the gaps are 1-4 tokens, each length present.
    Text-file blanks: 1..max_gap tokens cut from a held-out passage, BOS kept at the left."""
    from types import SimpleNamespace
    m = SimpleNamespace(tok=toy_files[2])
    cfg = ev.EvalConfig(limit=40)
    toy_blanks = ev.blanks(m, cfg)
    expected = toy.blanks(40, toy.EVAL_SEED)
    for (left_ids, gap, right_ids, left), (_, answer, right) in zip(toy_blanks, expected):
        assert left_ids + gap + right_ids == toy_files[2].encode(left + " " + answer + right, bos=True)
    assert {len(gap) for _, gap, _, _ in toy_blanks} == {1, 2, 3, 4}
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(toy.stories(60, 5)))
    cfg = ev.EvalConfig(text_data=str(text), limit=0, max_gap=6, cache_dir=str(tmp_path))
    passages = ev.held_out_passages(cfg, toy_files[2])
    text_blanks = ev.blanks(m, cfg)
    assert len(text_blanks) == len(passages) and {len(g) for _, g, _, _ in text_blanks} <= set(range(1, 7))
    for (left_ids, gap, right_ids, left), p in zip(text_blanks, passages):
        whole = left_ids[1:] + gap + right_ids
        assert left_ids[0] == p[0] == toy_files[2].bos_id and left is None
        assert any(p[i:i + len(whole)] == whole for i in range(len(p)))


def test_blank_metrics_count_exact_match_and_length(toy_files, monkeypatch, tmp_path):
    """A model that fills every told gap right, and when not told returns the gap plus one token: oracle EM 1,
    unknown-length EM 0, length exact 0, length within one 1."""
    from magnet import Magnet
    tok = toy_files[2]
    m = Magnet(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=tok.vocab_size)).eval(), tok)
    truth = {(tuple(left), tuple(right)): gap for left, gap, right, _ in ev.blanks(m, ev.EvalConfig(limit=10))}
    monkeypatch.setattr(m, "infill_ids", lambda left_ids, right_ids, n_tokens=None, max_tokens=8, **_:
                        truth[tuple(left_ids), tuple(right_ids)] + ([] if n_tokens else [5]))
    got = ev.blank_metrics(m, ev.EvalConfig(limit=10))
    assert {k: v for k, v in got.items() if k != "blank_em_left_only"} == dict(
        blank_em_hybrid=1.0, blank_em_unknown_length=0.0, blank_length_exact=0.0, blank_length_within_1=1.0)
    short = tmp_path / "short.txt"  # 40 paragraphs of a few tokens: the held-out 2 have no room for a blank
    short.write_text("\n\n".join(["A kite.", "A ball."] * 20))
    with pytest.raises(ev.EvalError, match="no held-out passage is long enough"):
        ev.blank_metrics(m, ev.EvalConfig(text_data=str(short), cache_dir=str(tmp_path)))


def test_row_nll_equals_a_float64_sum_one_row_at_a_time(toy_files):
    """row_nll batches rows of unequal length (padded); the reference runs each row alone, unpadded, takes a float64
    log-softmax of its logits and sums -log p of the labelled tokens by hand. Mixed roles (a gap row), sparse
    targets, a row with a single target."""
    from magnet import Magnet
    m = Magnet(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=toy_files[2].vocab_size,
                                     multiple_of=16)).eval(), toy_files[2])
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (9, 23, 5, 17, 2):
        tokens = torch.randint(4, toy_files[2].vocab_size, (n,), generator=g).tolist()
        roles = torch.randint(data.CONTEXT, data.SPAN + 1, (n,), generator=g).tolist()
        keep = torch.rand(n, generator=g) < 0.5
        labels = [t if k else data.IGNORE for t, k in zip(tokens[1:] + [data.IGNORE], keep)]
        labels[0] = tokens[1]  # at least one target per row
        rows.append((tokens, roles, labels))
    got = ev.row_nll(m, rows, batch_size=2)  # 3 batches, padded
    for (tokens, roles, labels), (total, count) in zip(rows, got):
        with torch.no_grad():
            logp = torch.log_softmax(m.model(torch.tensor([tokens]), torch.tensor([roles]))[0].double(), -1)  # (n, V)
        want = [-logp[t, y].item() for t, y in enumerate(labels) if y != data.IGNORE]
        assert count == len(want) and total == pytest.approx(sum(want), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_ckpt(toy_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalckpt") / "tiny"
    torch.manual_seed(0)
    save_checkpoint(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=toy_files[2].vocab_size,
                                          multiple_of=16, max_seq_len=256)), d)
    shutil.copyfile(toy_files[2].path, d / "tokenizer.model")
    return d


def run(argv, capsys=None):
    code = ev.main(argv)
    return code, (capsys.readouterr() if capsys else None)


def test_every_suite_runs_on_a_tiny_model_and_is_deterministic(tiny_ckpt, tmp_path, capsys):
    args = [f"--ckpt=a={tiny_ckpt}", f"--ckpt=b={tiny_ckpt}", "--limit=12", "--cont_len=16"]
    assert run(args + [f"--out={tmp_path / 'r1.json'}"])[0] == 0
    assert run(args + [f"--out={tmp_path / 'r2.json'}"])[0] == 0
    table = capsys.readouterr().out
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("r1.json", "r2.json"))
    assert r1["results"] == r2["results"]
    assert r1["results"]["a"] == r1["results"]["b"]
    assert set(r1["results"]["a"]) == set(ev.SUITES)
    assert "| sts | spearman |" in table and "| infill | blank_em_hybrid |" in table
    assert r1["data"]["sts"] == {"path": "toy"} and r1["settings"]["limit"] == 12


def test_the_probe_trains_on_train_and_stops_on_dev_only(tiny_ckpt, monkeypatch):
    seen = []
    real = ev.train_probe

    def spy(x, y, x_dev, y_dev, *rest):
        seen.append((x, x_dev))
        return real(x, y, x_dev, y_dev, *rest)

    monkeypatch.setattr(ev, "train_probe", spy)
    cfg = ev.EvalConfig(limit=10, probe_train=20)
    m = ev.load(str(tiny_ckpt), cfg)[1]
    ev.suite_token(m, cfg)

    def features(n, seed):
        return torch.cat(ev.word_features(m, [s["words"] for s in toy.tagged_sentences(n, seed)]))

    (x, x_dev), = seen  # one task (toy POS tags)
    held_out = toy.EVAL_SEED + cfg.seed
    assert torch.equal(x, features(20, held_out + 10)) and torch.equal(x_dev, features(10, held_out + 11))


def test_multiple_choice_scores_only_the_choice_as_in_the_whole_text():
    """Meta's tokenizer: the scored pieces of " it flew high." are those it has after the context (no stray "▁")."""
    tok = data.Tokenizer(shared_file("assets/llama2-tokenizer/tokenizer.model"))
    context, choice = "The kite was red and", " it flew high."
    whole = tok.encode(context + choice, bos=True)
    assert [tok.sp.id_to_piece(i) for i in whole[:7]][-2:] == ["▁red", "▁and"]  # 7 context ids, BOS included
    for ctx in (context, context + " "):  # a trailing space moves to the choice, as lm-evaluation-harness does
        (tokens, roles, labels), = ev.choice_rows(tok, ctx, [choice.lstrip() if ctx.endswith(" ") else choice])
        assert tokens == whole and [t for t in labels if t != ev.IGNORE] == whole[7:] and 29871 not in tokens


def test_acc_norm_divides_by_the_choices_characters(monkeypatch, tiny_ckpt):
    """Choice 0 (" a": 2 characters, NLL 2.0) beats choice 1 (" bbbbbbbb": 9 characters, NLL 5.0) summed; per
    character it is 1.0 vs 0.56, so acc_norm takes choice 1; per token (1 vs 2 tokens: 2.0 vs 2.5) it would not."""
    item = dict(context="x", choices=[" a", " bbbbbbbb"], label=1)
    monkeypatch.setattr(ev, "row_nll", lambda m, rows: [(2.0, 1), (5.0, 2)])
    monkeypatch.setattr(ev, "read_mc", lambda path: [item])
    m = ev.load(str(tiny_ckpt), ev.EvalConfig())[1]
    assert ev.suite_mc(m, ev.EvalConfig(mc_data="items.jsonl")) == {"acc": 0.0, "acc_norm": 1.0}


def test_limit_never_cuts_the_probe_training_split(tmp_path):
    sentence = "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
    for name, n in (("train.txt", 30), ("valid.txt", 12), ("test.txt", 12)):
        (tmp_path / name).write_text("-DOCSTART- -X- -X- O\n\n" + sentence * n)
    sizes = lambda **kw: {k: len(v) for k, v in ev.token_splits(ev.EvalConfig(token_data=str(tmp_path), **kw)).items()}
    assert sizes(limit=5) == dict(train=30, dev=5, test=5)
    assert sizes(limit=0, probe_train=7) == dict(train=7, dev=12, test=12)


def test_real_stories260k_on_stsb_and_conll(tmp_path, capsys):
    bin_path = shared_file("assets/stories260K/stories260K.bin")
    tok = shared_file("assets/stories260K/tok512.model")
    sts = shared_file("data/stsb/sts-test.csv")
    conll = shared_file("data/conll2003/train.txt").parent
    code, out = run([f"--ckpt=stories={bin_path}", f"--tokenizer={tok}", "--suite=sts,token", f"--sts_data={sts}",
                     f"--token_data={conll}", "--limit=60", "--probe_train=200", f"--out={tmp_path / 'r.json'}"], capsys)
    assert code == 0, out.err
    r = json.loads((tmp_path / "r.json").read_text())
    res = r["results"]["stories"]
    assert -100 <= res["sts"]["spearman"] <= 100
    # a 260K-parameter model of children's stories, 512 pieces: CoNLL's newswire is far from it, so only check
    # that the probe beats uniform guessing over ~40 POS tags by a wide margin (RESULTS.md reports the numbers)
    assert res["token"]["pos_acc"] > 0.1 and 0 <= res["token"]["ner_f1"] <= 1
    assert r["data"]["sts"]["bytes"] == sts.stat().st_size and len(r["data"]["sts"]["sha256"]) == 16


def test_clear_errors_and_keep_going(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a", "label": 5}\n')
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=mc", f"--mc_data={bad}", f"--out={tmp_path / 'x.json'}"],
                    capsys)
    assert code == 1 and "mc.jsonl, line 2" in out.err
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=mc,ppl", f"--mc_data={bad}", "--keep_going=true",
                     "--limit=5", f"--out={tmp_path / 'k.json'}"], capsys)
    r = json.loads((tmp_path / "k.json").read_text())["results"]
    assert code == 0 and "line 2" in r[str(tiny_ckpt)]["mc"]["error"] and r[str(tiny_ckpt)]["ppl"]["ppl"] > 1
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=sts", f"--sts_data={tmp_path / 'none.csv'}"], capsys)
    assert code == 1 and "none.csv: data file not found" in out.err
    code, out = run([f"--ckpt={tmp_path / 'nowhere'}", "--suite=ppl", f"--tokenizer={tiny_ckpt / 'tokenizer.model'}"],
                    capsys)
    assert code == 1 and "no such checkpoint" in out.err
    other = toy.train_tokenizer(toy.stories(300, 0), tmp_path / "t512.model", 512).path
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=ppl", f"--tokenizer={other}"], capsys)
    assert code == 1 and "256 tokens but the tokenizer's has 512" in out.err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=sts", f"--sts_data={empty}"], capsys)
    assert code == 1 and "no sentence pairs" in out.err
    code, out = run(["--suite=ppl,nonsense", f"--ckpt={tiny_ckpt}"], capsys)
    assert code == 1 and "nonsense" in out.err
    code, out = run([f"--ckpt={tmp_path / 'nope'}", "--suite=ppl"], capsys)  # not "no tokenizer for ..."
    assert code == 1 and f"no such checkpoint {tmp_path / 'nope'}" in out.err
    code, out = run([f"--ckpt={tiny_ckpt}::{tmp_path / 'none.pt'}", "--suite=ppl"], capsys)
    assert code == 1 and f"no such checkpoint {tmp_path / 'none.pt'}" in out.err
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=ppl", "--keep_going=yes"], capsys)
    assert code == 1 and "--keep_going=yes: keep_going expects bool" in out.err
    sts_rows = lambda *scores: "".join(f"g\tx\t2015\t{i}\t{s}\tA cat.\tA dog {i}.\n" for i, s in enumerate(scores))
    for scores, message in (((1.0, float("nan"), 2.0), "line 2: expected >= 7 tab-separated fields with a finite"),
                            ((3.0,), "needs >= 2 pairs with different gold scores (1 pairs"),
                            ((2.0, 2.0, 2.0), "(3 pairs, 1 distinct scores)")):
        (tmp_path / "s.csv").write_text(sts_rows(*scores))
        code, out = run([f"--ckpt={tiny_ckpt}", "--suite=sts", f"--sts_data={tmp_path / 's.csv'}",
                         f"--out={tmp_path / 's.json'}"], capsys)
        assert code == 1 and message in out.err and not (tmp_path / "s.json").exists(), out.err
    (tmp_path / "conll").mkdir()
    (tmp_path / "conll" / "train.txt").write_text("EU NNP B-NP B-ORG\n")
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=token", f"--token_data={tmp_path / 'conll'}"], capsys)
    assert code == 1 and "valid.txt" in out.err and "test.txt: data file not found" in out.err
    (tmp_path / "latin1.csv").write_bytes("g\tx\t2015\t0\t1.0\tcaf\xe9\tb\n".encode("latin-1"))
    code, out = run([f"--ckpt={tiny_ckpt}", "--suite=sts", f"--sts_data={tmp_path / 'latin1.csv'}"], capsys)
    assert code == 1 and "latin1.csv: not UTF-8 text" in out.err


def test_the_output_is_checked_first_never_overwritten_and_the_table_printed_first(tiny_ckpt, tmp_path, capsys,
                                                                                   monkeypatch):
    args = [f"--ckpt={tiny_ckpt}", "--suite=ppl", "--limit=4"]
    code, out = run(args + [f"--out={tmp_path / 'missing' / 'r.json'}"], capsys)
    assert code == 1 and "does not exist" in out.err and "ppl" not in out.out  # refused before any evaluation
    assert run(args + [f"--out={tmp_path / 'r.json'}"], capsys)[1].err.endswith(f"wrote {tmp_path / 'r.json'}\n")
    before = (tmp_path / "r.json").read_text()
    code, out = run(args + [f"--out={tmp_path / 'r.json'}"], capsys)
    assert code == 1 and "already exists; pass --overwrite=true" in out.err
    monkeypatch.setattr(ev.Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    code, out = run(args + [f"--out={tmp_path / 'r.json'}", "--overwrite=true"], capsys)
    assert code == 1 and "| ppl | ppl |" in out.out and "disk full" in out.err  # the table came out anyway
    assert (tmp_path / "r.json").read_text() == before  # and the old file is intact
    report = json.loads(before)
    assert report["provenance"]["commit"] and report["provenance"]["cpu_cores"] >= 1


def test_word_features_take_each_words_first_piece(tiny_ckpt):
    m = ev.load(str(tiny_ckpt), ev.EvalConfig())[1]
    words = ["Under", "the", "tree,", "Tom", "discovered", "a", "lamp."]
    pieces, feats = m.token_features(" ".join(words))
    firsts = [i for i, p in enumerate(pieces) if p.startswith("▁")]  # SentencePiece marks a word start with ▁
    assert len(firsts) == len(words) < len(pieces)  # some words span several pieces
    assert torch.equal(ev.word_features(m, [words])[0], feats[firsts])


def test_checkpoint_options_set_how_a_model_encodes(tiny_ckpt):
    name, m = ev.load(f"base={tiny_ckpt}#attention=causal,pooling=mean", ev.EvalConfig())
    assert (name, m.attention, m.pooling) == ("base", "causal", "mean")
    assert ev.run_config(f"base={tiny_ckpt}#attention=causal") is None  # the options are not part of the path
    with pytest.raises(ev.EvalError, match="attention=causal"):
        ev.load(f"{tiny_ckpt}#attention=sideways", ev.EvalConfig())


def test_bad_options_fail_before_any_evaluation(tiny_ckpt, tmp_path, capsys):
    out = f"--out={tmp_path / 'r.json'}"
    for argv, message in (
        ([f"--ckpt=a={tiny_ckpt}", f"--ckpt=a={tiny_ckpt}", out], "two --ckpt have the same name"),
        ([f"--ckpt={tiny_ckpt}::", out], "with no empty part"),
        ([f"--ckpt={tiny_ckpt}", f"--out={tmp_path}"], "is a directory; expected the path of a JSON file"),
        ([f"--ckpt={tiny_ckpt}", "--gap=0", out], "out of range: gap=0"),
        ([f"--ckpt={tiny_ckpt}", "--limit=-1", out], "out of range: limit=-1"),
        ([f"--ckpt={tiny_ckpt}", "--device=foo", out], "out of range: device=foo"),
        ([f"--ckpt={tiny_ckpt}", "--suite=repetition", "--prefix_len=100000", out], "longer than prefix_len=100000"),
        ([f"--ckpt={tiny_ckpt}", "--suite=infill", "--gap=100000", "--limit=3", out], "long enough to score"),
    ):
        code, res = run(argv + (["--suite=ppl"] if not any(a.startswith("--suite") for a in argv) else []), capsys)
        assert code == 1 and message in res.err and "Traceback" not in res.err, (argv, res.err)
        assert not (tmp_path / "r.json").exists()


def test_sts_reads_the_stsb_layout_and_plain_pairs_alike(tmp_path):
    pairs = [("A man is playing a flute.", "A man plays a flute.", 4.2), ("A cat sleeps.", "Two dogs run.", 0.5)]
    stsb, plain = tmp_path / "sts-dev.csv", tmp_path / "pairs.tsv"
    stsb.write_text("".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s}\t{a}\t{b}\textra\n"
                            for i, (a, b, s) in enumerate(pairs)))
    plain.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in pairs))
    assert ev.read_sts(stsb) == ev.read_sts(plain) == pairs
    plain.write_text(f"{pairs[0][0]}\t{pairs[0][1]}\t4.2\nsentence1\tsentence2\tscore\n")  # a header only on line 1
    with pytest.raises(ev.EvalError, match=r"pairs\.tsv, line 2: .*sentence1<TAB>sentence2<TAB>score"):
        ev.read_sts(plain)


def test_an_out_file_that_appears_during_the_run_is_not_replaced(tiny_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    real = ev.SUITE_FUNCTIONS["ppl"]

    def meanwhile(m, cfg):  # another process writes the same --out while this one evaluates
        out.write_text("theirs")
        return real(m, cfg)

    monkeypatch.setitem(ev.SUITE_FUNCTIONS, "ppl", meanwhile)
    code, res = run([f"--ckpt={tiny_ckpt}", "--suite=ppl", "--limit=4", f"--out={out}"], capsys)
    assert code == 1 and "appeared while this ran" in res.err and out.read_text() == "theirs"
    kept, = tmp_path.glob(".r.json.*.tmp")  # this run's results, named in the message
    assert str(kept) in res.err and "| ppl | ppl |" in res.out and json.loads(kept.read_text())["results"]
