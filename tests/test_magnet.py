"""magnet.py: cached inference equals recomputation, infill keeps its context, encode is deterministic, errors."""
import numpy as np
import pytest
import torch

from attention import CONTEXT, SPAN
from data import BatchConfig, Tokenizer, magnet_batch
from checkpoint import CheckpointError, read_encoder_settings, save_checkpoint
from magnet import Magnet
from model import ModelArgs, Transformer, apply_lora
from objectives import magnet_losses
from objectives import pool

from conftest import shared_file


@pytest.fixture
def tiny(toy_files):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=toy_files[2].vocab_size,
                                  multiple_of=16, max_seq_len=96))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # peaked distributions, so greedy choices are not ties
    return Magnet(model.eval(), toy_files[2])


@pytest.fixture(scope="module")
def stories():
    return Magnet.load(shared_file("assets/stories260K/stories260K.bin"),
                       shared_file("assets/stories260K/tok512.model"))


def test_generate_with_cache_equals_recomputation(tiny):
    for temperature in (0.0, 1.0):
        a = tiny.generate("Mia found a", 20, temperature=temperature, top_p=0.9, seed=3)
        b = tiny.generate("Mia found a", 20, temperature=temperature, top_p=0.9, seed=3, use_cache=False)
        assert a == b and len(a) > 0


def test_infill_with_cache_equals_recomputation(tiny):
    for n in (1, 4):
        for temperature in (0.0, 1.0):
            kw = dict(temperature=temperature, seed=1)
            a = tiny.infill("One day, Mia found a", " under the tree. The kite was red.", n, **kw)
            b = tiny.infill("One day, Mia found a", " under the tree. The kite was red.", n, use_cache=False, **kw)
            assert a == b


def test_unknown_length_infill_with_cache_equals_recomputation(tiny):
    for temperature in (0.0, 1.0):
        kw = dict(max_tokens=5, temperature=temperature, seed=2)
        a = tiny.infill("One day, Mia found a", " under the tree. The story book was red.", **kw)
        b = tiny.infill("One day, Mia found a", " under the tree. The story book was red.", use_cache=False, **kw)
        assert a == b


def test_unknown_length_infill_picks_the_proposal_the_causal_lm_likes_best(tiny):
    """n_tokens=None: the proposals are the known-length infills of 1..max_tokens tokens, and the one returned
    maximises log p(gap + right | left) -- re-derived here in float64, one candidate at a time, full logits."""
    left_ids, right_ids = tiny.tok.context_ids("One day, Tom found a", " near the river. The big toy drum was old.")
    proposals = [tiny.infill_ids(left_ids, right_ids, n) for n in range(1, 6)]
    assert [len(p) for p in proposals] == [1, 2, 3, 4, 5]
    ref = Transformer(tiny.model.args).double().eval()
    ref.load_state_dict(tiny.model.state_dict())
    want = []
    for gap in proposals:
        row = torch.tensor([left_ids + gap + right_ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(row)[0].double(), -1)  # all-SPAN: the causal LM
        want.append(sum(float(logp[t - 1, row[0, t]]) for t in range(len(left_ids), row.shape[1])))
    got = tiny.causal_logprob(left_ids, [gap + right_ids for gap in proposals])
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-3)
    assert max(want) - sorted(want)[-2] > 1e-2  # a clear winner, so the argmax below is not a float tie
    assert tiny.infill_ids(left_ids, right_ids, max_tokens=5) == proposals[int(np.argmax(want))]
    per_token = [w / (len(gap) + len(right_ids)) for w, gap in zip(want, proposals)]  # length_score="mean"
    assert np.argmax(per_token) != np.argmax(want)  # here the two rules choose differently
    assert tiny.infill_ids(left_ids, right_ids, max_tokens=5, length_score="mean") == \
        proposals[int(np.argmax(per_token))]
    with pytest.raises(ValueError, match="length_score='max': expected 'sum' or 'mean'"):
        tiny.infill_ids(left_ids, right_ids, max_tokens=5, length_score="max")


def test_infill_feeds_exactly_the_given_context(tiny, monkeypatch):
    """Every forward pass sees BOS + left + right unchanged at its CONTEXT positions; only SPAN tokens are new."""
    left, right = "Tom found a", " near the river. The ball was blue."
    want = [tiny.tok.bos_id] + tiny.tok.encode(left) + tiny.tok.encode(right)
    seen, forward = [], tiny.model.forward

    def spy(tokens, roles=None, *args, **kwargs):
        seen.append((tokens.clone(), roles.clone()))
        return forward(tokens, roles, *args, **kwargs)

    monkeypatch.setattr(tiny.model, "forward", spy)
    tiny.infill(left, right, 3, use_cache=False)
    for tokens, roles in seen:
        assert tokens[roles == CONTEXT].tolist() == want and int((roles == SPAN).sum()) == 3
    seen.clear()
    tiny.infill(left, right, 3)
    assert seen[0][0][0].tolist() == want and (seen[0][1] == CONTEXT).all()
    assert all(t.shape == (1, 1) and (r == SPAN).all() for t, r in seen[1:])


