"""The MAGNET attention mechanism: token roles, the hybrid mask, and two interchangeable kernels.

MAGNET (Khosla et al., 2025) gives every position a ROLE and lets one mask mix bidirectional and causal attention:

    PAD      padding; attends only to itself (keeps every softmax finite) and is never attended to.
    CONTEXT  known text. Context attends to all context, left AND right, and never to span tokens.
    SPAN     text to predict. A span token attends to all context, and causally to span tokens (key pos <= query pos).

All-SPAN rows are an ordinary causal LM, all-CONTEXT rows a bidirectional encoder, mixed rows an infilling model.
Spans stay in place, so RoPE positions are the natural 0..T-1 and "causal" is the same by index or by position.

Two paths compute the same thing (tests hold them to 1e-5 in fp32, values and gradients):
  "math": explicit softmax(Q K^T / sqrt(d) + mask) V, softmax in fp32: the readable reference.
  "sdpa": torch's fused F.scaled_dot_product_attention; a batch that is all-causal or all-bidirectional passes no
          mask at all (is_causal=True / no mask), which lets GPUs use the flash kernels.
(DESIGN's optional third path, FlexAttention's block-sparse kernel on CUDA, is not written: docs/design.md §3.)
"""
import math

import torch
import torch.nn.functional as F

from noise import dropout

PAD, CONTEXT, SPAN = 0, 1, 2
BACKENDS = ("sdpa", "math")


def hybrid_mask(q_roles, q_pos, k_roles, k_pos):
    """Boolean mask (True = may attend) of docs/design.md §3 for queries against keys.

    q_roles, q_pos: (B, T) roles and RoPE positions of the queries; k_roles, k_pos: (B, S) of the keys, S >= T.
    With a KV cache the keys are the cached positions followed by the T new ones, so query i's own key is S - T + i.
    Returns (B, 1, T, S), broadcast over heads.
    """
    T, S = q_roles.shape[1], k_roles.shape[1]
    qr, kr = q_roles[:, :, None], k_roles[:, None, :]  # (B, T, 1), (B, 1, S)
    key_is_context = kr == CONTEXT
    span_causal = (qr == SPAN) & (kr == SPAN) & (k_pos[:, None, :] <= q_pos[:, :, None])
    allowed = (((qr == CONTEXT) | (qr == SPAN)) & key_is_context) | span_causal
    q_index = S - T + torch.arange(T, device=q_roles.device)  # the key index of each query's own token
    own_key = torch.arange(S, device=q_roles.device)[None, :] == q_index[:, None]  # (T, S)
    allowed = allowed | ((qr == PAD) & own_key)  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


def plan_attention(q_roles, q_pos, k_roles, k_pos, cached):
    """Decide what the kernel needs: returns (mask, is_causal).

    The fused kernel is fastest with no mask, so the two common pure cases are recognised from the roles:
    every key and query CONTEXT -> full attention (mask=None); no cache and every role SPAN -> is_causal=True.
    (With a cache SDPA's is_causal would align the triangle wrongly, so cached steps build the mask.) A mask that
    allows every key is dropped: one-token decode steps of generate and of a told-length infill need none, and
    are recognised before any mask is built (a SPAN query sees every key unless a key is PAD or a later SPAN).
    """
    if bool((k_roles == CONTEXT).all()):
        return None, False
    if not cached and bool((q_roles == SPAN).all()):
        return None, True
    if q_roles.shape[1] == 1 and bool((q_roles == SPAN).all()):  # one decode step (B, 1) against (B, S) keys
        hidden = (k_roles == PAD) | ((k_roles == SPAN) & (k_pos > q_pos))  # (B, S): what hybrid_mask would forbid
        if not bool(hidden.any()):
            return None, False
    mask = hybrid_mask(q_roles, q_pos, k_roles, k_pos)
    return (None if bool(mask.all()) else mask), False


def attend(q, k, v, mask, is_causal, backend="sdpa", dropout_p=0.0, noise_rows=None):
    """Multi-head attention. q: (B, H, T, hd); k, v: (B, Hkv, S, hd) with H a multiple of Hkv (GQA).

    mask: None or bool (B, 1, T, S); is_causal: plain causal attention (only when T == S). dropout_p: probability of
    zeroing an attention weight (SSCL's SimCSE noise; 0 everywhere else), drawn by noise.dropout for the whole batch
    (noise_rows), so it takes the math path: the fused kernel would draw its own. Returns (B, H, T, hd).
    """
    if backend == "sdpa" and not dropout_p:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: expected one of {BACKENDS}")
    T, S = q.shape[2], k.shape[2]
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    n_rep = q.shape[1] // k.shape[1]  # query head h reads kv head h // n_rep, as Meta's repeat_kv
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
    v = v.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = dropout(F.softmax(scores, dim=-1), dropout_p, noise_rows)
    return probs.to(q.dtype) @ v  # (B, H, T, hd)
