"""Train MAGNET: one script from a laptop demo to Llama-2-7B on many GPUs.

    python train.py                                   # the toy world on a CPU (config/toy.py's defaults)
    python train.py config/stories260k.py --max_iters=200
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py --init_from=llama-2-7b \
        --tokenizer=tokenizer.model --data=wiki.train.raw

Without RANK in the environment it runs as one process; under torchrun it shards the model with FSDP2 (nccl on
CUDA, gloo on CPU), even with one process. Every rank builds the global batch of a step from (seed, step) and keeps
its own slice, and the token-mean losses are normalised by the global target count, so N processes follow the same
loss curve as one process with the same global batch (in fp32 to float rounding; in bf16, autocast in one process
and FSDP2's bf16 policy round differently). Checkpoints hold the trainable state and the optimizer; the data position
and the random streams are functions of the step, so resuming replays the uninterrupted run exactly.
"""
import ast
import contextlib
import datetime
import fcntl
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from tqdm import tqdm

import data
from attention import BACKENDS, PAD
from data import IGNORE, BatchConfig, TextCorpus, Tokenizer, batch_rows
from magnet import SETTINGS, Magnet
from model import (CheckpointError, ModelArgs, Transformer, apply_lora, load_checkpoint, read_json_object,
                   save_adapter, save_checkpoint)


@dataclass
class Config(BatchConfig):  # data.BatchConfig's keys (batch_size ... instruction), plus these
    out_dir: str = "out"
    init_from: str = "scratch"  # a base checkpoint (Meta directory or llama2.c .bin), or "scratch"
    pretrain_iters: int = 1000  # with init_from=scratch and lora: first train a causal base for this many steps
    tokenizer: str = ""  # "" = the base directory's tokenizer.model or .json, or the toy world's
    data: str = "toy"  # "toy" (the built-in toy world) or text file(s), comma-separated
    pairs: str = ""  # optional TSV of (text, positive) pairs for SSCL; without it a text's positive is itself + noise
    cache_dir: str = ".cache"  # tokenized corpora
    # a model from scratch
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads
    multiple_of: int = 32
    max_seq_len: int = 256
    attn_backend: str = "sdpa"
    dropout: float = 0.0  # residual dropout, in every forward (Llama-2 itself uses none)
    mask_piece: str = "_"  # the MNTP mask token's piece (unk where the vocabulary lacks it)
    # LoRA (False = train every parameter, as in pretraining)
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    # objectives
    w_mntp: float = 1.0
    w_msg: float = 1.0
    w_sscl: float = 1.0
    temperature: float = 0.05
    pooling: str = "last"
    # SimCSE noise when SSCL has no pairs (a text's positive is then a copy of it): attention dropout in the SSCL
    # forward (views B and C) only; 0.3 as LLM2Vec's SimCSE for Llama-2. Off with pairs, as LLM2Vec's supervised stage
    sscl_dropout: float = 0.3
    # optimisation
    max_iters: int = 400
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    spike_factor: float = 10.0  # stop if a loss exceeds this x the median of the last 50, from step 20 on (0 = off)
    # system
    device: str = "auto"  # auto = cuda if available
    precision: str = "auto"  # "bf16" (bf16 compute; a LoRA base is stored bf16), "fp32", or "auto": bf16 on a GPU
    activation_checkpointing: bool = False
    seed: int = 0
    ckpt_interval: int = 100
    resume: bool = False
    stop_at: int = 0  # stop (checkpointed) after this many steps, to resume later; 0 = run to max_iters
    overwrite: bool = False
    demo: bool = True
    merged_dtype: str = "float32"  # of the merged export: folding an adapter into bf16 weights loses most of it


class ConfigError(ValueError):
    pass


class TrainingError(RuntimeError):
    pass


