r"""Train MAGNET: one script from a laptop demo to Llama-2-7B on many GPUs.

    python train.py                                   # the toy world on a CPU (config/toy.py's defaults)
    python train.py config/stories260k.py --max_iters=200
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py --init_from=llama-2-7b \
        --tokenizer=tokenizer.model --data=wiki.train.raw

Without RANK in the environment it runs as one process; under torchrun it shards the model with FSDP2 (nccl on
CUDA, gloo on CPU), even with one process. Every rank builds the global batch of a step from (seed, step) and keeps
its own slice, and the token-mean losses are normalised by the global target count, so N processes follow the same
loss curve as one process with the same global batch (in fp32 to float rounding): every dropout is drawn for the
whole batch on every rank, each keeping its own rows (noise.py). Checkpoints hold the trainable state and the
optimizer; the data position and the random streams are functions of the step, so resuming replays the
uninterrupted run exactly. The run directory's safety (one process at a time, nothing replaced unless asked,
crash-proof checkpoints) is runs.py's.
"""
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from tqdm import tqdm

import runs
import toy
from attention import PAD
from checkpoint import (ENCODER_SETTINGS, CheckpointError, copy_tokenizer, load_checkpoint, save_adapter,
                        save_checkpoint, tokenizer_beside, write_atomic)
from config import MERGED_DTYPES, ConfigError, parse, use_bf16, validate_train_config
from data import IGNORE, BatchConfig, TextCorpus, Tokenizer, batch_rows, magnet_batch, read_pairs, text_start
from model import ModelArgs, Transformer, apply_lora
from objectives import magnet_losses
from runs import TrainingError


@dataclass
class Config(BatchConfig):  # data.BatchConfig's keys (batch_size ... instruction), plus these
    out_dir: str = "out"  # the run directory: log, config.json, checkpoints, adapter.pt, merged/
    init_from: str = "scratch"  # a base checkpoint (Meta directory or llama2.c .bin), or "scratch"
    pretrain_iters: int = 1000  # with init_from=scratch and lora: first train a causal base for this many steps
    tokenizer: str = ""  # "" = the base directory's tokenizer.model or .json, or the toy world's
    data: str = "toy"  # "toy" (the built-in toy world) or text file(s), comma-separated
    pairs: str = ""  # optional TSV of (text, positive) pairs for SSCL; without it a text's positive is itself + noise
    cache_dir: str = ".cache"  # where tokenized corpora are cached
    dim: int = 128  # model from scratch: width
    n_layers: int = 4  # model from scratch: blocks
    n_heads: int = 4  # model from scratch: attention heads
    n_kv_heads: int = 0  # model from scratch: key/value heads (0 = n_heads)
    multiple_of: int = 32  # model from scratch: the FFN width is rounded up to a multiple of this
    max_seq_len: int = 256  # model from scratch: the longest row it may see
    attn_backend: str = "sdpa"  # "sdpa" (fused) or "math" (the plain reference)
    dropout: float = 0.0  # residual dropout, in every forward (Llama-2 itself uses none)
    mask_piece: str = "_"  # the MNTP mask token's piece (unk where the vocabulary lacks it)
    lora: bool = True  # train LoRA adapters only (False = every parameter, as in pretraining)
    lora_rank: int = 16  # r
    lora_alpha: float = 32.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA branch's input
    w_mntp: float = 1.0  # weight of masked next-token prediction
    w_msg: float = 1.0  # weight of missing-span generation
    w_sscl: float = 1.0  # weight of sentence-level contrastive learning
    temperature: float = 0.05  # SSCL: cosine similarities are divided by this
    pooling: str = "last"  # sentence vector: "last" token (the paper's) or "mean"
    sscl_dropout: float = 0.3  # SimCSE noise without --pairs: attention dropout in the SSCL forward only (LLM2Vec's)
    max_iters: int = 400  # optimizer steps
    grad_accum: int = 1  # micro-batches per step
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 2e-4  # the cosine schedule's end
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW's
    grad_clip: float = 1.0  # max gradient norm
    spike_factor: float = 10.0  # stop if a loss exceeds this x the median of the last 50, from step 20 on (0 = off)
    device: str = "auto"  # auto = cuda if available, else cpu
    precision: str = "auto"  # "bf16" (bf16 compute; a LoRA base is stored bf16), "fp32", or "auto": bf16 on a GPU
    activation_checkpointing: bool = False  # recompute each block in backward instead of storing its activations
    seed: int = 0  # the data, the masks and the initial weights follow from it
    ckpt_interval: int = 100  # steps between checkpoints
    resume: bool = False  # continue the run in out_dir from its last checkpoint
    stop_at: int = 0  # stop (checkpointed) after this many steps, to resume later; 0 = run to max_iters
    overwrite: bool = False  # replace an existing out_dir (kept aside until the new run has finished)
    demo: bool = True  # the toy world: show an infill and a similarity ranking at the end
    merged_dtype: str = "float32"  # of the merged export: folding an adapter into bf16 weights loses most of it


