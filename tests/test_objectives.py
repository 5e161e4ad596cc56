"""objectives.py: each loss against a value computed by hand, gradients only into LoRA, and over-fitting one batch."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention import CONTEXT, SPAN
from data import IGNORE, BatchConfig, Tokenizer, magnet_batch, read_pairs, view_a
from model import ModelArgs, Transformer, apply_lora
from objectives import magnet_losses, mntp_loss, msg_loss, pool, sscl_loss


class FakeTok:
    bos_id, eos_id, mask_id, vocab_size = 1, 2, 3, 4


def test_mntp_and_msg_use_the_next_token_shift_by_hand():
    # row: BOS a b c d, with a span over (b, c) and the last token d picked for MNTP
    chunk = np.array([1, 0, 2, 3, 0])
    cfg = BatchConfig(p_causal=0.0, max_spans=1, span_min=2, span_max=2, mntp_rate=1.0)
    # force a layout by hand instead of sampling: roles and labels as view_a must produce them
    roles = np.array([CONTEXT, CONTEXT, SPAN, SPAN, CONTEXT])
    msg = np.array([IGNORE, 2, 3, IGNORE, IGNORE])  # output 1 predicts token 2 (b), output 2 predicts c
    mntp = np.array([0, IGNORE, IGNORE, 0, IGNORE])  # output 0 predicts a, output 3 predicts d
    # logits: position t's log-probabilities are log(p[t]), a different distribution at every position, so a loss
    # read at the wrong position gives a different number; CE of class k at position t is -log p[t, k]
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.7, 0.1, 0.1, 0.1],
                      [0.05, 0.05, 0.05, 0.85]])
    logits = p.log()
    mntp_t, msg_t = torch.tensor(mntp), torch.tensor(msg)
    nll = F.cross_entropy(logits, torch.where(mntp_t != IGNORE, mntp_t, msg_t), reduction="none")  # serves both
    assert math.isclose(float(msg_loss(nll, msg_t)), -(math.log(0.2) + math.log(0.1)) / 2, rel_tol=1e-6)
    assert math.isclose(float(mntp_loss(nll, mntp_t)), -(math.log(0.1) + math.log(0.7)) / 2, rel_tol=1e-6)
    # and view_a really lays labels out that way: with mntp_rate=1 every context token but BOS is a target
    rng = np.random.default_rng(0)
    _, r, mn, ms = view_a(chunk, cfg, FakeTok(), rng)
    span = np.flatnonzero(r == SPAN)
    assert len(span) == 2 and (ms[span - 1] == chunk[span]).all()
    ctx = np.flatnonzero((r == CONTEXT) & (np.arange(5) > 0))
    assert (mn[ctx - 1] == chunk[ctx]).all()
    # no targets at all -> 0, not NaN
    none = torch.full((5,), IGNORE)
    assert float(mntp_loss(F.cross_entropy(logits, none, reduction="none"), none)) == 0.0


def test_sscl_infonce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    tau = 0.5
    # cosines: cos(a0,b0)=1/sqrt2, cos(a0,b1)=0, cos(a1,b0)=1/sqrt2, cos(a1,b1)=1
    s = 1 / math.sqrt(2)
    cos = [[s, 0.0], [s, 1.0]]

    def ce(row, target):
        return -(row[target] / tau - math.log(sum(math.exp(v / tau) for v in row)))

    a_to_b = (ce(cos[0], 0) + ce(cos[1], 1)) / 2
    b_to_a = (ce([cos[0][0], cos[1][0]], 0) + ce([cos[0][1], cos[1][1]], 1)) / 2
    assert math.isclose(float(sscl_loss(a, b, tau)), (a_to_b + b_to_a) / 2, rel_tol=1e-6)


def test_pooling():
    h = torch.arange(24.0).view(2, 3, 4)
    roles = torch.tensor([[CONTEXT, CONTEXT, 0], [CONTEXT, CONTEXT, CONTEXT]])
    assert torch.equal(pool(h, roles, torch.tensor([1, 2]), "last"), torch.stack([h[0, 1], h[1, 2]]))
    assert torch.allclose(pool(h, roles, None, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    # from position 1 on (an instruction prefix left out): row 0 keeps position 1 only, row 1 positions 1-2
    assert torch.allclose(pool(h, roles, None, "mean", first=1), torch.stack([h[0, 1], h[1, 1:].mean(0)]))
    with pytest.raises(ValueError, match="pooling"):
        pool(h, roles, None, "max")


def tiny_lora_model(tok):
    """A tiny random base whose embeddings have a large scale (so a frozen output layer can still express any target),
    with LoRA (dropout 0, so views B and C are identical and the test is deterministic)."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                  multiple_of=16, max_seq_len=128))
    torch.nn.init.normal_(model.tok_embeddings.weight, std=1.0)
    torch.nn.init.normal_(model.output.weight, std=0.3)
    apply_lora(model, rank=16, alpha=32, dropout=0.0)
    return model.train()


