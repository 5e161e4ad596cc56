"""Check the model against an independent float64 re-derivation of `stories260K`.

`stories260K` is Karpathy's tiny pretrained TinyStories Llama-2 (llama2.c legacy v0
`.bin`: dim 64, 5 layers, 8 query heads, 4 kv heads, vocab 512, tied output layer).
This file re-implements the checkpoint reader and the Llama-2 forward pass from scratch
in plain numpy float64 (no import of the project's model.py), checks that this reference
alone writes fluent English, and then that the project's float32 torch model gives the
same logits and the same greedy tokens.
"""
import os
import struct
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(os.environ.get("MAGNET_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
ASSETS = SHARED / "assets" / "stories260K"
BIN, TOK = ASSETS / "stories260K.bin", ASSETS / "tok512.model"
if not (BIN.is_file() and TOK.is_file()):
    pytest.skip("../shared/assets/stories260K not found (set MAGNET_SHARED)", allow_module_level=True)

N_NEW, BOS, EPS = 40, 1, 1e-5


def read_bin_f64(path):
    """Parse a llama2.c legacy (v0) checkpoint into float64 numpy arrays (out, in layout)."""
    with open(path, "rb") as f:
        dim, hidden, L, nh, nkv, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = np.fromfile(f, dtype="<f4").astype(np.float64)
    V, hd = abs(vocab), dim // nh
    w, off = dict(dim=dim, hidden_dim=hidden, n_layers=L, n_heads=nh, n_kv_heads=nkv,
                  vocab_size=V, seq_len=seq_len, head_dim=hd), 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = data[off:off + n].reshape(shape)
        off += n
        return a

    w["tok_embeddings"] = take(V, dim)
    w["attention_norm"] = take(L, dim)
    w["wq"], w["wk"], w["wv"] = take(L, nh * hd, dim), take(L, nkv * hd, dim), take(L, nkv * hd, dim)
    w["wo"], w["ffn_norm"] = take(L, dim, nh * hd), take(L, dim)
    w["w1"], w["w2"], w["w3"] = take(L, hidden, dim), take(L, dim, hidden), take(L, hidden, dim)
    w["norm"] = take(dim)
    off += seq_len * hd  # legacy precomputed RoPE tables (cos and sin halves): unused
    w["output"] = take(V, dim) if vocab < 0 else w["tok_embeddings"]
    assert off == data.size, "unexpected .bin size"
    return w


def rmsnorm(x, g):  # x: (T, dim), g: (dim,)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * g


def rope(x, pos):
    """Meta-style rotary embedding on interleaved pairs. x: (T, hd), pos: (T,)."""
    hd = x.shape[-1]
    freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)  # (hd/2,)
    ang = pos[:, None] * freq[None, :]                   # (T, hd/2)
    a, b = x[:, 0::2], x[:, 1::2]                         # even / odd members of each pair
    out = np.empty_like(x)
    out[:, 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[:, 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def reference_logits(w, tokens):
    """Causal forward pass over a 1-D token list; returns float64 logits of shape (T, vocab)."""
    nh, nkv, hd = w["n_heads"], w["n_kv_heads"], w["head_dim"]
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)   # True = future position, masked
    x = w["tok_embeddings"][np.asarray(tokens)]           # (T, dim)
    for l in range(w["n_layers"]):
        n = rmsnorm(x, w["attention_norm"][l])            # (T, dim)
        q = n @ w["wq"][l].T                              # (T, nh*hd)
        k = n @ w["wk"][l].T                              # (T, nkv*hd)
        v = n @ w["wv"][l].T                              # (T, nkv*hd)
        heads = []
        for h in range(nh):
            kv = h // (nh // nkv)                         # GQA: shared kv head
            qh = rope(q[:, h * hd:(h + 1) * hd], pos)     # (T, hd)
            kh = rope(k[:, kv * hd:(kv + 1) * hd], pos)   # (T, hd)
            vh = v[:, kv * hd:(kv + 1) * hd]              # (T, hd)
            s = qh @ kh.T / np.sqrt(hd)                   # (T, T)
            s[causal] = -np.inf
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)            # softmax over keys
            heads.append(p @ vh)                          # (T, hd)
        h_ = x + np.concatenate(heads, axis=-1) @ w["wo"][l].T
        n = rmsnorm(h_, w["ffn_norm"][l])
        a, g = n @ w["w1"][l].T, n @ w["w3"][l].T         # (T, hidden)
        x = h_ + (a / (1.0 + np.exp(-a)) * g) @ w["w2"][l].T  # silu(w1 n) * (w3 n), then w2
    return rmsnorm(x, w["norm"]) @ w["output"].T          # (T, vocab)


@pytest.fixture(scope="module")
def weights():
    return read_bin_f64(BIN)


@pytest.fixture(scope="module")
def ref_tokens(weights):
    """BOS + N_NEW greedy tokens from the float64 reference."""
    toks = [BOS]
    for _ in range(N_NEW):
        toks.append(int(reference_logits(weights, toks)[-1].argmax()))
    return toks


@pytest.fixture(scope="module")
def model():
    torch = pytest.importorskip("torch")
    load_checkpoint = pytest.importorskip("checkpoint").load_checkpoint
    m = load_checkpoint(str(BIN))
    m.eval()
    for p in m.parameters():  # inference only (no global grad switch: it would leak into other tests)
        p.requires_grad_(False)
    return m


COMMON = {"once", "upon", "a", "time", "there", "was", "little", "girl", "boy", "named",
          "she", "he", "her", "his", "the", "to", "and", "play", "day", "with", "in", "lily",
          "tim", "it", "big", "saw", "wanted", "loved", "happy", "mom", "they", "friend"}


def test_reference_is_sane(ref_tokens):
    import sentencepiece as spm
    text = spm.SentencePieceProcessor(model_file=str(TOK)).decode(ref_tokens)
    print("\nreference greedy text:", repr(text))
    words = {t.strip(".,!?\"'").lower() for t in text.split()}
    assert len(words & COMMON) >= 5, text
    assert "." in text
    letters = sum(c.isascii() and (c.isalpha() or c in " .,!?'\"\n") for c in text)
    assert letters / len(text) > 0.95, text


def test_model_matches_float64_reference(weights, ref_tokens, model):
    import torch
    ref = reference_logits(weights, ref_tokens)                    # (T, V) float64
    out = model(torch.tensor([ref_tokens], dtype=torch.long))      # (1, T, V)
    assert tuple(out.shape) == (1, len(ref_tokens), weights["vocab_size"])
    got = out[0].double().numpy()
    err = np.abs(got - ref).max()
    print(f"\nmax |model - float64 reference| = {err:.3e}")
    # Observed: model.py (fp32) vs this fp64 reference = 1.3e-5 (logits up to ~22, smallest
    # top-1/top-2 gap 0.13); 1e-4 is ~8x that: room for fp32 rounding, yet catches real bugs.
    assert err < 1e-4, err
    assert got[:-1].argmax(-1).tolist() == ref_tokens[1:]


def test_model_greedy_decoding_matches_reference(ref_tokens, model):
    import torch
    toks = torch.tensor([[BOS]], dtype=torch.long)
    for _ in range(N_NEW):
        nxt = model(toks)[:, -1].argmax(-1, keepdim=True)          # no KV cache: full recompute
        toks = torch.cat([toks, nxt], dim=1)
    assert toks[0].tolist() == ref_tokens