MERGED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_config(argv):
    """Config defaults, then a config file (simple `key = literal` lines, never executed), then --key=value."""
    cfg, types = Config(), {f.name: type(f.default) for f in fields(Config)}

    def set_key(key, value, where):
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(types)}")
        t = types[key]
        if isinstance(value, str) and t is not str:  # from the command line
            try:
                value = {"true": True, "false": False}[value.lower()] if t is bool else t(value)
            except (KeyError, ValueError):
                pass  # still a str: reported just below
        if t is float and type(value) is int:
            value = float(value)
        if type(value) is not t:
            raise ConfigError(f"{where}: {key} expects {t.__name__}, got {value!r}")
        setattr(cfg, key, value)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: expected --key=value (the keys and their defaults: Config in train.py)")
            set_key(key, value, arg)
            continue
        path = Path(arg)
        if not path.is_file():
            raise ConfigError(f"{arg}: config file not found")
        try:
            tree = ast.parse(data.read_text(path), filename=arg)
        except SyntaxError as e:
            raise ConfigError(f"{arg}, line {e.lineno}: {e.msg}") from None
        for node in tree.body:
            where = f"{arg}, line {node.lineno}"
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                raise ConfigError(f"{where}: expected `key = literal`")
            try:
                value = ast.literal_eval(node.value)
            except (ValueError, TypeError):
                raise ConfigError(f"{where}: expected `key = literal`") from None
            set_key(node.targets[0].id, value, where)
    return cfg


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
        toy = out / "toy"
        if write:
            data.write_toy_world(toy, seed=cfg.seed)
        corpus_path, pairs_path, tok_path = toy / "stories.txt", cfg.pairs or toy / "pairs.tsv", toy / "tok.model"
    else:
        corpus_path, pairs_path = [Path(p) for p in cfg.data.split(",")], cfg.pairs
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else data.tokenizer_beside(cfg.init_from)
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
    return tok, corpus, data.read_pairs(pairs_path) if pairs_path else None


