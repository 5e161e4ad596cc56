"""Benchmarks for MAGNET: python bench.py [--bench=NAME,...] [--quick=true] [--out=FILE.json]

NAME: attention, magnet, inference, unknown_length, load, merge, vs_hf.

Each benchmark is one bench_* function; its docstring, printed above its table, says exactly what it measures.
MFU = achieved FLOP/s / the best matmul FLOP/s read before and after the runs (a measured ceiling, not a datasheet
number). Times: median of --steps timed runs after 1 warmup. Peak memory: on CUDA torch.cuda.max_memory_allocated; on
CPU each run is a fresh process, and its peak RSS (VmHWM, reset right before the run) minus the RSS then.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import toy
from attention import BACKENDS, CONTEXT, PAD, SPAN, hybrid_mask
from checkpoint import CheckpointError, load_adapter, load_checkpoint, merged_state_dict, save_checkpoint
from eval import EvalConfig, blanks, suite_ppl
from magnet import Magnet
from model import LoRALinear, ModelArgs, Transformer, apply_lora
from objectives import magnet_losses
from config import ConfigError, parse
from runs import check_result_path, provenance, write_result


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
    """Best FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs: n^3 multiply-adds), timed after `warmup` runs. On a GPU
    a timing covers 10 products in a row, so one launch and synchronisation do not count against the peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    per = 10 if torch.device(device).type == "cuda" else 1
    times = [timed(lambda: [a @ b for _ in range(per)], device) for _ in range(warmup + reps)]
    return 2 * n ** 3 * per / min(times[warmup:])


