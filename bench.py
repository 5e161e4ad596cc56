"""Benchmarks for MAGNET: training speed against what the hardware can do, inference speed, checkpoint loading.

  python bench.py [--bench attention,magnet,inference,load] [--quick] [--out results.json]

matmul peak  best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), read before and after the runs (on a shared
             machine one reading can come out low): the measured ceiling and MFU denominator, not a datasheet number.
attention    forward + cross-entropy + backward (no optimizer) of a Llama-style Transformer on the HYBRID mask (each
             row CONTEXT with 1-3 SPAN runs of 8-32 tokens, MAGNET's view A), random tokens/targets, per attention
             backend (sdpa, math): tokens/s, FLOPs/token, MFU = achieved FLOP/s / matmul peak, peak memory.
magnet       one full MAGNET step, Magnet.losses on a data.magnet_batch of the toy world (view A forward for MNTP+MSG,
             views B/C forward for SSCL, backward, AdamW on the LoRA r=16 parameters): the same columns.
inference    Magnet.generate and Magnet.infill (greedy) with the KV cache vs without: new tokens/s and speed-up.
load         a synthetic bf16 Meta checkpoint (~1B parameters) written to a temp dir, loaded in fresh processes
             with model.load_checkpoint (mmap + meta device + assign) vs torch.load + random init + load_state_dict.
Timings are the median of --steps timed runs after 1 warmup. Peak memory: on CUDA torch.cuda.max_memory_allocated;
on CPU each run is a fresh process and its ru_maxrss minus its RSS right before the run is the "peak RSS increase".
"""
import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from attention import CONTEXT, PAD, SPAN
from magnet import Magnet
from model import ModelArgs, Transformer, apply_lora, load_checkpoint, save_checkpoint


def timed(fn, device):
    """Seconds that fn() takes. GPU work is asynchronous, so on CUDA we synchronize before and after."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def median_time(fn, config):
    """Median seconds of config["steps"] calls of fn, after 1 warmup call."""
    return statistics.median([timed(fn, config["device"]) for _ in range(1 + config["steps"])][1:])


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


def flops_per_token(model, seq, logits=True):
    """FLOPs per token of forward+backward: 6 * N + 12 * n_layers * dim * seq (PaLM appendix B, as in nanoGPT).
    N: every parameter but the token embedding (a lookup, no matmul); the output projection counts unless
    logits=False. 6 = 2 FLOPs per multiply-add x 3 (forward; backward to inputs and to weights). 12 * n_layers * dim
    * seq: Q K^T and P V over the full seq x seq (both kernels compute every score, then mask), with the same 6."""
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return 6 * (n - (not logits) * model.output.weight.numel()) + 12 * model.args.n_layers * model.args.dim * seq


def memory(device, peak=False):
    """Bytes in use now, or the peak. CUDA: "now" resets the peak, is 0; peak = max_memory_allocated. CPU: the RSS
    now (/proc); the peak is ru_maxrss (KiB on Linux), the high-water mark of the process's whole life."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.reset_peak_memory_stats() or 0
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def train_step(config):
    """attention: time forward + loss + backward with config["backend"]; tokens/s, FLOPs/token, peak memory."""
    device, dtype, B, T = config["device"], getattr(torch, config["dtype"]), config["batch"], config["seq"]
    torch.manual_seed(0)  # the same weights and inputs for every backend
    args = ModelArgs(dim=config["dim"], n_layers=config["n_layers"], n_heads=8, vocab_size=32000,
                     max_seq_len=T, attn_backend=config["backend"])
    model = Transformer(args).to(device=device, dtype=dtype)
    tokens, targets = torch.randint(0, args.vocab_size, (2, B, T)).to(device)
    roles = hybrid_roles(B, T).to(device)
    before = memory(device)

    def step():  # one training step without the optimizer: gradients are freed, recomputed from scratch
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens, roles).flatten(0, 1), targets.flatten()).backward()

    seconds = median_time(step, config)
    return dict(name=config["backend"], tokens_per_s=B * T / seconds, flops_per_token=flops_per_token(model, T),
                peak_mem_bytes=memory(device, peak=True) - before)