def rank0_first(fn, rank, world):
    """Run fn() on rank 0, then on the other ranks (which then find what rank 0 wrote). An error on rank 0 is
    raised on every rank, so none waits forever."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # any failure: the other ranks must hear of it, not wait in the broadcast below
            error = e
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return fn() if rank != 0 else result


def bf16(cfg):
    """Mixed precision: bf16 compute (autocast in one process, FSDP2's bf16 policy under torchrun). "auto" uses it on
    a GPU only (bf16 matmuls are slow on CPUs); "bf16" on a CPU runs the GPU's numerics there (tests/test_train.py)."""
    return torch.cuda.is_available() and cfg.device != "cpu" if cfg.precision == "auto" else cfg.precision == "bf16"


def base_dtype(cfg):
    """With LoRA under bf16 the frozen base is bf16 (the adapters fp32); otherwise every weight is stored in fp32."""
    return torch.bfloat16 if cfg.lora and bf16(cfg) else torch.float32


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


def shard(model_or_none, cfg, rank, device):
    """FSDP2: build an empty copy (same dtypes) on the meta device, shard it per block and at the root, then let
    rank 0's full state dict be broadcast into the shards (so a 7B base is in host memory once, not once per rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    box = [model_or_none.args if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    args = box[0]
    with torch.device("meta"):
        sharded = Transformer(args).to(base_dtype(cfg))
        if cfg.lora:
            add_lora(sharded, cfg)
    # bf16 compute, fp32 gradient reduction; forward inputs are not cast, so the RoPE angles stay fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16(cfg) else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the run's device (FSDP2's default: any GPU)
    for block in sharded.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)
    sharded.to_empty(device=device)
    if args.tie_embeddings:
        sharded.output.weight = sharded.tok_embeddings.weight
    full = model_or_none.state_dict() if rank == 0 else {}
    set_model_state_dict(sharded, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


# ----------------------------------------------------------------------------------------------------------------
# One step

def lr_at(step, cfg):
    """Linear warmup to lr, then cosine decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def train_step(magnet, opt, corpus, pairs, cfg, step, rank, world, max_total=math.inf):
    """One optimizer step. The step's batch (batch_size * grad_accum rows) is a function of (seed, step) alone;
    gradient accumulation splits it into micro-batches and data parallelism splits each micro-batch over ranks.
    Returns the step's losses (global means) and the number of tokens it processed."""
    torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)  # dropout noise: a function of (seed, step, rank)
    batch = data.magnet_batch(corpus, replace(cfg, batch_size=cfg.batch_size * cfg.grad_accum),
                              np.random.default_rng([cfg.seed, step]), pairs)
    counts = {k: int((batch[f"{k}_labels"] != IGNORE).sum()) for k in ("mntp", "msg")}
    sums = {}
    for i in range(cfg.grad_accum):  # SSCL's in-batch negatives: the micro-batch's rows on all ranks
        local = batch_rows(batch_rows(batch, i, cfg.grad_accum), rank, world)
        # token losses: this rank's sum of cross-entropies / (global count / world), so that FSDP's average of
        # the ranks' gradients is the gradient of the global token mean; SSCL is a mean per micro-batch
        local.update({f"{k}_count": torch.tensor(max(1, counts[k]) / world) for k in counts})
        per_step = {k: v / cfg.grad_accum if k == "sscl" else v for k, v in magnet.losses(local).items()
                    if k != "total"}
        sum(magnet.weights[k] * v for k, v in per_step.items()).backward()
        for k, v in per_step.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
    values = torch.stack(list(sums.values()))
    if world > 1:
        dist.all_reduce(values)
        values /= world
    out = dict(zip(sums, values.tolist()))
    out["total"] = sum(magnet.weights[k] * v for k, v in out.items())
    norm = torch.nn.utils.clip_grad_norm_([p for p in magnet.model.parameters() if p.requires_grad], cfg.grad_clip)
    out["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not all(math.isfinite(v) for v in out.values()) or out["total"] > max_total:  # same values on every rank
        raise TrainingError(f"non-finite or spiking loss at step {step} ({out}; limit {max_total:.3g}); stopped "
                            "before the update")
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out, int((batch["roles"] != PAD).sum() + (batch["sscl_roles"] != PAD).sum())


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (distributed checkpoint of the trainable state + optimizer) and exports

def dcp_error(e):
    """What went wrong in a DCP save/load, which wraps each rank's exception (Ctrl-C too) in a CheckpointException."""
    e = next(iter(e.failures.values()), (e,))[0] if isinstance(e, dcp.CheckpointException) else e  # (error, stack)
    if not isinstance(e, Exception):  # KeyboardInterrupt: an interruption, not a damaged checkpoint
        raise KeyboardInterrupt from None
    return f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__


def save_state(out, model, opt, step, rank):
    """DCP to ckpt.tmp, then swap it in: a crash at any moment leaves ckpt (or ckpt.old) complete and loadable."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    tmp, final, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: fine
    try:
        dcp.save({"model": msd, "optim": osd, "step": step}, checkpoint_id=tmp)
    except (Exception, dcp.CheckpointException) as e:  # a full disk: DCP says only "unexpected pos"
        raise TrainingError(f"{tmp}: writing the checkpoint of step {step} failed ({dcp_error(e)}); is the disk "
                            f"full? The previous checkpoint, if any, is intact in {final}") from None
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_state(out, model, opt, rank=0):
    """The step to continue from: the newest loadable checkpoint (ckpt, else ckpt.old, then the damaged one is
    removed); 0 when the run stopped before its first checkpoint."""
    paths = [p for p in (out / "ckpt", out / "ckpt.old") if (p / ".metadata").exists()]
    if not paths:
        found = [p.name for p in (out / "ckpt", out / "ckpt.old", out / "merged", out / "adapter.pt") if p.exists()]
        if found or not (out / "config.json").exists():
            raise ConfigError(f"--resume: {out} has no loadable checkpoint, yet it is not a run stopped before its "
                              f"first one ({', '.join(found) or 'no config.json'}); --overwrite=true starts it over")
        if rank == 0:
            print(f"--resume: {out} has no checkpoint yet; starting from step 0", file=sys.stderr)
        return 0
    failures = []
    for path in paths:
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": msd, "optim": osd, "step": 0}
        try:
            dcp.load(state, checkpoint_id=path)  # every trainable key must be in the checkpoint
        except (Exception, dcp.CheckpointException) as e:  # damaged, or made for another model
            failures.append(f"{path}: {dcp_error(e)}")
            continue
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))  # the frozen base is not in it: it comes from init_from
        if failures and rank == 0:  # ckpt is damaged: dropped, so that the next save cannot make it ckpt.old
            print(f"--resume: {failures[0]}; continuing from {path} instead", file=sys.stderr)
            shutil.rmtree(out / "ckpt", ignore_errors=True)
        return state["step"]
    raise ConfigError("--resume: no checkpoint of this run can be loaded (damaged, or made for another model): "
                      + "; ".join(failures) + ". --overwrite=true starts the run over")


def export(out, model, full_model, tok, cfg, rank):
    """Adapter-only file and merged Meta-format checkpoint (with the tokenizer), written by rank 0. Without torchrun
    full_model is the trained model itself; under FSDP the trained shards are gathered into rank 0's full_model."""
    if dist.is_initialized():
        trained = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                         ignore_frozen_params=True))
        if rank == 0:
            full_model.load_state_dict(trained, strict=False)
    if rank == 0:
        settings = {k: getattr(cfg, k) for k in SETTINGS}  # how to encode with this model (magnet.read_settings)
        if cfg.lora:
            save_adapter(full_model, out / "adapter.pt", overwrite=True, magnet=settings)
        save_checkpoint(full_model, out / "merged", overwrite=True, dtype=MERGED_DTYPES[cfg.merged_dtype])
        data.copy_tokenizer(tok.path, out / "merged")
        (out / "merged" / "magnet.json").write_text(json.dumps(settings) + "\n")
    barrier()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def demo(out, cfg):
    """Show the two things MAGNET adds, on held-out toy-world data (with the base + adapter: exact at any dtype)."""
    tok = data.tokenizer_beside(out / "merged")
    m = Magnet.load(cfg.init_from, tok, adapter=out / "adapter.pt") if cfg.lora else Magnet.load(out / "merged", tok)
    (left, answer, right), (left2, answer2, right2) = data.toy_blanks(2, data.EVAL_SEED + cfg.seed)
    fill = m.infill(left, right, len(m.tok.encode(answer)))
    print(f"\ninfill (only the right context names the object; answer: {answer}):\n  {left} [{fill}]{right}")
    print(f"infill, not told the length (answer: {answer2}, {len(m.tok.encode(answer2))} tokens):\n"
          f"  {left2} [{m.infill(left2, right2)}]{right2}")
    pairs = data.toy_pairs(40, data.EVAL_SEED + cfg.seed, "test")
    query, positive = next((a, b) for a, b, s in pairs if s == 5.0)
    candidates = [positive] + [b for _, b, s in pairs if s == 0.0][:4]
    vectors = torch.nn.functional.normalize(m.encode([query] + candidates), dim=-1)
    scores = (vectors[1:] @ vectors[0]).tolist()
    print(f"cosine similarity to {query!r} (its paraphrase: {positive!r}):")
    for s, c in sorted(zip(scores, candidates), reverse=True):
        print(f"  {s:+.3f}  {c}")