def test_infill_with_llama2_tokenizer_feeds_the_whole_texts_ids(monkeypatch):
    """With Meta's tokenizer, infill's context is the whole text's ids minus the gap's: no stray "▁" (29871) from
    encoding " under the tree." alone, which shifted every right-context position by one."""
    tok = Tokenizer(shared_file("assets/llama2-tokenizer/tokenizer.model"))
    m = Magnet(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32000, max_seq_len=64)).eval(), tok)
    whole = tok.encode("Mia found a kite under the tree.")
    assert [tok.sp.id_to_piece(i) for i in whole[4:6]] == ["▁k", "ite"]  # the gap
    want = [tok.bos_id] + whole[:4] + whole[6:]
    seen, forward = [], m.model.forward
    monkeypatch.setattr(m.model, "forward", lambda tokens, roles=None, *a, **k: seen.append((tokens, roles)) or
                        forward(tokens, roles, *a, **k))
    for left, right in (("Mia found a", " under the tree."), ("Mia found a ", " under the tree."),
                        ("Mia found a", "under the tree.")):
        for use_cache in (True, False):
            seen.clear()
            m.infill(left, right, 2, use_cache=use_cache)
            tokens, roles = seen[0]
            assert tokens[roles == CONTEXT].tolist() == want and 29871 not in tokens[0].tolist()