def toy_world(config):
    """The toy corpus, its paraphrase pairs and tokenizer (data.write_toy_world), built in a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus, pairs, tok = data.write_toy_world(tmp, n_stories=config["stories"])
        return data.TextCorpus(corpus, tok, cache_dir=tmp), data.read_pairs(pairs), tok


def magnet_step(config):
    """magnet: time one full training step on a fixed batch (built once, untimed) of B rows of `seq` tokens."""
    device, dtype = config["device"], getattr(torch, config["dtype"])
    corpus, pairs, tok = toy_world(config)
    torch.manual_seed(0)
    batch = data.magnet_batch(corpus, data.BatchConfig(config["batch"], config["seq"] - 1), np.random.default_rng(0),
                              pairs)  # view A rows: BOS + seq - 1 tokens
    args = ModelArgs(dim=config["dim"], n_layers=config["n_layers"], n_heads=8, vocab_size=tok.vocab_size,
                     max_seq_len=config["seq"])
    model = apply_lora(Transformer(args).to(device=device, dtype=dtype), rank=16)  # LoRA in --dtype too
    magnet = Magnet(model.train(), tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = memory(device)

    def step():
        opt.zero_grad(set_to_none=True)
        magnet.losses(batch)["total"].backward()
        opt.step()

    seconds = median_time(step, config)
    # Tokens: non-PAD positions of view A and of views B/C. FLOPs: the standard 6N convention of flops_per_token,
    # at each view's padded length (views B/C skip the output projection). It counts weight gradients for every
    # matrix, though the frozen base weights get none under LoRA (~4N of real work): MFU as usually reported.
    n_a, n_bc = int((batch["roles"] != PAD).sum()), int((batch["sscl_roles"] != PAD).sum())
    flops = n_a * flops_per_token(model, batch["tokens"].shape[1]) + \
        n_bc * flops_per_token(model, batch["sscl_tokens"].shape[1], logits=False)
    return dict(name=f"magnet ({args.attn_backend})", tokens_per_s=(n_a + n_bc) / seconds,
                flops_per_token=flops / (n_a + n_bc), peak_mem_bytes=memory(device, peak=True) - before)


def inference(config):
    """inference: new tokens/s of Magnet.generate and Magnet.infill, greedy, with the KV cache and without it
    (recomputing the whole row for every new token). Each time is a whole call, prompt/context encoding included."""
    c, device = config["infer"], config["device"]
    corpus, _, tok = toy_world(config)
    tok.eos_id = -1  # a random model may pick EOS; with none, generate makes exactly the tokens asked for
    torch.manual_seed(0)
    args = ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=8, vocab_size=tok.vocab_size, max_seq_len=1024)
    magnet = Magnet(Transformer(args).to(device=device, dtype=getattr(torch, config["dtype"])).eval(), tok)
    ids = corpus.tokens[corpus.tokens != tok.bos_id]
    prompt, left, right = (tok.decode(ids[i * c["context"]:(i + 1) * c["context"]]) for i in range(3))
    tasks = [("generate", lambda **k: magnet.generate(prompt, c["new"], **k), c["new"], tok.encode(prompt, bos=True)),
             ("infill", lambda **k: magnet.infill(left, right, c["gap"], **k), c["gap"],
              tok.encode(left, bos=True) + tok.encode(right))]
    rows = []
    for task, fn, n, context in tasks:
        texts = {True: [], False: []}
        speed = {cache: n / median_time(lambda: texts[cache].append(fn(use_cache=cache)), config)
                 for cache in (True, False)}
        rows.append(dict(name=task, context_tokens=len(context), new_tokens=n, cached_tokens_per_s=speed[True],
                         uncached_tokens_per_s=speed[False], same_text=texts[True][-1] == texts[False][-1]))
    return rows


def bf16_model(args):
    """A randomly initialized Transformer built directly in bf16 (never an fp32 copy)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        return Transformer(args)
    finally:
        torch.set_default_dtype(torch.float32)