# ----------------------------------------------------------------------------------------------------------------
# The run

POSITIVE = ("batch_size", "grad_accum", "max_iters", "ckpt_interval", "seq_len", "sscl_len", "lr", "temperature",
            "lora_alpha", "grad_clip", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len")
NON_NEGATIVE = ("min_lr", "warmup_iters", "weight_decay", "spike_factor", "pretrain_iters", "stop_at", "max_spans",
                "n_kv_heads", "w_mntp", "w_msg", "w_sscl", "seed")


def check(cfg, world):
    """Reject a bad configuration before anything is trained or overwritten."""
    problems = [f"{k} must be > 0 (got {getattr(cfg, k)})" for k in POSITIVE if not getattr(cfg, k) > 0]
    problems += [f"{k} must be >= 0 (got {getattr(cfg, k)})" for k in NON_NEGATIVE if not getattr(cfg, k) >= 0]
    problems += [f"{k} must be a finite number (got {v})" for k, v in asdict(cfg).items()
                 if isinstance(v, float) and not math.isfinite(v)]
    problems += [f"{k} must be in [0, 1) (got {getattr(cfg, k)})" for k in ("dropout", "lora_dropout", "sscl_dropout")
                 if not 0 <= getattr(cfg, k) < 1]
    problems += [msg for bad, msg in [
        (cfg.w_mntp + cfg.w_msg + cfg.w_sscl == 0, "w_mntp, w_msg and w_sscl are all 0: nothing to train"),
        (cfg.batch_size % world, f"batch_size={cfg.batch_size} must be divisible by the {world} processes"),
        (not 1 <= cfg.span_min <= cfg.span_max, f"need 1 <= span_min <= span_max (got {cfg.span_min}, {cfg.span_max})"),
        (not (0 <= cfg.p_causal <= 1 and 0 <= cfg.mntp_rate <= 1), "p_causal and mntp_rate must be in [0, 1]"),
        (cfg.lora and cfg.lora_rank <= 0, f"lora_rank must be > 0 (got {cfg.lora_rank})"),
        (cfg.pooling not in ("last", "mean"), f"pooling must be 'last' or 'mean' (got {cfg.pooling!r})"),
        (cfg.attn_backend not in BACKENDS, f"attn_backend must be one of {BACKENDS} (got {cfg.attn_backend!r})"),
        (cfg.w_sscl > 0 and cfg.data != "toy" and not cfg.pairs and cfg.sscl_dropout == 0 and cfg.dropout == 0,
         "SSCL would compare each text with an identical copy (no --pairs, no noise): set --sscl_dropout=0.3 "
         "(SimCSE noise, LLM2Vec's value), give --pairs=FILE, or turn SSCL off with --w_sscl=0"),
        (cfg.precision not in ("auto", "bf16", "fp32"),
         f"precision must be 'auto', 'bf16' or 'fp32' (got {cfg.precision!r})"),
        ("RANK" in os.environ and cfg.lora and bf16(cfg) and tuple(map(int, torch.__version__.split(".")[:2])) < (2, 8),
         f"FSDP2 in torch {torch.__version__} needs one dtype per block, but a bf16 base under fp32 LoRA adapters has "
         "two (torch >= 2.8 allows it): upgrade torch, or train with --precision=fp32"),
        (cfg.merged_dtype not in MERGED_DTYPES, f"merged_dtype must be one of {list(MERGED_DTYPES)} "
                                                 f"(got {cfg.merged_dtype!r})"),
        (cfg.init_from != "scratch" and not Path(cfg.init_from).exists(),
         f"init_from={cfg.init_from}: no such checkpoint"),
        (cfg.data != "toy" and not all(Path(p).is_file() for p in cfg.data.split(",")),
         f"data={cfg.data}: corpus file not found"),
    ] if bad]
    if problems:
        raise ConfigError("; ".join(problems))


@contextlib.contextmanager
def hold(out, cfg, rank, world):
    """The run directory, for this run alone: a lock refuses a second process on the same out_dir; an existing run,
    or a non-empty directory that is not a run, is refused without --overwrite; with it the old directory is moved
    aside (OUT.replaced) until the new run has finished or stopped at stop_at, and is put back if the new one fails.
    Nothing a user has is lost to a failed run."""
    backup, lock, moved = out.with_name(out.name + ".replaced"), None, False

    def acquire():
        nonlocal lock, moved
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.with_name(out.name + ".lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends, however it ends
        except BlockingIOError:
            raise ConfigError(f"{out}: another process is running in it (it holds {lock.name})") from None
        if backup.exists():
            raise ConfigError(f"{backup} holds the run that an interrupted --overwrite was replacing: move it back "
                              f"to {out} or delete it")
        ours = any((out / f).exists() for f in ("log.jsonl", "toy", "base.lock"))  # what a run writes first
        if out.exists() and not cfg.overwrite and (not out.is_dir() or (not ours and any(out.iterdir()))):
            raise ConfigError(f"{out} exists and is not a train.py run; pass --overwrite=true to replace it (it is "
                              "kept until the new run has finished), or another --out_dir")
        if (out / "log.jsonl").exists() and not (cfg.resume or cfg.overwrite):
            raise ConfigError(f"{out} already holds a run; pass --resume=true to continue it, --overwrite=true to "
                              "start over, or another --out_dir")
        if cfg.overwrite and not cfg.resume and out.exists():
            out.rename(backup)
            moved = True

    try:
        rank0_first(lambda: acquire() if rank == 0 else None, rank, world)
        yield
    except BaseException:
        if moved:
            shutil.rmtree(out, ignore_errors=True)
            backup.rename(out)
            print(f"the run this one was replacing is back in {out}", file=sys.stderr)
        raise
    finally:
        if lock:
            lock.close()
    if moved:
        shutil.rmtree(backup) if backup.is_dir() and not backup.is_symlink() else backup.unlink()


MAY_CHANGE_ON_RESUME = {"out_dir", "resume", "overwrite", "stop_at", "max_iters", "lr", "min_lr", "warmup_iters",
                        "grad_clip", "spike_factor", "ckpt_interval", "device", "activation_checkpointing",
                        "cache_dir", "demo", "merged_dtype", "precision"}


def check_resume(out, cfg):
    """A resume continues the same run: only schedule and system keys may differ from the saved config.json."""
    saved = read_json_object(out / "config.json", "the run's settings")
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
               if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume: {out / 'config.json'} defines the run differently ({', '.join(changed)}); only "
                          f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change. Start a new run in another --out_dir")


def read_log(path, before):
    """The log lines of steps < before (a resume runs the later ones again); a damaged line is an error."""
    lines = path.read_text().splitlines() if before else []
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}, line {n}: damaged log line {line[:60]!r}; delete it (and any after it) "
                              "to resume") from None
    return [line for line in lines if json.loads(line)["step"] < before]