def hybrid_roles(batch, seq):
    """(batch, seq) roles like MAGNET's view A: CONTEXT, plus 1-3 SPAN runs of 8-32 tokens per row. The row is cut
    into k equal segments and one run placed at random inside each, so runs never overlap."""
    roles = torch.full((batch, seq), CONTEXT, dtype=torch.long)
    for row in roles:
        k = int(torch.randint(1, 4, ()))
        for i in range(k):  # segment i of length seq // k
            length = min(int(torch.randint(8, 33, ())), seq // k)
            start = i * (seq // k) + int(torch.randint(0, seq // k - length + 1, ()))
            row[start:start + length] = SPAN
    return roles


def flops_per_token(model, seq):
    """FLOPs per token of full forward+backward: 6 N + 12 n_layers dim seq (PaLM appendix B, as in nanoGPT). N: all
    parameters but the token embedding (a lookup); 6 = 2 FLOPs per multiply-add x 3 (forward, backward to inputs and
    to weights). 12 n_layers dim seq: Q K^T and P V over all seq x seq."""
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return 6 * n + 12 * model.args.n_layers * model.args.dim * seq


def lora_flops_per_token(model, seq, logit_share):
    """Real FLOPs per token of a LoRA training step. The frozen weights get no weight gradient: 4 N_layers (forward and
    input gradient, 2 FLOPs per multiply-add each) + 4 V dim x logit_share (the output projection, only where logits
    are computed) + 12 n_layers dim seq (Q K^T and P V over all seq x seq, forward + backward) + 6 N_LoRA (LoRA's
    own weights: forward, input and weight gradients)."""
    frozen = sum(p.numel() for n, p in model.layers.named_parameters() if "lora_" not in n and p.dim() == 2)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return 4 * frozen + 4 * model.output.weight.numel() * logit_share + \
        12 * model.args.n_layers * model.args.dim * seq + 6 * n_lora


def memory(device, peak=False):
    """Bytes. peak=False: in use now, and resets the peak; peak=True: the peak since. CUDA: 0 (all live tensors count)
    and max_memory_allocated. CPU (Linux): VmRSS and its high-water mark VmHWM (ru_maxrss counts the parent too)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.reset_peak_memory_stats() or 0
    if not peak:  # reset the high-water mark VmHWM to the RSS now (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    return int(Path("/proc/self/status").read_text().split("VmHWM:" if peak else "VmRSS:")[1].split()[0]) * 1024


def isolated(fn, config):
    """fn(config) with child=True (the run itself); on CPU in a fresh Python process that holds only this run."""
    if torch.device(config["device"]).type == "cuda":
        return fn(dict(config, child=True))
    cmd = [sys.executable, __file__, "--_child", fn.__name__, json.dumps(dict(config, child=True))]
    return json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])


def bench_attention(config):
    """Forward + cross-entropy + backward (no optimizer) of a Llama-style Transformer (vocab 32000) on random tokens
    with the hybrid mask (each row CONTEXT with 1-3 SPAN runs of 8-32 tokens, MAGNET's view A), per attention
    backend. FLOPs/token = 6*N_nonembedding + 12*n_layers*dim*seq."""
    if not config.get("child"):  # each backend in its own run
        return [r for b in config["backends"].split(",") for r in isolated(bench_attention, dict(config, backend=b))]
    device, dtype, B, T = config["device"], getattr(torch, config["dtype"]), config["batch"], config["seq"]
    torch.manual_seed(0)  # the same weights and inputs for every backend
    args = ModelArgs(dim=config["dim"], n_layers=config["n_layers"], n_heads=8, vocab_size=32000, max_seq_len=T,
                     attn_backend=config["backend"])
    model = Transformer(args).to(device=device, dtype=dtype)
    tokens, targets = torch.randint(0, args.vocab_size, (2, B, T)).to(device)
    roles = hybrid_roles(B, T).to(device)
    before = memory(device)
    def step():  # one training step without the optimizer: gradients are freed, recomputed from scratch
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(tokens, roles).flatten(0, 1), targets.flatten()).backward()
    return [dict(name=config["backend"], tokens_per_s=B * T / median_time(step, config),
                 gflop_per_token=flops_per_token(model, T) / 1e9, peak_mem_mib=(memory(device, True) - before) / 2**20)]


def toy_world(config):
    """The toy corpus, its paraphrase pairs and its tokenizer (toy.write_world), made in a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus, pairs, tok = toy.write_world(tmp, n_stories=config["stories"], vocab_size=config["toy_vocab"])
        return data.TextCorpus(corpus, tok, cache_dir=tmp), data.read_pairs(pairs), tok


def bench_magnet(config):
    """One full MAGNET training step, objectives.magnet_losses on one data.magnet_batch of the toy world (made once, untimed;
    view A rows of seq tokens, SSCL positives = paraphrase pairs) with a Llama-2-size vocabulary (32000): view A
    forward (MNTP+MSG, logits at target positions only), views B/C forward (SSCL), backward, AdamW on the LoRA (r=16)
    parameters. Tokens = non-PAD tokens of views A, B and C. With --dtype=bfloat16 the base is bf16 and the adapters
    fp32 under autocast, as train.py trains them; --checkpoint_activations recomputes each block in backward."""
    if not config.get("child"):
        return isolated(bench_magnet, config)
    device, dtype = config["device"], getattr(torch, config["dtype"])
    corpus, pairs, tok = toy_world(config)
    torch.manual_seed(0)
    cfg = data.BatchConfig(batch_size=config["batch"], seq_len=config["seq"] - 1)  # view A: BOS + seq_len tokens
    batch = data.magnet_batch(corpus, cfg, np.random.default_rng(0), pairs)
    args = ModelArgs(dim=config["dim"], n_layers=config["n_layers"], n_heads=config["heads"], vocab_size=32000,
                     max_seq_len=config["seq"])  # Llama-2's vocabulary
    with torch.device(device):  # initialised where it runs (a 7B-shape model on the GPU)
        model = apply_lora(Transformer(args).to(dtype), rank=16, dtype=torch.float32)
    model.checkpoint_activations = config["checkpoint_activations"]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = memory(device)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = magnet_losses(model, batch, dict(mntp=1.0, msg=1.0, sscl=1.0))["total"]
        loss.backward()
        opt.step()
    # FLOPs: view A with logits at its target positions, views B/C without the output projection
    n_a, n_bc = int((batch["roles"] != PAD).sum()), int((batch["sscl_roles"] != PAD).sum())
    targets = int(((batch["mntp_labels"] != data.IGNORE) | (batch["msg_labels"] != data.IGNORE)).sum())
    flops = n_a * lora_flops_per_token(model, batch["tokens"].shape[1], targets / n_a) + \
        n_bc * lora_flops_per_token(model, batch["sscl_tokens"].shape[1], 0.0)
    return [dict(name=f"magnet ({args.attn_backend})", tokens_per_s=(n_a + n_bc) / median_time(step, config),
                 gflop_per_token=flops / (n_a + n_bc) / 1e9, peak_mem_mib=(memory(device, True) - before) / 2**20)]


def inference_setup(config, dim, n_layers):
    """A random Magnet (EOS disabled: a random model may pick it) and a prompt, left and right of ~context tokens."""
    c, device = config["inference"], config["device"]
    corpus, _, tok = toy_world(config)
    tok.eos_id = -1  # with no EOS, generate makes exactly the tokens asked for
    torch.manual_seed(0)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=8, vocab_size=tok.vocab_size, max_seq_len=1024)
    magnet = Magnet(Transformer(args).to(device=device, dtype=getattr(torch, config["dtype"])).eval(), tok)
    ids = corpus.tokens[corpus.tokens != tok.bos_id]  # toy-world text, cut into pieces of ~context tokens
    return (magnet, *(tok.decode(ids[i * c["context"]:(i + 1) * c["context"]]) for i in range(3)))


def bench_unknown_length(config):
    """Magnet.infill not told the gap's length (gaps of 1..max_tokens proposed in one batched, cached decode, then
    read by the causal LM) against told it (the longest length, or the true one; cached): seconds per call and the
    ratio. Rows: a random model with ~context tokens a side; then the --real_* base + adapter on 10 of eval.py's
    text blanks (1-8 tokens, up to 64 context tokens a side), told the true length vs choosing among 1..8."""
    magnet, _, left, right = inference_setup(config, config["inference"]["dim"], config["inference"]["n_layers"])
    out = []
    for n in (4, 8, 16):
        told = median_time(lambda: magnet.infill(left, right, n), config)
        not_told = median_time(lambda: magnet.infill(left, right, max_tokens=n), config)
        out.append(dict(name=f"random, dim {config['inference']['dim']}", max_tokens=n, told_s=told,
                        not_told_s=not_told, ratio=not_told / told))
    c = config["real"]
    real = Magnet.load(c["base"], c["tokenizer"], adapter=c["adapter"])
    items = blanks(real, EvalConfig(text_data=c["text"], limit=60))[:10]
    told = sum(median_time(lambda: real.infill_ids(left, right, len(gap)), config) for left, gap, right, _ in items)
    not_told = sum(median_time(lambda: real.infill_ids(left, right, max_tokens=8), config)
                   for left, _, right, _ in items)
    return out + [dict(name=f"{Path(c['base']).name} + adapter", max_tokens=8, told_s=told / len(items),
                       not_told_s=not_told / len(items), ratio=not_told / told)]


def bench_inference(config):
    """New tokens/s of Magnet.generate and Magnet.infill (random weights, batch 1, greedy, EOS disabled) with the KV
    cache and without it (the whole row recomputed for every new token), at two sizes: a small model (the `inference`
    config) and the --dim / --n_layers of the training benchmarks. A time is one whole call: tokenizing and the
    prompt/context pass included; cached: median of --steps calls after a warmup; recomputed: one call (a forward of
    the whole row per new token: minutes at the larger size). same_text: both calls returned the same text."""
    c = config["inference"]
    out = []
    for dim, n_layers in dict.fromkeys([(c["dim"], c["n_layers"]), (config["dim"], config["n_layers"])]):
        magnet, prompt, left, right = inference_setup(config, dim, n_layers)
        def row(task, n, context, call):  # call(use_cache) -> the new text; timed with the KV cache and without
            cached, text = [], []
            tps = {True: n / median_time(lambda: cached.append(call(True)), config),
                   False: n / timed(lambda: text.append(call(False)), config["device"])}
            return dict(name=task, dim=dim, n_layers=n_layers, context_tokens=len(context), new_tokens=n,
                        cached_tokens_per_s=tps[True], uncached_tokens_per_s=tps[False], speedup=tps[True] / tps[False],
                        same_text=cached[-1] == text[-1])
        out += [row("generate", c["new"], magnet.tok.encode(prompt, bos=True),
                    lambda u: magnet.generate(prompt, c["new"], use_cache=u)),
                row("infill", c["gap"], sum(magnet.tok.context_ids(left, right), []),
                    lambda u: magnet.infill(left, right, c["gap"], use_cache=u))]
    return out


def bench_load(config):
    """Load time and peak RSS increase of a just-written (so page-cached) synthetic bf16 Meta checkpoint, each way in
    a fresh process: mmap = checkpoint.load_checkpoint (mmap + meta device + assign; includes torch's one-off imports for
    the meta device); plain = torch.load without mmap + a random-init bf16 model + load_state_dict (a copy). read_s:
    then summing every weight once (mmap pays for its pages here; its RSS counts the mapped, shared file pages)."""
    if not config.get("child"):  # write the checkpoint, load it each way, delete it
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_default_dtype(torch.bfloat16)  # built directly in bf16: no fp32 copy on the way
            model = Transformer(ModelArgs(**config["load"], multiple_of=256))
            torch.set_default_dtype(torch.float32)
            save_checkpoint(model, tmp)  # ~2 GiB at full size, in the system temp dir; deleted with it
            del model
            return [isolated(bench_load, dict(config, device="cpu", dir=tmp, how=how)) for how in ("mmap", "plain")]
    directory, before, t0 = Path(config["dir"]), memory("cpu"), time.perf_counter()
    if config["how"] == "mmap":
        model = load_checkpoint(directory, dtype=torch.bfloat16)
    else:  # the whole file into memory, a second full-size model (random init), then a copy into it
        state = torch.load(directory / "consolidated.00.pth", map_location="cpu", mmap=False, weights_only=True)
        torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16 (this process ends after the run)
        model = Transformer(ModelArgs(**json.loads((directory / "params.json").read_text())))
        model.load_state_dict(state)
    t1, load_peak = time.perf_counter(), memory("cpu", peak=True) - before
    torch.stack([p.sum() for p in model.parameters()]).sum()  # read every weight once
    return dict(name=config["how"], params_billion=sum(p.numel() for p in model.parameters()) / 1e9,
                file_gib=(directory / "consolidated.00.pth").stat().st_size / 2**30, load_s=t1 - t0,
                load_peak_mib=load_peak / 2**20, read_s=time.perf_counter() - t1,
                read_peak_mib=(memory("cpu", peak=True) - before) / 2**20)


def bench_merge(config):
    """What the merged export's dtype costs. The base is rounded to bf16 (its dtype on a GPU) and a trained adapter
    is added; held-out perplexity (eval.py's ppl suite, computed in fp32 throughout, so only the stored weights
    differ) of the bf16 base alone, the base + adapter unmerged (the model that was trained), and the export merged
    into fp32 and into bf16. update_lost = |merged - base - update| / |update| over all adapted weights."""
    c = config["real"]
    tok = data.Tokenizer(c["tokenizer"])
    model = load_checkpoint(c["base"], vocab_size=tok.vocab_size)
    model.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    settings = EvalConfig(text_data=c["text"], limit=c["limit"])
    ppl = lambda m: suite_ppl(Magnet(m.eval(), tok), settings)["ppl"]
    rows = [dict(name="bf16 base, no adapter", ppl=ppl(model), update_lost=1.0)]
    load_adapter(model, c["adapter"])
    rows.append(dict(name="bf16 base + adapter, unmerged", ppl=ppl(model), update_lost=0.0))
    for dtype in (torch.float32, torch.bfloat16):
        merged = Transformer(model.args)
        merged.load_state_dict({k: v.float() for k, v in merged_state_dict(model, dtype).items()})
        lost = [(merged.get_submodule(n).weight - m.weight - m.delta()).norm() ** 2 / m.delta().norm() ** 2
                for n, m in model.named_modules() if isinstance(m, LoRALinear)]
        rows.append(dict(name=f"merged into {str(dtype)[6:]}", ppl=ppl(merged),
                         update_lost=float(torch.stack(lost).mean().sqrt().detach())))
    return rows


def view_a_batch(B, T, vocab, generator):
    """A synthetic MAGNET view A: random tokens, two 24-token SPAN runs per row (one in each half), 20% of the other
    positions MNTP targets; labels stored where they are predicted (label[t-1] = token t), as data.view_a does."""
    tokens = torch.randint(0, vocab, (B, T), generator=generator)
    roles = torch.full((B, T), CONTEXT, dtype=torch.long)
    for row in roles:
        for half in (0, T // 2):
            start = half + 1 + int(torch.randint(0, T // 2 - 25, (), generator=generator))
            row[start:start + 24] = SPAN
    msg, mntp = torch.full((B, T), data.IGNORE), torch.full((B, T), data.IGNORE)
    is_span, picked = roles[:, 1:] == SPAN, torch.rand(B, T - 1, generator=generator) < 0.2
    msg[:, :-1] = torch.where(is_span, tokens[:, 1:], data.IGNORE)
    mntp[:, :-1] = torch.where(~is_span & picked, tokens[:, 1:], data.IGNORE)
    return dict(tokens=tokens, roles=roles, mntp_labels=mntp, msg_labels=msg)


def bench_vs_hf(config):
    """The MAGNET view-A LoRA training step (MNTP + MSG on one hybrid-mask forward, backward, AdamW) here and in
    Hugging Face transformers + PEFT, same model (Llama, vocab 32000, fp32), same batch (view_a_batch), same LoRA
    (r=16, alpha 32, dropout --lora_dropout (default 0.05) on all seven projections); HF gets the hybrid mask as a
    4-D boolean attention_mask and one cross-entropy over its full logits. Fresh process per run on CPU, the two
    alternated, best of `rounds` medians. FLOPs: lora_flops_per_token (the real work of a LoRA step).
    page_faults_per_step: minor page faults (getrusage) of one more step after the timed ones."""
    if not config.get("child"):
        try:
            import peft, transformers  # noqa: F401 -- only the anchor needs them
        except ImportError as e:
            print(f"vs_hf: skipped, {e.name} is not installed (pip install transformers peft)")
            return []
        runs = [isolated(bench_vs_hf, dict(config, impl=impl)) for _ in range(config["rounds"])
                for impl in ("magnet", "hf_peft")]
        best = {impl: max((r for r in runs if r["name"] == impl), key=lambda r: r["tokens_per_s"])
                for impl in ("magnet", "hf_peft")}
        best["magnet"]["speedup_vs_hf"] = best["magnet"]["tokens_per_s"] / best["hf_peft"]["tokens_per_s"]
        best["hf_peft"]["speedup_vs_hf"] = 1.0
        return list(best.values())
    B, T, dim, L, V, device = config["batch"], config["seq"], config["dim"], config["n_layers"], 32000, config["device"]
    torch.manual_seed(0)
    batch = {k: v.to(device) for k, v in view_a_batch(B, T, V, torch.Generator().manual_seed(0)).items()}
    targets = torch.where(batch["mntp_labels"] != data.IGNORE, batch["mntp_labels"], batch["msg_labels"])
    args = ModelArgs(dim=dim, n_layers=L, n_heads=8, vocab_size=V, max_seq_len=T)
    if config["impl"] == "magnet":
        model = apply_lora(Transformer(args), rank=16, alpha=32, dropout=config["lora_dropout"]).to(device).train()
        loss_fn = lambda: magnet_losses(model, batch, dict(mntp=1.0, msg=1.0, sscl=0.0))["total"]
    else:
        import peft, transformers
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=dim, intermediate_size=args.hidden_dim, num_hidden_layers=L,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=T, rms_norm_eps=args.norm_eps,
            tie_word_embeddings=False, attn_implementation="sdpa"))
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=config["lora_dropout"], target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = peft.get_peft_model(hf, lora).to(device).train()
        positions = torch.arange(T, device=device).expand(B, T)
        mask = hybrid_mask(batch["roles"], positions, batch["roles"], positions)  # (B, 1, T, T) bool
        def loss_fn():  # MNTP and MSG targets never share a position: one cross-entropy over all logits
            logits = model(input_ids=batch["tokens"], attention_mask=mask).logits  # (B, T, V)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                     ignore_index=data.IGNORE)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = memory(device)
    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    seconds = median_time(step, config)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()  # one more, to count the page faults of a step in steady state (costly on VMs: docs/performance.md)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    with torch.device("meta"):  # the same shapes, to count FLOPs (HF computes every logit)
        shapes = apply_lora(Transformer(args), rank=16)
    logit_share = float((targets != data.IGNORE).float().mean()) if config["impl"] == "magnet" else 1.0
    flops = lora_flops_per_token(shapes, T, logit_share)
    return dict(name=config["impl"], tokens_per_s=B * T / seconds, gflop_per_token=flops / 1e9,
                peak_mem_mib=(memory(device, peak=True) - before) / 2**20, page_faults_per_step=faults)


def markdown_table(rows):
    """A markdown table whose headers are the keys of the result rows; floats get 3 decimals below 10, else 1."""
    cell = lambda v: (f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(rows[0]) + " |", "|---|" + "---:|" * (len(rows[0]) - 1)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r.values())) + " |" for r in rows])