def load_once(config):
    """load, in a fresh process: load the checkpoint one way, then read every weight once (mmap reads pages lazily,
    so its first use pays for them). Wall time and peak RSS increase after each."""
    directory, before, t0 = Path(config["dir"]), memory("cpu"), time.perf_counter()
    if config["how"] == "mmap":
        model = load_checkpoint(directory, dtype=torch.bfloat16)
    else:  # the whole file into memory, a second full-size (randomly initialized) model, copy into it
        state = torch.load(directory / "consolidated.00.pth", map_location="cpu", mmap=False, weights_only=True)
        model = bf16_model(ModelArgs(**json.loads((directory / "params.json").read_text())))
        model.load_state_dict(state)
        del state
    t1, load_peak = time.perf_counter(), memory("cpu", peak=True) - before
    torch.stack([p.sum() for p in model.parameters()]).sum()
    return dict(name=config["how"], load_s=t1 - t0, load_peak_bytes=load_peak, read_s=time.perf_counter() - t1,
                read_peak_bytes=memory("cpu", peak=True) - before)


def load_bench(config):
    """load: write the synthetic checkpoint, time each way of loading it in a fresh process, delete it."""
    args = ModelArgs(**config["load"], multiple_of=256)
    with tempfile.TemporaryDirectory() as tmp:
        model = bf16_model(args)
        n_params, size = sum(p.numel() for p in model.parameters()), 0
        if shutil.disk_usage(tmp).free < 3 * 2 * n_params:  # 2 bytes per bf16 parameter, with room to spare
            raise RuntimeError(f"{tmp}: not enough free disk for a {2 * n_params / 2**30:.1f} GiB checkpoint")
        save_checkpoint(model, tmp)
        del model
        size = (Path(tmp) / "consolidated.00.pth").stat().st_size
        rows = [run_isolated("load_once", dict(config, dir=tmp, how=how)) for how in ("mmap", "plain")]
    return [dict(r, params=n_params, file_bytes=size) for r in rows]


def run_isolated(fn, config):
    """Run the benchmark function named fn on config in a fresh Python process, so its ru_maxrss is its own."""
    cmd = [sys.executable, __file__, "--_child", json.dumps(dict(config, fn=fn))]
    return json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])


MiB = lambda b: f"{b / 2**20:,.0f}"
TRAIN = {"run": lambda r: r["name"], "tokens/s": lambda r: f"{r['tokens_per_s']:,.0f}",
         "GFLOP/token": lambda r: f"{r['flops_per_token'] / 1e9:.3f}",
         "achieved GFLOP/s": lambda r: f"{r['tokens_per_s'] * r['flops_per_token'] / 1e9:,.1f}",
         "MFU": lambda r: f"{r['mfu']:.1%}", "peak mem (MiB)": lambda r: MiB(r["peak_mem_bytes"])}
COLUMNS = dict(attention=TRAIN, magnet=TRAIN, inference={
    "task": lambda r: r["name"], "context tokens": lambda r: str(r["context_tokens"]),
    "new tokens": lambda r: str(r["new_tokens"]), "tokens/s, KV cache": lambda r: f"{r['cached_tokens_per_s']:,.1f}",
    "tokens/s, no cache": lambda r: f"{r['uncached_tokens_per_s']:,.1f}",
    "speed-up": lambda r: f"{r['cached_tokens_per_s'] / r['uncached_tokens_per_s']:.1f}x",
    "same text": lambda r: "yes" if r["same_text"] else "NO"}, load={
    "load": lambda r: r["name"], "load (s)": lambda r: f"{r['load_s']:.2f}",
    "peak RSS increase (MiB)": lambda r: MiB(r["load_peak_bytes"]), "+ first read of weights (s)":
    lambda r: f"{r['read_s']:.2f}", "peak RSS increase incl. read (MiB)": lambda r: MiB(r["read_peak_bytes"])})


