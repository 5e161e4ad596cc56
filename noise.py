"""Dropout that is drawn sparsely, and for the global batch: the random noise of training (LoRA dropout, SimCSE's
attention dropout, residual dropout) in one function.

Sparse: inverted dropout, x * keep / (1 - p) with keep ~ Bernoulli(1 - p) independently per element (nn.Dropout's
law), but only the ~p * n dropped positions are drawn, as running sums of Geometric(p) gaps (in a row of Bernoulli(p)
trials, the gap from one drop to the next is Geometric(p)). On a CPU torch's bernoulli_ draws every element one at a
time; this draws only ~p of them (docs/performance.md).

Global: under data parallelism each process holds some rows of the step's batch. Given rows = (index, n), x's rows
are rows `index` of a batch of n rows: the drops are drawn for all n rows (every process draws the same, from the
same seed) and each process keeps those of its own rows. So a row's noise does not depend on how many processes
share the batch, and a run is the same on 1 or N processes (docs/design.md §7).
"""
import torch


def dropped_positions(n, p, device):
    """Flat indices in [0, n) of a Bernoulli(p) draw's ones, increasing: running sums of Geometric(p) gaps."""
    drawn, last = [], -1  # last: the flat index of the last dropped position drawn so far
    while last < n - 1:  # about the expected number of gaps to the end, then more until one passes it
        k = int(p * (n - 1 - last)) + 16
        pos = last + torch.empty(k, dtype=torch.long, device=device).geometric_(p).cumsum(0)  # (k,) increasing
        drawn.append(pos)
        last = int(pos[-1])  # on a GPU a wait for the device, once per round (1-3 rounds per mask)
    pos = torch.cat(drawn)
    return pos[pos < n]


def dropout(x, p, rows=None):
    """Inverted dropout of x with probability p, drawn sparsely; rows=(index, n): x holds rows `index` (a LongTensor)
    of a batch of n rows, and the noise is that of the whole batch's (see the module docstring)."""
    if x.numel() == 0 or p == 0:
        return x
    mask = torch.full_like(x, 1 / (1 - p), memory_format=torch.contiguous_format)  # kept elements: scaled by 1/(1-p)
    if rows is None:
        pos = dropped_positions(x.numel(), p, x.device)
    else:
        index, n = rows
        if len(index) != x.shape[0]:
            raise ValueError(f"rows: {len(index)} row indices for a tensor of {x.shape[0]} rows")
        per_row = x[0].numel()
        pos = dropped_positions(n * per_row, p, x.device)  # (k,) in the whole batch
        local_row = torch.full((n,), -1, dtype=torch.long, device=x.device)
        local_row[index.to(x.device)] = torch.arange(len(index), device=x.device)  # (n,): -1 = another process's
        row = local_row[pos // per_row]
        pos = row[row >= 0] * per_row + pos[row >= 0] % per_row  # this process's drops, as flat indices of x
    mask.view(-1)[pos] = 0
    return x * mask
