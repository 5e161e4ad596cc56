"""The hybrid mask (docs/design.md §3): its rule re-derived by loops, its semantics through the public forward, and the
agreement of the fused `sdpa` path with the `math` reference (values and gradients)."""
import itertools
from unittest.mock import patch

import pytest
import torch

from attention import CONTEXT, PAD, SPAN, hybrid_mask, plan_attention
from model import ModelArgs, Transformer

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=8, max_seq_len=64)


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelArgs(**{**ARGS, **kw})).eval()


def random_roles(B, T, gen):
    """Random rows: contiguous spans in context, right padding, and a few all-SPAN / all-CONTEXT rows."""
    roles = torch.full((B, T), CONTEXT)
    for b in range(B):
        kind = b % 4
        if kind == 0:
            roles[b] = SPAN
        elif kind >= 2:
            for _ in range(2):
                s = int(torch.randint(1, T - 2, (1,), generator=gen))
                roles[b, s:s + int(torch.randint(1, 5, (1,), generator=gen))] = SPAN
        n_pad = int(torch.randint(0, 4, (1,), generator=gen)) if b % 2 else 0
        if n_pad:
            roles[b, T - n_pad:] = PAD
    return roles


def test_mask_rule_matches_loop_rederivation():
    gen = torch.Generator().manual_seed(1)
    roles = random_roles(6, 12, gen)
    pos = torch.arange(12).expand(6, 12)
    mask = hybrid_mask(roles, pos, roles, pos)[:, 0]
    for b, i, j in itertools.product(range(6), range(12), range(12)):
        q, k = int(roles[b, i]), int(roles[b, j])
        if q == PAD:
            want = i == j
        elif k == PAD:
            want = False
        elif q == CONTEXT:
            want = k == CONTEXT
        else:  # span query: all context, and earlier-or-same span tokens
            want = k == CONTEXT or j <= i
        assert bool(mask[b, i, j]) == want, (b, i, j, q, k)


def test_pure_rows_are_causal_and_bidirectional():
    pos = torch.arange(7)[None]
    span, ctx = torch.full((1, 7), SPAN), torch.full((1, 7), CONTEXT)
    assert torch.equal(hybrid_mask(span, pos, span, pos)[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())
    assert hybrid_mask(ctx, pos, ctx, pos).all()


def test_cached_step_drops_a_mask_that_allows_everything():
    """A one-token decode step that may see every key passes no mask; one with a PAD key keeps it."""
    q_roles, q_pos = torch.tensor([[SPAN]]), torch.tensor([[3]])
    keys = torch.tensor([[CONTEXT] * 5 + [SPAN]])  # cached context left and right of the gap, then the new token
    key_pos = torch.tensor([[0, 1, 2, 4, 5, 3]])
    assert plan_attention(q_roles, q_pos, keys, key_pos, cached=True) == (None, False)
    keys[0, 4] = PAD
    mask, is_causal = plan_attention(q_roles, q_pos, keys, key_pos, cached=True)
    assert not is_causal and mask[0, 0, 0].tolist() == [True] * 4 + [False, True]
    gen = torch.Generator().manual_seed(0)  # random one-token steps: no mask exactly when hybrid_mask allows all
    for _ in range(300):
        B, S = int(torch.randint(1, 3, (), generator=gen)), int(torch.randint(1, 6, (), generator=gen))
        q_roles, q_pos = torch.randint(0, 3, (B, 1), generator=gen), torch.randint(0, 6, (B, 1), generator=gen)
        keys, key_pos = torch.randint(0, 3, (B, S), generator=gen), torch.randint(0, 6, (B, S), generator=gen)
        keys[:, -1], key_pos[:, -1] = q_roles[:, 0], q_pos[:, 0]  # the step's own token is the last key
        mask, _ = plan_attention(q_roles, q_pos, keys, key_pos, cached=True)
        full = hybrid_mask(q_roles, q_pos, keys, key_pos)
        assert (mask is None) == bool(full.all() or (keys == CONTEXT).all()), (q_roles, q_pos, keys, key_pos)
        assert mask is None or torch.equal(mask, full)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_mask_semantics_through_forward(backend):
    model = tiny(attn_backend=backend)
    T = 14
    tokens = torch.randint(0, 61, (1, T))
    roles = torch.full((1, T), CONTEXT)
    roles[0, 4:7] = SPAN  # span A
    roles[0, 9:12] = SPAN  # span B, with context between and after
    out = model(tokens, roles)

    def changed(at):
        t2 = tokens.clone()
        t2[0, at] = (t2[0, at] + 1) % 61
        return model(t2, roles)

    # a later span token never changes an earlier span token's output (also across spans)
    later = changed(10)
    assert torch.allclose(later[0, 4:10], out[0, 4:10], atol=1e-6)
    # changing any span token never changes any context token's output
    for at in (5, 11):
        assert torch.allclose(changed(at)[0, roles[0] == CONTEXT], out[0, roles[0] == CONTEXT], atol=1e-6)
    # right context (position 13, after both spans) does change the first span's output
    assert not torch.allclose(changed(13)[0, 4], out[0, 4], atol=1e-4)
    # ... and left context as well
    assert not torch.allclose(changed(1)[0, 11], out[0, 11], atol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_all_span_is_a_plain_causal_lm(backend):
    model = tiny(attn_backend=backend)
    tokens = torch.randint(0, 61, (2, 12))
    full = model(tokens, torch.full((2, 12), SPAN))
    assert torch.equal(full, model(tokens))  # roles=None means all SPAN
    # all SPAN = a plain causal LM: equal to the same model run through an explicit lower-triangular mask
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 1, 12, 12)  # (B, 1, T, T): j <= i
    with patch("model.plan_attention", lambda *a, **k: (causal, False)):
        assert torch.allclose(model(tokens), full, atol=1e-5)
    # causal: the output at t depends only on tokens <= t, so a prefix gives the same outputs
    assert torch.allclose(model(tokens[:, :5]), full[:, :5], atol=1e-5)
    # and the fast path (is_causal) equals the explicit mask: one padded row forces the mask for the batch
    roles = torch.full((2, 13), SPAN)
    roles[1, -1] = PAD
    padded = model(torch.cat([tokens, tokens[:, :1]], 1), roles)
    assert torch.allclose(padded[:, :12], full, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixed", "all_context", "all_span"])
def test_sdpa_and_math_agree_values_and_gradients(kind):
    """Mixed rows use the boolean mask; pure batches take sdpa's no-mask and is_causal fast paths."""
    gen = torch.Generator().manual_seed(3)
    B, T = 8, 16
    tokens = torch.randint(0, 61, (B, T), generator=gen)
    roles = dict(mixed=random_roles(B, T, gen), all_context=torch.full((B, T), CONTEXT),
                 all_span=torch.full((B, T), SPAN))[kind]
    results = {}
    for backend in ("sdpa", "math"):
        model = tiny(attn_backend=backend, dropout=0.0)
        logits = model(tokens, roles)
        (logits * torch.linspace(-1, 1, 61)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[backend] = logits, grads
    (la, ga), (lb, gb) = results["sdpa"], results["math"]
    assert torch.isfinite(la).all()
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name