# ----------------------------------------------------------------------------------------------------------------
# Setup: distributed, data, model

def setup_distributed(cfg):
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    kind = device.partition(":")[0]
    if kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"device={cfg.device}: expected auto, cpu or cuda[:N]" +
                          (" (this torch sees no CUDA GPU)" if kind == "cuda" else ""))
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    # a long timeout: rank 0 alone tokenizes a new corpus (minutes for Wikitext-103) while the others wait
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    if kind == "cuda":  # one GPU per process: cuda:LOCAL_RANK
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def setup_data(cfg, out, write):
    """The tokenizer, the training corpus and optional SSCL pairs. Only the process with write=True creates files
    (the toy world, the token cache); the others run afterwards and read them."""
    if cfg.data == "toy":
        toy_dir = out / "toy"
        if write:
            toy.write_world(toy_dir, seed=cfg.seed)
        corpus_path, tok_path = toy_dir / "stories.txt", toy_dir / "tok.model"
        pairs_path = cfg.pairs or toy_dir / "pairs.tsv"
    else:
        corpus_path, pairs_path = [Path(p) for p in cfg.data.split(",")], cfg.pairs
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else tokenizer_beside(cfg.init_from)
        if tok_path is None or not tok_path.is_file():
            raise ConfigError(f"tokenizer {tok_path or Path(cfg.init_from) / 'tokenizer.model'} not found; set "
                              "--tokenizer=PATH")
    tok = Tokenizer(cfg.tokenizer or tok_path, cfg.mask_piece)
    corpus = TextCorpus(corpus_path, tok, cache_dir=cfg.cache_dir)
    n = corpus.n_passages(cfg.sscl_len)
    if cfg.w_sscl and not pairs_path and n < cfg.batch_size:
        raise ConfigError(f"{cfg.data}: only {n} distinct SSCL passages for batches of {cfg.batch_size} rows, so "
                          "in-batch negatives would repeat the positives; give a larger corpus, --pairs=FILE or "
                          "--w_sscl=0")
    return tok, corpus, read_pairs(pairs_path) if pairs_path else None


def base_dtype(cfg):
    """With LoRA under bf16 the frozen base is bf16 (the adapters fp32); otherwise every weight is stored in fp32."""
    return torch.bfloat16 if cfg.lora and use_bf16(cfg) else torch.float32


def add_lora(model, cfg):  # adapters train in fp32 even when the base is bf16
    apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, dtype=torch.float32)


def build_model(cfg, tok):
    """The full model on the CPU (rank 0 only), LoRA applied, seeded: the one initial state of every run."""
    torch.manual_seed(cfg.seed)
    dtype = base_dtype(cfg)
    runtime = dict(attn_backend=cfg.attn_backend, dropout=cfg.dropout)
    if cfg.init_from == "scratch":
        args = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads or None,
                         vocab_size=tok.vocab_size, multiple_of=cfg.multiple_of, max_seq_len=cfg.max_seq_len,
                         **runtime)
        model = Transformer(args).to(dtype)
    else:
        model = load_checkpoint(cfg.init_from, dtype=dtype, vocab_size=tok.vocab_size, **runtime)
    longest = max(cfg.seq_len + 1, cfg.sscl_len + 2 + len(tok.encode(cfg.instruction)))
    if longest > model.args.max_seq_len:
        raise ConfigError(f"seq_len={cfg.seq_len} / sscl_len={cfg.sscl_len} need {longest} positions, beyond the "
                          f"model's max_seq_len={model.args.max_seq_len}")
    if cfg.lora:
        add_lora(model, cfg)
    return model