def test_sscl_noise_makes_the_two_views_differ_and_leaves_view_a_alone(toy_files, toy_corpus):
    """No pairs: views B and C are the same tokens. At step 0 (LoRA B = 0, so LoRA dropout does nothing) only
    sscl_dropout makes them differ; view A's losses do not depend on it."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=toy_files[2].vocab_size, max_seq_len=160))
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    batch = magnet_batch(toy_corpus, BatchConfig(batch_size=16, seq_len=64), np.random.default_rng(0))
    b, c = batch["sscl_tokens"].chunk(2)
    assert torch.equal(b, c)

    forward, results = model.forward, []

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        results.append((kwargs.get("compute_logits", True), out))
        return out

    model.forward = spy
    for sscl_dropout in (0.0, 0.3):
        torch.manual_seed(1)
        results.clear()
        magnet_losses(model.train(), batch, dict(mntp=1.0, msg=1.0, sscl=1.0), sscl_dropout=sscl_dropout)
        (_, logits_a), (_, hidden_bc) = results  # view A's forward, then views B and C's
        z_b, z_c = pool(hidden_bc.detach(), batch["sscl_roles"], batch["sscl_last"]).chunk(2)
        cosine = float(torch.nn.functional.cosine_similarity(z_b, z_c).mean())
        if sscl_dropout == 0:
            assert cosine > 0.9999  # the defect: identical views make SSCL trivial
            no_noise_a = logits_a.detach()
        else:
            assert cosine < 0.99
            assert torch.equal(logits_a.detach(), no_noise_a)  # view A is untouched by the SSCL noise
    del model.forward
    # inference (eval mode) draws no noise: neither attention dropout nor LoRA dropout
    m = Magnet(model.eval(), toy_files[2])
    assert torch.equal(m.encode(["Mia found a kite."]), m.encode(["Mia found a kite."]))


def test_encode_is_deterministic_and_padding_free(tiny):
    texts = ["Mia found a kite.", "A ball was lost by Tom near the river."]
    a, b = tiny.encode(texts), tiny.encode(texts)
    assert a.shape == (2, 48) and torch.equal(a, b)
    # batching (and so padding) does not change a text's vector
    assert torch.allclose(tiny.encode(texts[:1])[0], a[0], atol=1e-5)
    assert torch.allclose(tiny.encode(texts, pooling="mean", batch_size=1), tiny.encode(texts, pooling="mean"),
                          atol=1e-5)
    pieces, feats = tiny.token_features("Mia found a kite.")
    assert len(pieces) == feats.shape[0] and feats.shape[1] == 48 and pieces[0] == "▁Mia"


def test_mean_pooling_leaves_the_instruction_out(tiny):
    """With an instruction, the mean runs over the text and EOS only (BOS and the instruction attend and are attended
    to, but are not averaged: LLM2Vec's rule); without one, over every real position. Re-derived in float64."""
    texts, instruction = ["Mia found a kite.", "A ball."], "Find the same story: "
    m = Magnet(tiny.model, tiny.tok, pooling="mean", instruction=instruction)
    model64 = Transformer(tiny.model.args).double()
    model64.load_state_dict(tiny.model.state_dict())
    for text, vector in zip(texts, m.encode(texts)):
        prefix = [tiny.tok.bos_id] + tiny.tok.encode(instruction)
        ids = torch.tensor([prefix + tiny.tok.encode(text) + [tiny.tok.eos_id]])
        hidden = model64(ids, torch.full_like(ids, CONTEXT), compute_logits=False)[0]  # (T, dim)
        assert torch.allclose(vector.double(), hidden[len(prefix):].mean(0), atol=1e-5)
        assert not torch.allclose(vector.double(), hidden.mean(0), atol=1e-3)
    plain = Magnet(tiny.model, tiny.tok, pooling="mean").encode(texts[:1])[0]
    ids = torch.tensor([tiny.tok.encode(texts[0], bos=True) + [tiny.tok.eos_id]])
    hidden = model64(ids, torch.full_like(ids, CONTEXT), compute_logits=False)[0]
    assert torch.allclose(plain.double(), hidden.mean(0), atol=1e-5)


def test_batched_and_causal_encoders_read_each_text_alone(tiny):
    """token_features over a padded batch equals one text at a time; attention="causal" (the base's way to encode)
    equals the plain causal forward: piece t's vector is its own output, sentence vectors ignore padding."""
    texts = ["Mia found a kite.", "A kite.", "Under the old tree, Tom found a red kite and a ball."]
    for attention in ("bidirectional", "causal"):
        m = Magnet(tiny.model, tiny.tok, attention=attention)
        batched = m.token_features(texts)
        for text, (pieces, feats) in zip(texts, batched):
            alone_pieces, alone = m.token_features(text)
            assert pieces == alone_pieces and torch.allclose(feats, alone, atol=1e-5)
        assert torch.allclose(m.encode(texts)[1], m.encode(texts[1:2])[0], atol=1e-5)
    ids = torch.tensor([tiny.tok.encode(texts[2], bos=True)])
    causal = tiny.model(ids, compute_logits=False)[0]  # roles None: all SPAN, the ordinary causal LM
    assert torch.allclose(batched[2][1], causal[1:], atol=1e-5)
    assert not torch.allclose(Magnet(tiny.model, tiny.tok).token_features(texts[2])[1], causal[1:], atol=1e-3)
    with pytest.raises(ValueError, match="attention="):
        Magnet(tiny.model, tiny.tok, attention="sideways")


def test_bad_input_gets_clear_errors(tiny, tmp_path, toy_files):
    with pytest.raises(ValueError, match="n_tokens must be an int > 0, got 0"):
        tiny.infill("a", "b", 0)
    with pytest.raises(TypeError, match="n_tokens must be an int > 0, got 2.5"):
        tiny.infill("a", "b", 2.5)
    with pytest.raises(TypeError, match="left must be a str, got None"):
        tiny.infill(None, "b", 1)
    with pytest.raises(TypeError, match="text must be a str, got 5"):
        tiny.token_features(5)
    with pytest.raises(TypeError, match="text must be a str, got None"):
        tiny.token_features(["Mia found a kite.", None, "A kite."])
    with pytest.raises(TypeError, match="prompt must be a str"):
        tiny.generate(["Mia"], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int > 0, got -1"):
        tiny.generate("Mia", -1)
    with pytest.raises(ValueError, match="max_seq_len is 96"):
        tiny.infill("Mia found a", "kite", 200)
    with pytest.raises(ValueError, match="both empty"):
        tiny.infill(" ", "", 2)
    with pytest.raises(ValueError, match="both empty"):
        tiny.infill("", "")
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"max_tokens must be an int > 0, got {bad}"):
            tiny.infill("Mia found a", " under the tree.", max_tokens=bad)
    with pytest.raises(ValueError, match="max_seq_len is 96"):
        tiny.infill("Mia found a", " under the tree.", max_tokens=200)
    with pytest.raises(ValueError, match="at least one left token"):
        tiny.infill_ids([], [5, 6], 2)
    for ids in ([1, 10 ** 6], [1, -1], [1, 2.0]):
        with pytest.raises(ValueError, match=r"must be token ids in \[0, "):
            tiny.infill_ids(ids, [5, 6], 2)
    for kw in (dict(temperature="0.5"), dict(top_p=None), dict(seed="x"), dict(seed=2 ** 70), dict(seed=True)):
        with pytest.raises(TypeError, match="temperature and top_p must be numbers and seed an int"):
            tiny.generate("Mia", 3, **kw)
    with pytest.raises(ValueError, match="batch_size must be an int > 0, got 0"):
        tiny.encode(["fine"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an int > 0, got 0"):
        tiny.token_features("fine", batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len is 96"):
        tiny.generate("Mia", 500)
    with pytest.raises(ValueError, match="non-empty list"):
        tiny.encode("not a list")
    with pytest.raises(ValueError, match="non-empty list"):
        tiny.encode(["fine", ""])
    with pytest.raises(ValueError, match="non-empty text"):
        tiny.token_features("")
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(temperature=float("nan")),
                dict(temperature=float("inf"))):
        with pytest.raises(ValueError, match="temperature >= 0 .* 0 < top_p <= 1"):
            tiny.generate("Mia", 3, **bad)
        with pytest.raises(ValueError, match="temperature >= 0 .* 0 < top_p <= 1"):
            tiny.infill("Mia found a", " under the tree.", 1, **bad)
    save_checkpoint(Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=100)), tmp_path / "c")
    with pytest.raises(CheckpointError, match="100 tokens but the tokenizer's has 256"):
        Magnet.load(tmp_path / "c", toy_files[2].path)


def test_real_stories260k_generates_and_infills(stories):
    text = stories.generate("Once upon a time", 30)
    assert text == stories.generate("Once upon a time", 30, use_cache=False)
    assert "there was" in text or "named" in text  # greedy TinyStories English (checked in float64 elsewhere)
    fill = stories.infill("Once upon a time, there was a little", " named Lily.", 2)
    assert fill == stories.infill("Once upon a time, there was a little", " named Lily.", 2, use_cache=False)


def test_a_damaged_magnet_json_names_itself(tmp_path):
    assert read_encoder_settings(tmp_path) == {}  # a plain base: no settings
    for text, message in (("{bad", "not valid JSON"), ("[1]", "expected a JSON object of the settings"),
                          ('{"instructoin": "x"}', "expected the settings")):
        (tmp_path / "magnet.json").write_text(text)
        with pytest.raises(CheckpointError, match=r"magnet\.json: " + message):
            read_encoder_settings(tmp_path)
    (tmp_path / "magnet.json").write_text('{"instruction": "Retrieve: ", "pooling": "mean"}')
    assert read_encoder_settings(tmp_path) == {"instruction": "Retrieve: ", "pooling": "mean"}


def test_encoding_a_long_list_shows_progress(tiny, capsys):
    texts = [f"Mia found {n} kites." for n in range(12)]
    vectors = tiny.encode(texts, batch_size=4)
    assert "encode" in capsys.readouterr().err  # three batches: a progress bar
    assert torch.allclose(vectors, torch.cat([tiny.encode(texts[i:i + 4]) for i in range(0, 12, 4)]), atol=1e-5)
    tiny.encode(texts[:4], batch_size=4)
    assert "encode" not in capsys.readouterr().err  # one batch: none


def test_token_id_arguments_and_gap_lengths_are_checked_first(tiny):
    """Bad ids, an empty prefix, no continuation, or an unknown-length gap too long to decode at once (one cached row
    per candidate length): a clear error naming the argument, before anything is allocated."""
    left, right = tiny.tok.context_ids("Mia found a", " under the tree.")
    assert tiny.infill_ids(torch.tensor(left), torch.tensor(right), 2) == tiny.infill_ids(left, right, 2)  # tensors
    for call, message in ((lambda: tiny.infill_ids(torch.tensor([left, left]), right, 2), "left_ids must be token ids"),
                          (lambda: tiny.infill_ids(left, [10 ** 6], 2), r"right_ids must be token ids"),
                          (lambda: tiny.infill(left="Mia", right=" tree.", max_tokens=70), "at most 64 tokens"),
                          (lambda: tiny.infill(left="Mia", right=" tree.", max_tokens=10 ** 9), "max_seq_len is 96"),
                          (lambda: tiny.causal_logprob([], [[5]]), "a prefix of at least one token"),
                          (lambda: tiny.causal_logprob(left, []), "at least one continuation"),
                          (lambda: tiny.causal_logprob(left, [[5], "x"]), "each continuation must be")):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match=r"n_tokens must be an int > 0, got tensor\(\[2\]\)"):
        tiny.infill_ids(left, right, torch.tensor([2]))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vectors_do_not_depend_on_the_batch(tiny, pooling):
    """encode / token_features of a batch equal those of each text alone, whatever the lengths and their order (the
    padding is masked out, positions are each row's own); a text too long for the model is an error, not a vector."""
    texts = ["Mia found a kite.", "Under the tree, Tom spotted a big toy drum and it made a loud sound.", "A ball.",
             "Lily and Ben played with the shiny old oil lamp all day."]
    alone = torch.cat([tiny.encode([t], pooling=pooling) for t in texts])
    torch.testing.assert_close(tiny.encode(texts, pooling=pooling), alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(tiny.encode(texts[::-1], pooling=pooling).flip(0), alone, rtol=0, atol=1e-5)
    for (pieces, feats), text in zip(tiny.token_features(texts), texts):
        single_pieces, single = tiny.token_features(text)
        assert pieces == single_pieces
        torch.testing.assert_close(feats, single, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len is 96"):
        tiny.encode(texts[:1] + ["Mia found a kite. " * 40])
