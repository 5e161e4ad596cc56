"""The three MAGNET objectives (docs/design.md §4), sentence pooling, and the MAGNET losses of one batch.

  MNTP  masked next-token prediction (as LLM2Vec): a masked CONTEXT token t is predicted from the output at t-1.
  MSG   missing-span generation: each SPAN token t is predicted from the output at t-1, which sees all context
        (left and right of the span) and the span tokens before t.
  SSCL  sentence-level contrastive learning: InfoNCE between a text and its positive, in-batch negatives.

MNTP and MSG come from ONE hybrid forward pass (view A); their labels are already shifted by data.py, so
label[t-1] holds token t and both losses are plain token-means of cross-entropy over their own targets. A token is
either context or span, so the two never target the same position: one cross-entropy over the positions that carry
a target (Transformer.forward(targets=), model.next_token_nll) serves both, and no other position needs its logits.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from attention import PAD
from data import IGNORE


def _token_mean(nll, labels, count=None):
    """nll summed over the positions whose label is not IGNORE, divided by `count` (default: their number;
    data-parallel training passes the global count so every rank's share adds up to the global mean)."""
    n = count if count is not None else (labels != IGNORE).sum().clamp(min=1)
    return nll.masked_fill(labels == IGNORE, 0.0).sum() / n


def mntp_loss(nll, mntp_labels, count=None):
    """Masked next-token prediction: the token-mean of view A's per-target nll (N,) over the MNTP targets;
    mntp_labels (N,) holds, at each of those positions, the masked token t (stored at t-1) or IGNORE."""
    return _token_mean(nll, mntp_labels, count)


def msg_loss(nll, msg_labels, count=None):
    """Missing-span generation, from the same nll as MNTP: the token-mean over span targets (msg_labels (N,))."""
    return _token_mean(nll, msg_labels, count)


def pool(hidden, roles, last_index, pooling="last", first=0):
    """Sentence vectors from final hidden states (B, T, dim): the last real token (the paper's choice, here the EOS
    at `last_index`) or the mean over non-PAD positions from `first` on (as LLM2Vec: with an instruction prefix,
    `first` is the text's first position, so BOS and the instruction are left out of the mean)."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]  # (B, dim)
    if pooling == "mean":
        keep = (roles != PAD) & (torch.arange(roles.shape[1], device=roles.device) >= first)  # (B, T)
        keep = keep.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * keep).sum(1) / keep.sum(1)  # (B, dim)
    raise ValueError(f"pooling={pooling!r}: expected 'last' or 'mean'")


class _GatherFromAllRanks(torch.autograd.Function):
    """all_gather whose backward sends every rank its share of the gradient (all_reduce, then take our slice),
    so the data-parallel gradient equals that of one process holding the whole global batch. all_reduce and
    all_gather exist on gloo (CPU) and nccl alike. Every rank must hold the same number of rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * B, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def sscl_loss(a, b, temperature=0.05):
    """InfoNCE (SimCSE form) between texts a (B, dim) and their positives b (B, dim).

    Similarity = cosine / temperature; row i's positive is b_i, every other b_j of the GLOBAL batch (all ranks)
    is a negative; both directions (a->b, b->a) are averaged.
    """
    with torch.autocast(a.device.type, enabled=False):  # similarities / 0.05 need fp32, also under autocast
        return _info_nce(a.float(), b.float(), temperature)


def _info_nce(a, b, temperature):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    offset = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        offset = dist.get_rank() * a.shape[0]
        a_all, b_all = _GatherFromAllRanks.apply(a), _GatherFromAllRanks.apply(b)
    else:
        a_all, b_all = a, b
    targets = offset + torch.arange(a.shape[0], device=a.device)
    loss_ab = F.cross_entropy(a @ b_all.T / temperature, targets)  # (B, world * B) logits
    loss_ba = F.cross_entropy(b @ a_all.T / temperature, targets)
    return (loss_ab + loss_ba) / 2


def magnet_losses(model, batch, weights, temperature=0.05, pooling="last", text_start=0, sscl_dropout=0.0,
                  target_counts=None, micro_batches=1, rows=None):
    """The MAGNET losses of one batch from data.magnet_batch: a dict with "mntp", "msg", "sscl" (those whose weight
    is not 0) and their weighted sum "total", L = w_mntp L_MNTP + w_msg L_MSG + w_sscl L_SSCL. View A (hybrid roles)
    gives MNTP and MSG in one forward pass; views B and C (all CONTEXT) give SSCL, with attention dropout
    `sscl_dropout` as SimCSE's noise. A batch that is a part of a step (data parallelism, gradient accumulation)
    returns its share of the step's loss: token losses divided by `target_counts` (the step's counts per rank,
    {"mntp": n, "msg": n}), SSCL, a mean per micro-batch, by `micro_batches`; and rows=(index, n) says which rows of
    the micro-batch's n it holds, so that dropout is drawn for all n (noise.py)."""
    b = {k: v.to(model.tok_embeddings.weight.device) for k, v in batch.items()}
    counts, out = target_counts or {}, {}
    if weights["mntp"] or weights["msg"]:
        mntp, msg = b["mntp_labels"], b["msg_labels"]  # (B, T) each, IGNORE where no target
        at = (mntp != IGNORE) | (msg != IGNORE)  # (B, T): the positions that carry a target (~1/4 of view A)
        nll = model(b["tokens"], b["roles"], targets=torch.where(mntp != IGNORE, mntp, msg),
                    noise_rows=rows)  # (N,): at `at`
        out["mntp"] = mntp_loss(nll, mntp[at], counts.get("mntp"))
        out["msg"] = msg_loss(nll, msg[at], counts.get("msg"))
    if weights["sscl"]:
        sscl_rows = None if rows is None else (torch.cat([rows[0], rows[1] + rows[0]]), 2 * rows[1])  # B, C
        hidden = model(b["sscl_tokens"], b["sscl_roles"], compute_logits=False, attn_dropout=sscl_dropout,
                       noise_rows=sscl_rows)  # (2B, T', dim); views B and C differ by the noise
        z_b, z_c = pool(hidden, b["sscl_roles"], b["sscl_last"], pooling, text_start).chunk(2)  # (B, dim) each
        out["sscl"] = sscl_loss(z_b, z_c, temperature) / micro_batches
    out["total"] = sum(weights[k] * v for k, v in out.items())
    return out