def run(cfg, rank, world, device):
    out = Path(cfg.out_dir)
    if not out.name:
        raise ConfigError(f"out_dir={cfg.out_dir!r}: expected a directory name")
    check(cfg, world)
    with hold(out, cfg, rank, world):
        if cfg.init_from == "scratch" and cfg.lora and cfg.pretrain_iters > 0:
            base = out / "base"  # phase 1: a causal base model, fully trained, then LoRA-adapted with MAGNET
            if not (base / "merged" / "params.json").exists():
                run(replace(cfg, out_dir=str(base), lora=False, p_causal=1.0, w_mntp=0.0, w_sscl=0.0,
                            max_iters=cfg.pretrain_iters, pretrain_iters=0, stop_at=0, demo=False),
                    rank, world, device)
            cfg = replace(cfg, init_from=str(base / "merged"))
        if cfg.resume and (out / "config.json").exists():
            check_resume(out, cfg)
        train(cfg, out, rank, world, device)


def train(cfg, out, rank, world, device):
    tok, corpus, pairs = rank0_first(lambda: setup_data(cfg, out, write=rank == 0), rank, world)
    full = rank0_first(lambda: build_model(cfg, tok) if rank == 0 else None, rank, world)
    sharded = dist.is_initialized()  # under torchrun FSDP2 shards even one process: one GPU tests the multi-GPU path
    model = shard(full, cfg, rank, device) if sharded else full.to(device)
    model.checkpoint_activations = cfg.activation_checkpointing
    if rank == 0:
        print(f"{f'FSDP2 (world size {world})' if sharded else 'one process'} on {device}, "
              f"{'bf16 compute' if bf16(cfg) else 'fp32'}", file=sys.stderr)
    magnet = Magnet(model.train(), tok, cfg.w_mntp, cfg.w_msg, cfg.w_sscl, cfg.temperature, cfg.pooling,
                    cfg.instruction, sscl_dropout=0.0 if pairs else cfg.sscl_dropout)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    start = load_state(out, model, opt, rank) if cfg.resume and (out / "log.jsonl").exists() else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        kept = read_log(out / "log.jsonl", start)
        log = open(out / "log.jsonl", "w")
        log.write("".join(r + "\n" for r in kept))
    bar = tqdm(range(start, cfg.max_iters), initial=start, total=cfg.max_iters, disable=rank != 0,
               desc=out.name, dynamic_ncols=True)
    stopped, recent, saved = False, [], start
    for step in bar:
        t0 = time.perf_counter()
        max_total = cfg.spike_factor * float(np.median(recent)) if cfg.spike_factor and len(recent) >= 20 else math.inf
        try:
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16(cfg) and not sharded):
                losses, tokens = train_step(magnet, opt, corpus, pairs, cfg, step, rank, world, max_total)
        except TrainingError as e:
            hint = (f"The checkpoint of step {saved} is intact: --resume=true continues from it" if saved else
                    "No checkpoint was written yet: --resume=true starts again from step 0")
            hint += " (perhaps with a lower --lr)"
            raise TrainingError(f"{e}. {hint}") from None
        recent = (recent + [losses["total"]])[-50:]
        if rank == 0:
            record = dict(step=step, lr=lr_at(step, cfg), tokens_per_s=tokens / (time.perf_counter() - t0), **losses)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("mntp", "msg", "sscl")},
                            tok_s=f"{record['tokens_per_s']:.0f}")
        if (step + 1) % cfg.ckpt_interval == 0 or step + 1 in (cfg.max_iters, cfg.stop_at):
            save_state(out, model, opt, step + 1, rank)
            saved = step + 1
        if step + 1 == cfg.stop_at < cfg.max_iters:
            stopped = True
            break
    if rank == 0:
        log.close()
    if stopped:
        if rank == 0:
            print(f"stopped after step {cfg.stop_at} (stop_at); continue with --resume=true")
        return
    export(out, model, full, tok, cfg, rank)
    if rank == 0:
        print(f"wrote {out / 'merged'} (Meta format + tokenizer, {cfg.merged_dtype})" +
              (f" and {out / 'adapter.pt'}; evaluate the exact model with --ckpt={cfg.init_from}::{out / 'adapter.pt'}"
               if cfg.lora and cfg.init_from != "scratch" else ""))  # a random scratch base is not saved
        if cfg.demo and cfg.data == "toy":
            demo(out, cfg)


def main(argv):
    try:
        cfg = parse_config(argv)
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
        # Under torchrun, leave without tearing the interpreter down: gloo's worker threads may still be releasing the
        # tensors of the last collectives, and one that needs the GIL while Python finalizes aborts the process
        # ("terminate called without an active exception") after a run that succeeded (~1 in 10 on a busy CPU).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