def fsdp_shard(full, cfg, rank, device):
    """FSDP2: build an empty copy (same dtypes) on the meta device, shard it per block and at the root, then let
    rank 0's full state dict be broadcast into the shards (so a 7B base is in host memory once, not once per rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    received = [full.args if rank == 0 else None]
    dist.broadcast_object_list(received, src=0)
    args = received[0]
    with torch.device("meta"):
        sharded = Transformer(args).to(base_dtype(cfg))
        if cfg.lora:
            add_lora(sharded, cfg)
    # bf16 compute, fp32 gradient reduction; forward inputs are not cast, so the RoPE angles stay fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if use_bf16(cfg) else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the run's device (FSDP2's default: any GPU)
    for block in sharded.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    sharded.to_empty(device=device)
    if args.tie_embeddings:
        sharded.output.weight = sharded.tok_embeddings.weight
    state = full.state_dict() if rank == 0 else {}
    set_model_state_dict(sharded, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


# ----------------------------------------------------------------------------------------------------------------
# One step

def lr_at(step, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def train_step(model, opt, corpus, pairs, cfg, step, rank, world, max_total=math.inf):
    """One optimizer step. The step's batch (batch_size * grad_accum rows) is a function of (seed, step) alone;
    gradient accumulation splits it into micro-batches and data parallelism splits each micro-batch over ranks.
    Returns the step's losses (global means) and the number of tokens it processed."""
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009)  # dropout: a function of (seed, step), on every rank
    batch = magnet_batch(corpus, replace(cfg, batch_size=cfg.batch_size * cfg.grad_accum),
                         np.random.default_rng([cfg.seed, step]), pairs)
    weights = dict(mntp=cfg.w_mntp, msg=cfg.w_msg, sscl=cfg.w_sscl)
    # token losses: this rank's sum of cross-entropies / (global count / world), so that FSDP's average of the ranks'
    # gradients is the gradient of the global token mean
    counts = {k: torch.tensor(max(1, int((batch[f"{k}_labels"] != IGNORE).sum())) / world) for k in ("mntp", "msg")}
    sums, own = {}, torch.arange(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    for i in range(cfg.grad_accum):  # SSCL's in-batch negatives: the micro-batch's rows on all ranks
        local = batch_rows(batch_rows(batch, i, cfg.grad_accum), rank, world)  # rows `own` of the micro-batch
        losses = magnet_losses(model, local, weights, cfg.temperature, cfg.pooling,
                               text_start(corpus.tokenizer, cfg.instruction),
                               sscl_dropout=0.0 if pairs else cfg.sscl_dropout,  # pairs differ without noise
                               target_counts=counts, micro_batches=cfg.grad_accum, rows=(own, cfg.batch_size))
        losses.pop("total").backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
    values = torch.stack(list(sums.values()))
    if world > 1:
        dist.all_reduce(values)
        values /= world
    step_losses = dict(zip(sums, values.tolist()))  # the global means, the same on every rank
    step_losses["total"] = sum(weights[k] * v for k, v in step_losses.items())
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    step_losses["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not all(math.isfinite(v) for v in step_losses.values()) or step_losses["total"] > max_total:
        raise TrainingError(f"non-finite or spiking loss at step {step} ({step_losses}; limit {max_total:.3g}); "
                            "stopped before the update")
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return step_losses, int((batch["roles"] != PAD).sum() + (batch["sscl_roles"] != PAD).sum())


# ----------------------------------------------------------------------------------------------------------------
# The loop, the exports, the run

def train(model, corpus, pairs, cfg, out, rank, world, device):
    """The training loop, from the last checkpoint when resuming; a checkpoint every ckpt_interval steps.
    Returns False when it stopped at stop_at (to be resumed), True when it ran to max_iters."""
    model.checkpoint_activations = cfg.activation_checkpointing
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start = runs.load_state(out, model, opt, rank) if cfg.resume and (out / "log.jsonl").exists() else 0
    log = runs.start_log(out, run_settings(cfg), start) if rank == 0 else None
    bar = tqdm(range(start, cfg.max_iters), initial=start, total=cfg.max_iters, disable=rank != 0,
               desc=out.name, dynamic_ncols=True)
    recent, saved, stopped = [], start, False  # recent: the last 50 total losses, for the spike guard
    for step in bar:
        t0 = time.perf_counter()
        max_total = cfg.spike_factor * float(np.median(recent)) if cfg.spike_factor and len(recent) >= 20 else math.inf
        try:
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(cfg) and not dist.is_initialized()):
                losses, tokens = train_step(model, opt, corpus, pairs, cfg, step, rank, world, max_total)
        except TrainingError as e:
            hint = (f"The checkpoint of step {saved} is intact: --resume=true continues from it" if saved else
                    "No checkpoint was written yet: --resume=true starts again from step 0")
            raise TrainingError(f"{e}. {hint} (perhaps with a lower --lr)") from None
        recent = (recent + [losses["total"]])[-50:]
        if rank == 0:
            record = dict(step=step, lr=lr_at(step, cfg), tokens_per_s=tokens / (time.perf_counter() - t0), **losses)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("mntp", "msg", "sscl")},
                            tok_s=f"{record['tokens_per_s']:.0f}")
        if (step + 1) % cfg.ckpt_interval == 0 or step + 1 in (cfg.max_iters, cfg.stop_at):
            runs.save_state(out, model, opt, step + 1, rank)
            saved = step + 1
        if step + 1 == cfg.stop_at < cfg.max_iters:
            stopped = True
            break
    if rank == 0:
        log.close()
    return not stopped