def markdown_table(rows, columns):
    """A markdown table: one row per result; `columns` maps each header to the function that formats its cell."""
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    return "\n".join(lines + ["| " + " | ".join(f(r) for f in columns.values()) + " |" for r in rows])


def describe(bench, config, results):
    """The line above each table: what exactly ran."""
    c, i = config, config["infer"]
    model = f"dim={c['dim']} n_layers={c['n_layers']} n_heads=8 batch={c['batch']} seq={c['seq']}"
    return dict(attention=f"{model} vocab=32000, hybrid mask, random tokens; no optimizer",
                magnet=f"{model} vocab={c['toy_vocab']} (toy world), LoRA r=16, AdamW; tokens = non-PAD tokens of "
                f"views A+B+C; FLOPs = 6N convention (frozen weights counted as if trained)",
                inference=f"dim={i['dim']} n_layers={i['n_layers']}, random weights, greedy, EOS disabled, batch 1",
                load=f"{results[0]['params'] / 1e9:.3f}B params, {results[0]['file_bytes'] / 2**30:.2f} GiB bf16 "
                f"file, just written, so read from the OS page cache; mmap RSS counts mapped file pages")[bench]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", default="attention,magnet,inference,load")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for name, default in dict(dim=512, n_layers=8, batch=8, seq=512, steps=3).items():  # steps: timed, after 1 warmup
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--backends", default="sdpa,math")
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere, 1 timed step")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one benchmark function in a fresh process
    a = p.parse_args()
    if a._child:
        config = json.loads(a._child)
        return print(json.dumps(globals()[config["fn"]](config)))
    benches, q = a.bench.split(","), a.quick
    if set(benches) - set(COLUMNS):
        p.error(f"--bench: unknown {sorted(set(benches) - set(COLUMNS))}; choose from {list(COLUMNS)}")
    if q:
        a.dim, a.n_layers, a.batch, a.seq, a.steps = 128, 2, 2, 128, 1
    config = dict(device=a.device, dtype=a.dtype, dim=a.dim, n_layers=a.n_layers, batch=a.batch, seq=a.seq,
                  steps=a.steps, stories=200 if q else 2000, toy_vocab=256,
                  infer=dict(dim=128 if q else 256, n_layers=2 if q else 4, context=16 if q else 64,
                             new=16 if q else 128, gap=8 if q else 32),
                  load=dict(dim=256 if q else 2048, n_layers=2 if q else 16, n_heads=16, vocab_size=1000 if q else 32000))
    cuda, dtype, n = torch.device(a.device).type == "cuda", getattr(torch, a.dtype), 512 if q else 2048
    mfu = {"attention", "magnet"} & set(benches)
    readings, results = [matmul_peak(dtype, a.device, n)] if mfu else [], {}
    for bench in benches:
        if bench == "attention":
            results[bench] = [train_step(dict(config, backend=b)) if cuda else run_isolated("train_step", dict(
                config, backend=b)) for b in a.backends.split(",")]
        elif bench == "magnet":
            results[bench] = [magnet_step(config) if cuda else run_isolated("magnet_step", config)]
        else:
            results[bench] = inference(config) if bench == "inference" else load_bench(config)
    readings += [matmul_peak(dtype, a.device, n)] if mfu else []
    peak = max(readings, default=None)
    for r in results.get("attention", []) + results.get("magnet", []):
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} torch={torch.__version__}; median "
          f"of {a.steps} timed run(s) after 1 warmup")
    if mfu:
        print(f"matmul peak ({a.dtype}, n={n}): {peak / 1e9:,.1f} GFLOP/s = MFU denominator (best of "
              f"{', '.join(f'{r / 1e9:,.1f}' for r in readings)}, read before/after the runs)")
    for bench, rows in results.items():
        print(f"\n## {bench}: {describe(bench, config, rows)}\n\n{markdown_table(rows, COLUMNS[bench])}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(config=config, matmul_peak_flops=peak, matmul_readings=readings, results=results), f,
                      indent=2)


if __name__ == "__main__":
    main()