SHARED = Path(os.environ.get("MAGNET_SHARED", Path(__file__).resolve().parent.parent / "shared"))


@dataclass
class BenchConfig:
    bench: str = "attention,magnet,inference,load"  # among attention magnet inference unknown_length load merge vs_hf
    real_base: str = str(SHARED / "assets/stories260K/stories260K.bin")  # merge, unknown_length: a real base
    real_tokenizer: str = str(SHARED / "assets/stories260K/tok512.model")  # ... its tokenizer
    real_text: str = str(SHARED / "data/tinystories/tinystories.txt")  # ... held-out text
    real_adapter: str = "runs/B/magnet/adapter.pt"  # ... an adapter of the base (from `bash experiments.sh B`)
    device: str = "cpu"  # cpu or cuda[:N]
    dtype: str = "float32"  # float32 or bfloat16
    dim: int = 512  # model width
    n_layers: int = 8  # blocks
    heads: int = 8  # attention heads (--bench=magnet)
    batch: int = 8  # rows a step
    seq: int = 512  # tokens a row
    steps: int = 3  # timed runs after 1 warmup
    checkpoint_activations: bool = False  # --bench=magnet: recompute each block in backward
    lora_dropout: float = 0.05  # --bench=vs_hf: LoRA dropout on both sides
    backends: str = "sdpa,math"  # --bench=attention: the attention paths to time
    quick: bool = False  # tiny sizes everywhere, 1 timed run
    out: str = ""  # also write the results as JSON to this file
    overwrite: bool = False  # replace an existing --out file


