"""Llama-2 written out in plain PyTorch, numerically as Meta's reference computes it, plus what MAGNET adds:
per-token roles for the hybrid attention mask (attention.py), a KV cache that also serves span infilling, and
LoRA adapters. Reading and writing checkpoint files is checkpoint.py's job.

Module and parameter names are Meta's (tok_embeddings, layers.{i}.attention.wq, ..., norm, output), so a Meta
checkpoint loads strictly, one to one.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attention import BACKENDS, PAD, SPAN, attend, plan_attention
from noise import dropout


@dataclass
class ModelArgs:
    # The fields of Meta's params.json.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1 = take it from the checkpoint
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1's: factor, low/high_freq_factor, original_max_position_embeddings
    # Runtime fields (not part of Meta's params.json, except tie_embeddings which we record when it is true).
    max_seq_len: int = 4096
    dropout: float = 0.0  # on both residual branches; Llama-2 itself uses none
    tie_embeddings: bool = False  # output shares tok_embeddings (llama2.c models), never for Llama-2
    attn_backend: str = "sdpa"  # "sdpa" (fused) or "math" (reference); see attention.py

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """SwiGLU width: 2/3 of 4*dim, times the optional multiplier, rounded up to multiple_of (11008 for 7B)."""
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * math.ceil(h / self.multiple_of)



# ----------------------------------------------------------------------------------------------------------------
# The Llama-2 blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalise in fp32, cast back, then scale: Meta's order of operations
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_angles(positions, head_dim, theta, scaling=None):
    """The rotary factors e^(i pos theta^(-2i/hd)), i < hd/2, as fp32 complex numbers: (B, T, 1, hd/2).

    Computed from explicit positions on every call (no buffer): positions need not be contiguous (infilling encodes
    context at 0..L-1 and L+n.., then decodes the gap), and a model cast to bf16 keeps fp32 angles. Llama-3's
    `scaling` stretches the long wavelengths by `factor`, keeps the short ones and blends the band between.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    if scaling:
        wavelength = 2 * math.pi / inv_freq  # (hd/2,); 0 = stretched (long), 1 = kept (short), blended between
        kept = (scaling["original_max_position_embeddings"] / wavelength - scaling["low_freq_factor"]) / \
            (scaling["high_freq_factor"] - scaling["low_freq_factor"])
        inv_freq = (1 - kept.clamp(0, 1)) * inv_freq / scaling["factor"] + kept.clamp(0, 1) * inv_freq
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    return torch.complex(angles.cos(), angles.sin())[:, :, None, :]  # (B, T, 1, hd/2), broadcast over heads


