"""Benchmarks for MAGNET: how fast a training step runs, and how close that is to what the hardware can do.

matmul peak  best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), read before and after the runs (on a shared
             machine one reading can come out low): the measured ceiling and MFU denominator, not a datasheet number.
train step   forward + cross-entropy + backward (no optimizer) of a Llama-style Transformer on the HYBRID mask (each
             row CONTEXT with 1-3 SPAN runs of 8-32 tokens, MAGNET's view A), random tokens/targets, fixed seed, per
             attention backend: tokens/s (median of the timed steps after 1 warmup), FLOPs/token, MFU = achieved
             FLOP/s / matmul peak, and peak memory. CUDA: torch.cuda.max_memory_allocated. CPU: each backend runs in a
             fresh process; its ru_maxrss minus its RSS right before the first step is the "peak RSS increase".
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from attention import CONTEXT, SPAN
from model import ModelArgs, Transformer


def timed(fn, device):
    """Seconds that fn() takes. GPU work is asynchronous, so on CUDA we synchronize before and after."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def matmul_peak(dtype, device, n=2048, warmup=3, reps=10):
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs: n^3 multiply-adds), timed after `warmup` runs."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = [timed(lambda: a @ b, device) for _ in range(warmup + reps)]
    return 2 * n ** 3 / min(times[warmup:])


def hybrid_roles(batch, seq, generator=None):
    """(batch, seq) roles like MAGNET's view A: CONTEXT, plus 1-3 SPAN runs of 8-32 tokens per row. The row is cut
    into k equal segments and one run placed at random inside each, so runs never overlap."""
    roles = torch.full((batch, seq), CONTEXT, dtype=torch.long)
    for row in roles:
        k = int(torch.randint(1, 4, (), generator=generator))
        segment = seq // k
        for i in range(k):
            length = min(int(torch.randint(8, 33, (), generator=generator)), segment)
            start = i * segment + int(torch.randint(0, segment - length + 1, (), generator=generator))
            row[start:start + length] = SPAN
    return roles


def flops_per_token(model, seq):
    """FLOPs per token of forward+backward: 6 * N + 12 * n_layers * dim * seq (PaLM appendix B, as in nanoGPT).
    N: every parameter but the token embedding (a lookup, no matmul); the output projection counts. 6 = 2 FLOPs per
    multiply-add x 3 (forward; backward to inputs and to weights). 12 * n_layers * dim * seq: Q K^T and P V over the
    full seq x seq (both kernels compute every score, then mask), with the same factor 6."""
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return 6 * n + 12 * model.args.n_layers * model.args.dim * seq


def memory(device, peak=False):
    """Bytes in use now, or the peak. CUDA: "now" resets the peak, is 0; peak = max_memory_allocated. CPU: the RSS
    now (/proc); the peak is ru_maxrss (KiB on Linux), the high-water mark of the process's whole life."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.reset_peak_memory_stats() or 0
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def train_step(config, backend):
    """Time forward + loss + backward; returns tokens/s, FLOPs/token and peak memory of this configuration."""
    device, dtype, B, T = config["device"], getattr(torch, config["dtype"]), config["batch"], config["seq"]
    torch.manual_seed(0)  # the same weights and inputs for every backend
    args = ModelArgs(dim=config["dim"], n_layers=config["n_layers"], n_heads=config["n_heads"],
                     vocab_size=config["vocab_size"], multiple_of=256, max_seq_len=T, attn_backend=backend)
    model = Transformer(args).to(device=device, dtype=dtype)
    tokens, targets = torch.randint(0, args.vocab_size, (2, B, T)).to(device)
    roles = hybrid_roles(B, T).to(device)
    before = memory(device)

    def step():  # one training step without the optimizer: gradients are freed, recomputed from scratch
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens, roles).flatten(0, 1), targets.flatten()).backward()

    times = [timed(step, device) for _ in range(1 + config["steps"])][1:]  # the first step is a warmup
    return dict(backend=backend, tokens_per_s=B * T / statistics.median(times),
                flops_per_token=flops_per_token(model, T), peak_mem_bytes=memory(device, peak=True) - before)


def run_isolated(config, backend):
    """Run train_step in a fresh Python process, so its ru_maxrss belongs to this configuration alone."""
    cmd = [sys.executable, __file__, "--_child", json.dumps(dict(config, backend=backend))]
    return json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])


def markdown_table(results, peak):
    """One row per backend; achieved FLOP/s = tokens/s x FLOPs/token, and MFU = achieved / matmul peak."""
    lines = ["| backend | tokens/s | GFLOP/token | achieved GFLOP/s | MFU | peak mem (MiB) |", "|---|" + "---:|" * 5]
    for r in results:
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        lines.append(f"| {r['backend']} | {r['tokens_per_s']:,.0f} | {r['flops_per_token'] / 1e9:.3f} "
                     f"| {achieved / 1e9:,.1f} | {achieved / peak:.1%} | {r['peak_mem_bytes'] / 2**20:,.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for name, default in dict(dim=512, n_layers=8, batch=8, seq=512, steps=3).items():  # steps: timed, after 1 warmup
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--backends", default="sdpa,math")
    p.add_argument("--quick", action="store_true", help="tiny sizes (dim 128, 2 layers, batch 2, seq 128, 1 step)")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one train_step in a fresh process
    a = p.parse_args()
    if a._child:
        config = json.loads(a._child)
        return print(json.dumps(train_step(config, config["backend"])))
    if a.quick:
        a.dim, a.n_layers, a.batch, a.seq, a.steps = 128, 2, 2, 128, 1
    config = dict(device=a.device, dtype=a.dtype, dim=a.dim, n_layers=a.n_layers, n_heads=8, vocab_size=32000,
                  batch=a.batch, seq=a.seq, steps=a.steps)
    cuda, dtype, n = torch.device(a.device).type == "cuda", getattr(torch, a.dtype), 512 if a.quick else 2048
    readings = [matmul_peak(dtype, a.device, n)]
    results = [train_step(config, b) if cuda else run_isolated(config, b) for b in a.backends.split(",")]
    readings.append(matmul_peak(dtype, a.device, n))
    peak = max(readings)
    mem_note = ("peak mem = torch.cuda.max_memory_allocated (all live tensors)" if cuda else
                "peak mem = peak RSS increase: ru_maxrss - RSS right before the first step, in a fresh process")
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} torch={torch.__version__}\nmodel: dim="
          f"{a.dim} n_layers={a.n_layers} n_heads=8 vocab=32000; batch={a.batch} seq={a.seq}; hybrid mask; median of "
          f"{a.steps} step(s) after 1 warmup\nmatmul peak ({a.dtype}, n={n}): {peak / 1e9:,.1f} GFLOP/s = MFU "
          f"denominator (best of {', '.join(f'{r / 1e9:,.1f}' for r in readings)}, read before/after the runs)\n\n"
          f"{markdown_table(results, peak)}\n\n{mem_note}\nFLOPs/token = 6*N_nonembedding + 12*n_layers*dim*seq")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(config=config, matmul_peak_flops=peak, matmul_readings=readings, memory=mem_note,
                           results=results), f, indent=2)


if __name__ == "__main__":
    main()