BENCHES = dict(attention=bench_attention, magnet=bench_magnet, inference=bench_inference,
               unknown_length=bench_unknown_length, load=bench_load, merge=bench_merge, vs_hf=bench_vs_hf)


def main(argv):
    a, _ = parse(argv, BenchConfig(), __doc__)
    benches, q = a.bench.split(","), a.quick
    if set(benches) - set(BENCHES):
        raise ConfigError(f"--bench: unknown {sorted(set(benches) - set(BENCHES))}; choose from {', '.join(BENCHES)}")
    if a.out:
        check_result_path(a.out, a.overwrite)  # now, not after the runs
    if min(a.dim, a.n_layers, a.heads, a.batch, a.seq, a.steps) < 1 or set(a.backends.split(",")) - set(BACKENDS) \
            or a.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dim, --n_layers, --heads, --batch, --seq and --steps must be >= 1; --backends among "
                          f"{BACKENDS}; --dtype float32 or bfloat16")
    if q:
        a.dim, a.n_layers, a.batch, a.seq, a.steps = 128, 2, 2, 128, 1
    config = dict(device=a.device, dtype=a.dtype, dim=a.dim, n_layers=a.n_layers, heads=a.heads, batch=a.batch,
                  seq=a.seq, steps=a.steps, checkpoint_activations=a.checkpoint_activations, backends=a.backends,
                  lora_dropout=a.lora_dropout,
                  rounds=1 if q else 3, stories=200 if q else 2000, toy_vocab=256,
                  inference=dict(zip(("dim", "n_layers", "context", "new", "gap"),  # context: prompt/left/right
                                     (128, 2, 16, 16, 8) if q else (256, 4, 64, 512, 512))),
                  load=dict(zip(("dim", "n_layers", "vocab_size"), (256, 2, 1000) if q else (2048, 16, 32000)),
                            n_heads=16),
                  real=dict(base=a.real_base, tokenizer=a.real_tokenizer, text=a.real_text,
                            adapter=a.real_adapter, limit=100 if q else 500))
    n = 512 if q else 8192 if a.device.startswith("cuda") else 2048  # a GPU reaches its peak only on large products
    dtype, mfu = getattr(torch, a.dtype), {"attention", "magnet", "vs_hf"} & set(benches)
    readings = [matmul_peak(dtype, a.device, n)] if mfu else []
    results = {b: BENCHES[b](config) for b in benches}
    readings += [matmul_peak(dtype, a.device, n)] if mfu else []
    for r in results.get("attention", []) + results.get("magnet", []) + results.get("vs_hf", []):
        achieved = r["tokens_per_s"] * r["gflop_per_token"] * 1e9
        r.update(achieved_gflop_s=achieved / 1e9, mfu_percent=100 * achieved / max(readings))
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} torch={torch.__version__}; times: "
          f"median of {a.steps} timed run(s) after 1 warmup\nconfig: {json.dumps(config)}")
    if mfu:
        print(f"matmul peak ({a.dtype}, n={n}): {max(readings) / 1e9:,.1f} GFLOP/s = MFU denominator (best of "
              f"{', '.join(f'{r / 1e9:,.1f}' for r in readings)}, read before/after the runs)")
    for bench, rows in results.items():
        print(f"\n## {bench}\n{' '.join(BENCHES[bench].__doc__.split())}\n\n{markdown_table(rows)}")
    if a.out:
        allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}  # glibc tuning, if any was set
        report = dict(provenance=provenance(), config=config, allocator_env=allocator, matmul_readings=readings,
                      results=results)
        write_result(a.out, report, a.overwrite)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_child"]:  # internal: one run in a fresh process (see isolated): [function name, config]
        print(json.dumps(globals()[sys.argv[2]](json.loads(sys.argv[3]))))
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