def export(out, model, full, tok, cfg, rank):
    """The adapter-only file and a merged Meta-format checkpoint (with the tokenizer), written by rank 0. Without
    torchrun `full` is the trained model itself; under FSDP the trained shards are gathered into rank 0's `full`."""
    if dist.is_initialized():
        trained = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                         ignore_frozen_params=True))
        if rank == 0:
            full.load_state_dict(trained, strict=False)
    if rank == 0:
        settings = {k: getattr(cfg, k) for k in ENCODER_SETTINGS}  # how to encode with this model
        if cfg.lora:
            save_adapter(full, out / "adapter.pt", overwrite=True, magnet=settings)
        save_checkpoint(full, out / "merged", overwrite=True, dtype=MERGED_DTYPES[cfg.merged_dtype])
        copy_tokenizer(tok.path, out / "merged")
        settings["max_seq_len"] = full.args.max_seq_len  # the merged files alone do not say (Meta's params.json)
        write_atomic(out / "merged" / "magnet.json", json.dumps(settings) + "\n")
        print(f"wrote {out / 'merged'} (Meta format + tokenizer, {cfg.merged_dtype})" +
              (f" and {out / 'adapter.pt'}; evaluate the exact model with --ckpt={cfg.init_from}::{out / 'adapter.pt'}"
               if cfg.lora and cfg.init_from != "scratch" else ""))  # a random scratch base is not saved
    runs.barrier()


def run_settings(cfg):
    """What defines a run, saved as its config.json: the config, and what the data files are (runs.check_resume)."""
    files = [] if cfg.data == "toy" else cfg.data.split(",")  # the toy world is made anew from the seed
    files += [cfg.pairs, cfg.tokenizer]
    return {**asdict(cfg), "data_files": {p: runs.file_identity(Path(p)) for p in files if p}}


def pretrain_base(cfg, rank, world, device):
    """Phase 1 of a run from scratch with LoRA: a causal base model, fully trained (all SPAN rows, MSG only), in
    out_dir/base; returns the config that adapts it with MAGNET (phase 2)."""
    base = Path(cfg.out_dir) / "base"
    if not (base / "merged" / "params.json").exists():
        run(replace(cfg, out_dir=str(base), lora=False, p_causal=1.0, w_mntp=0.0, w_sscl=0.0,
                    max_iters=cfg.pretrain_iters, pretrain_iters=0, stop_at=0, demo=False), rank, world, device)
    return replace(cfg, init_from=str(base / "merged"))


def run(cfg, rank, world, device):
    """One training run in cfg.out_dir, held for this process alone: data, model, loop, exports."""
    validate_train_config(cfg, world)
    out = Path(cfg.out_dir)
    with runs.exclusive_run_dir(out, cfg.overwrite, cfg.resume, rank, world):
        if cfg.init_from == "scratch" and cfg.lora and cfg.pretrain_iters > 0:
            cfg = pretrain_base(cfg, rank, world, device)
        if cfg.resume:
            runs.check_resume(out, run_settings(cfg))
        tok, corpus, pairs = runs.rank0_first(lambda: setup_data(cfg, out, write=rank == 0), rank, world)
        full = runs.rank0_first(lambda: build_model(cfg, tok) if rank == 0 else None, rank, world)
        model = fsdp_shard(full, cfg, rank, device) if dist.is_initialized() else full.to(device)
        if rank == 0:
            print(f"{f'FSDP2 (world size {world})' if dist.is_initialized() else 'one process'} on {device}, "
                  f"{'bf16 compute' if use_bf16(cfg) else 'fp32'}", file=sys.stderr)
        finished = train(model, corpus, pairs, cfg, out, rank, world, device)
        if not finished:
            if rank == 0:
                print(f"stopped after step {cfg.stop_at} (stop_at); continue with --resume=true")
            return
        export(out, model, full, tok, cfg, rank)
    if rank == 0 and cfg.demo and cfg.data == "toy":  # after the run is safely in place: a failed demo loses nothing
        exact = cfg.lora and cfg.init_from != "scratch"  # the base + adapter, or (a random base) the merged export
        toy.demo(out / "merged", cfg.init_from, out / "adapter.pt" if exact else None, cfg.seed)


def main(argv):
    try:
        cfg, _ = parse(argv, Config(), __doc__)
        rank, world, device = setup_distributed(cfg)
        try:
            run(cfg, rank, world, device)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print("interrupted: --resume=true continues from the last checkpoint", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, TrainingError, OSError, ValueError) as e:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 or not isinstance(e, (ConfigError, TrainingError)):  # those two every rank raises alike
            print(f"error: {e}" if rank == 0 else f"error on rank {rank}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if dist.is_torchelastic_launched():
        # Under torchrun, leave without tearing the interpreter down: gloo's worker threads may still be releasing
        # the tensors of the last collectives, and one that needs the GIL while Python finalizes aborts the process
        # ("terminate called without an active exception") after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