def apply_rope(x, rope):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of each head (Meta's layout) by multiplying each pair, read
    as the complex number x0 + i x1, by its rotary factor, as Meta's reference does. x: (B, T, H, hd)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2) complex
    return torch.view_as_real(pairs * rope).flatten(-2).type_as(x)  # (B, T, H, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rope, mask, is_causal, backend, attn_dropout=0.0, noise_rows=None, cache=None, layer_id=0):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope)  # (B, T, H, hd)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)
        if cache is not None:
            k, v = cache.store(layer_id, k, v)  # (B, Hkv, S, hd): every cached position plus these T
        y = attend(q, k, v, mask, is_causal, backend, attn_dropout, noise_rows)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.dropout = args.dropout  # on both residual branches, in training

    def forward(self, x, rope, mask, is_causal, backend, attn_dropout=0.0, noise_rows=None, cache=None):
        p = self.dropout if self.training else 0.0
        for m in self.modules() if self.training else ():  # LoRA's dropout too; set here, so that activation
            if isinstance(m, LoRALinear):                  # checkpointing's recomputation of the block sets it again
                m.noise_rows = noise_rows
        h = x + dropout(self.attention(self.attention_norm(x), rope, mask, is_causal, backend, attn_dropout,
                                       noise_rows, cache, self.layer_id), p, noise_rows)
        return h + dropout(self.feed_forward(self.ffn_norm(h)), p, noise_rows)


class KVCache:
    """Keys and values of every layer for the positions processed so far, with their roles and positions, so the
    hybrid mask can be rebuilt for each new query: one cache serves causal generation (all SPAN) and infilling
    (encode the CONTEXT once, then decode SPAN tokens one at a time; context never attends to the span, so its
    cached K/V are already final)."""

    def __init__(self, args: ModelArgs, batch_size, max_len, device="cpu", dtype=torch.float32):
        shape = (args.n_layers, batch_size, args.kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.roles = torch.full((batch_size, max_len), PAD, dtype=torch.long, device=device)
        self.pos = torch.zeros((batch_size, max_len), dtype=torch.long, device=device)
        self.length = 0  # positions stored so far; Transformer.forward advances it after all layers have stored

    def extend(self, roles, positions):
        """Record the roles/positions of T new tokens; returns those of all keys, cached and new: (B, S) each."""
        end = self.length + roles.shape[1]
        if end > self.roles.shape[1]:
            raise ValueError(f"KV cache holds {self.roles.shape[1]} positions; {end} requested")
        self.roles[:, self.length:end], self.pos[:, self.length:end] = roles, positions
        return self.roles[:, :end], self.pos[:, :end]

    def store(self, layer_id, k, v):
        """Write the new keys/values (B, Hkv, T, hd) of one layer; returns all of that layer's (B, Hkv, S, hd)."""
        end = self.length + k.shape[2]
        self.k[layer_id, :, :, self.length:end], self.v[layer_id, :, :, self.length:end] = k, v
        return self.k[layer_id, :, :, :end], self.v[layer_id, :, :, :end]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size must be set (got {args.vocab_size}); load_checkpoint fills it in")
        if args.dim % args.n_heads or args.n_heads % args.kv_heads or args.head_dim % 2:
            raise ValueError(f"dim={args.dim}, n_heads={args.n_heads}, n_kv_heads={args.kv_heads}: need heads to "
                             "divide dim, kv heads to divide heads, and an even head_dim")
        if args.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend={args.attn_backend!r}: expected one of {BACKENDS}")
        self.args = args
        self.checkpoint_activations = False  # recompute each block in backward instead of storing its activations
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.apply(self._init_weights)  # for training from scratch; a loaded checkpoint replaces all of it
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, roles=None, start_pos=0, cache=None, positions=None, compute_logits=True,
                targets=None, attn_dropout=0.0, noise_rows=None):
        """tokens: (B, T) ids. roles: (B, T) PAD/CONTEXT/SPAN, None = all SPAN (an ordinary causal LM).
        positions: (B, T) or (T,) RoPE positions, default start_pos + 0..T-1. cache: a KVCache to read and extend.
        attn_dropout: dropout on the attention weights, in training mode only (SSCL's SimCSE noise). noise_rows:
        (index, n) when tokens are rows `index` of a batch of n (data parallelism): every dropout is drawn for the
        whole batch (noise.py), so a run does not depend on the number of processes.
        Returns float32 logits (B, T, V); the final normed hidden states (B, T, dim) instead if compute_logits=False
        (encoders skip the vocabulary). With targets, (B, T) labels (targets[t] = the token output t must predict,
        negative = none, as data.IGNORE): the cross-entropy of each target instead, (N,) fp32 in row-major order
        (training losses need only those N positions: nothing (B, T, V) is built, see next_token_nll).
        """
        B, T = tokens.shape
        if positions is None:
            positions = start_pos + torch.arange(T, device=tokens.device)
        positions = positions.expand(B, T)
        if roles is None:
            roles = torch.full((B, T), SPAN, dtype=torch.long, device=tokens.device)
        if int(positions.max()) >= self.args.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond max_seq_len={self.args.max_seq_len}")
        k_roles, k_pos = cache.extend(roles, positions) if cache is not None else (roles, positions)
        mask, is_causal = plan_attention(roles, positions, k_roles, k_pos, cached=cache is not None)
        rope = rope_angles(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        attn = (mask, is_causal, self.args.attn_backend, attn_dropout if self.training else 0.0, noise_rows)
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.checkpoint_activations and self.training and cache is None:  # non-reentrant, RNG replayed
                h = checkpoint(layer, h, rope, *attn, use_reentrant=False)
            else:
                h = layer(h, rope, *attn, cache)
        if cache is not None:
            cache.length += T
        h = self.norm(h)
        if not compute_logits:
            return h
        if targets is not None:
            at = targets >= 0  # (B, T): gather first, so the vocabulary projection runs only where it is needed
            return next_token_nll(self.output, h[at], targets[at])  # (N,)
        return self.output(h).float()  # (B, T, V)


LOGITS_PER_PIECE = 2**22  # 16 MiB of fp32 logits


def next_token_nll(output, h, labels):
    """Cross-entropy of each target in fp32: final hidden states h (N, dim) at the target positions, labels (N,).
    The vocabulary projection and its loss run on near-equal pieces of at most LOGITS_PER_PIECE logits, so no single
    (N, V) buffer is allocated: on a CPU, blocks that large go back to the OS and fault in again every step
    (docs/performance.md). Rows do not interact, so each row's loss is the same as from one whole projection."""
    pieces = max(1, math.ceil(h.shape[0] * output.weight.shape[0] / LOGITS_PER_PIECE))
    return torch.cat([F.cross_entropy(output(rows).float(), row_labels, reduction="none")  # (n,) per piece
                      for rows, row_labels in zip(h.tensor_split(pieces), labels.tensor_split(pieces))])


# ----------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al., 2021), with PEFT's defaults and semantics

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    """A frozen linear map plus a trainable low-rank update: y = W x + (alpha / r) * B A dropout(x).

    The frozen matrix keeps the name `weight`, so base checkpoints still load by Meta's names; the adapter adds
    `lora_A` (r, in), Kaiming-uniform, and `lora_B` (out, r), zero, so at step 0 the model equals its base.
    Dropout (noise.dropout, training only) is drawn independently for each adapted projection, as PEFT does.
    """

    def __init__(self, weight: nn.Parameter, rank, alpha, dropout, dtype=None):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        out_features, in_features = weight.shape
        self.weight = weight
        self.scaling = alpha / rank
        dtype = dtype or weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = dropout  # probability of zeroing an input element of the update, in training
        self.noise_rows = None  # set by TransformerBlock.forward: the rows this process holds (noise.py)
        self.merged = False

    def delta(self):
        """The update B A * alpha/r as a full matrix, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.merged:
            return y
        x = dropout(x, self.dropout, self.noise_rows) if self.training else x
        # alpha/r scales the r activations, not the outputs as PEFT does: exact when alpha/r is a power of two
        h = F.linear(x, self.lora_A) * self.scaling  # (..., r)
        return y + F.linear(h, self.lora_B)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False


def apply_lora(model: Transformer, rank=16, alpha=32, dropout=0.05, targets=LORA_TARGETS, dtype=None):
    """Wrap the target linears of every block in LoRALinear and freeze everything except the LoRA matrices.
    dtype: the adapters' (None = the base weights'); training keeps them fp32 over a bf16 base, computing in bf16."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or rank <= 0:
        raise ValueError(f"LoRA rank must be > 0 (got {rank}) and targets among {LORA_TARGETS} (got {sorted(unknown)})")
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name).weight, rank, alpha, dropout, dtype))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    model.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    """Fold every adapter into its weight (inference without the LoRA branch); unmerge_lora undoes it."""
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()