def loss_weights(w_mntp=1.0, w_msg=1.0, w_sscl=1.0):
    return dict(mntp=w_mntp, msg=w_msg, sscl=w_sscl)


def test_gradients_reach_only_lora(toy_files, toy_corpus):
    model = tiny_lora_model(toy_files[2])
    batch = magnet_batch(toy_corpus, BatchConfig(batch_size=4, seq_len=48), np.random.default_rng(0))
    magnet_losses(model, batch, loss_weights())["total"].backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
            if "lora_B" in name:
                assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_view_a_losses_equal_full_logits_in_float64(toy_files, toy_corpus):
    """magnet_losses projects onto the vocabulary only where a target is; the reference here builds every (B, T, V)
    logit, takes float64 log-softmax and averages by hand, as before that change. Values and LoRA gradients agree."""
    model = tiny_lora_model(toy_files[2])
    model.eval()  # no LoRA dropout: both computations see the same function
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B, std=0.02)  # a trained-looking adapter, not B = 0
    batch = magnet_batch(toy_corpus, BatchConfig(batch_size=4, seq_len=48), np.random.default_rng(3))
    lora = [p for p in model.parameters() if p.requires_grad]
    losses = magnet_losses(model, batch, loss_weights(w_sscl=0))
    fast = torch.autograd.grad(losses["total"], lora)

    logp = torch.log_softmax(model(batch["tokens"], batch["roles"]).double(), -1)  # (B, T, V) in float64
    reference = {}
    for name in ("mntp", "msg"):
        labels = batch[f"{name}_labels"]
        keep = labels != IGNORE
        reference[name] = -logp[keep].gather(1, labels[keep][:, None]).sum() / keep.sum()
    full = torch.autograd.grad(reference["mntp"] + reference["msg"], lora)
    for name in ("mntp", "msg"):
        assert (batch[f"{name}_labels"] != IGNORE).sum() > 0, name  # each loss has targets in this batch
        assert math.isclose(losses[name].item(), reference[name].item(), rel_tol=1e-5), name
    for g_fast, g_full in zip(fast, full):
        torch.testing.assert_close(g_fast, g_full.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weights", [dict(w_msg=0, w_sscl=0), dict(w_mntp=0, w_sscl=0),
                                     dict(w_mntp=0, w_msg=0), dict()], ids=["mntp", "msg", "sscl", "all"])
def test_overfits_one_fixed_batch(toy_files, toy_corpus, weights):
    model = tiny_lora_model(toy_files[2])
    batch = magnet_batch(toy_corpus, BatchConfig(batch_size=4, seq_len=40, sscl_len=16),
                         np.random.default_rng(0), read_pairs(toy_files[1]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(150):
        losses = magnet_losses(model, batch, loss_weights(**weights))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in losses.items()}
    trained = [k for k in ("mntp", "msg", "sscl") if weights.get(f"w_{k}", 1)] + ["total"]
    for k in trained:
        assert losses[k].item() < 0.1 * first[k], (k, first[k], losses[k].item())
