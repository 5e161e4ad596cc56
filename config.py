"""One command line for train.py, eval.py and bench.py, in the manner of nanoGPT's configurator: a dataclass holds
the defaults, config files (plain `key = literal` lines: parsed, never executed) override them, and --key=value
overrides both. `--help` prints what the script does and every key with its default and the comment beside it.
Range checks live here too, so a bad value is refused, in one line, before anything is trained or overwritten.
"""
import ast
import inspect
import math
import os
import re
import sys
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import torch

from attention import BACKENDS
from data import read_text


class ConfigError(ValueError):
    """A bad command line, config file or value; the message names the argument, or the file and line."""


def parse(argv, cfg, doc="", repeated=()):
    """Fill the dataclass `cfg` from argv: config files, then --key=value. Keys in `repeated` (eval's --ckpt) may be
    given many times and are not fields: returns (cfg, {key: [values]}). --help prints usage and exits."""
    if "--help" in argv or "-h" in argv:
        print(usage(type(cfg), doc, repeated))
        sys.exit(0)
    types, extra = {f.name: type(f.default) for f in fields(cfg)}, {k: [] for k in repeated}

    def set_key(key, value, where):
        if key in extra:
            extra[key].append(value)
            return
        if key not in types:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join([*extra, *types])}")
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
                raise ConfigError(f"{arg}: expected --key=value (--help lists the keys and their defaults)")
            set_key(key, value, arg)
        else:
            for key, value, where in read_config_file(arg):
                set_key(key, value, where)
    return cfg, extra


def read_config_file(arg):
    """(key, value, "file, line N") for each `key = literal` line of a config file."""
    path = Path(arg)
    if not path.is_file():
        raise ConfigError(f"{arg}: config file not found (expected --key=value, or a file of `key = literal` lines)")
    try:
        tree = ast.parse(read_text(path), filename=arg)
    except SyntaxError as e:
        raise ConfigError(f"{arg}, line {e.lineno}: {e.msg}") from None
    for node in tree.body:
        where = f"{arg}, line {node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{where}: expected `key = literal`")
        try:
            yield node.targets[0].id, ast.literal_eval(node.value), where
        except (ValueError, TypeError):
            raise ConfigError(f"{where}: expected `key = literal`") from None


def usage(cls, doc, repeated=()):
    """The script's docstring, then each key, its default and its meaning: the comment beside the field."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                field = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
                if field:
                    comments[field.group(1)] = field.group(2)
    rows = [f"  --{k}=...  (may be repeated)" for k in repeated]
    shown = lambda value: value if isinstance(value, str) else repr(value)  # --tokenizer= is an empty string
    rows += [f"  --{f.name}={shown(f.default)}  {comments.get(f.name, '')}".rstrip() for f in fields(cls)]
    return (doc or "").strip() + "\n\nkeys (a config file of `key = literal` lines may come first):\n" + "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Validation

MERGED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POSITIVE = ("batch_size", "grad_accum", "max_iters", "ckpt_interval", "seq_len", "sscl_len", "lr", "temperature",
            "lora_alpha", "grad_clip", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len")
NON_NEGATIVE = ("min_lr", "warmup_iters", "weight_decay", "spike_factor", "pretrain_iters", "stop_at", "max_spans",
                "n_kv_heads", "w_mntp", "w_msg", "w_sscl", "seed")


def use_bf16(cfg):
    """Mixed precision: bf16 compute (autocast in one process, FSDP2's bf16 policy under torchrun). "auto" uses it on
    a GPU only (bf16 matmuls are slow on CPUs); "bf16" on a CPU runs the GPU's numerics there (tests/test_train.py)."""
    return torch.cuda.is_available() and cfg.device != "cpu" if cfg.precision == "auto" else cfg.precision == "bf16"


def validate_train_config(cfg, world):
    """Reject a bad training configuration (train.Config) for `world` processes, naming every bad key."""
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
        ("RANK" in os.environ and cfg.lora and use_bf16(cfg) and
         tuple(map(int, torch.__version__.split(".")[:2])) < (2, 8),
         f"FSDP2 in torch {torch.__version__} needs one dtype per block, but a bf16 base under fp32 LoRA adapters has "
         "two (torch >= 2.8 allows it): upgrade torch, or train with --precision=fp32"),
        (cfg.merged_dtype not in MERGED_DTYPES, f"merged_dtype must be one of {list(MERGED_DTYPES)} "
                                                 f"(got {cfg.merged_dtype!r})"),
        (cfg.init_from != "scratch" and not Path(cfg.init_from).exists(),
         f"init_from={cfg.init_from}: no such checkpoint"),
        (cfg.data != "toy" and not all(Path(p).is_file() for p in cfg.data.split(",")),
         f"data={cfg.data}: corpus file not found"),
        (not Path(cfg.out_dir).name, f"out_dir={cfg.out_dir!r}: expected a directory name"),
    ] if bad]
    if problems:
        raise ConfigError("; ".join(problems))


def validate_eval_config(cfg, suites, ckpt_names):
    """Reject bad eval.EvalConfig values, unknown suites and missing or repeated --ckpt names."""
    unknown = set(cfg.suite.split(",")) - set(suites)
    if unknown or not ckpt_names:
        raise ConfigError(f"need --ckpt=... and suites among {suites} (unknown: {sorted(unknown)})")
    bad = [f"{k}={getattr(cfg, k)}" for k, least in dict(limit=0, probe_train=0, seed=0, max_len=2, gap=1, max_gap=1,
                                                         prefix_len=1, cont_len=1).items() if getattr(cfg, k) < least]
    bad += [f"length_score={cfg.length_score}"] if cfg.length_score not in ("sum", "mean") else []
    kind = cfg.device.partition(":")[0]
    if bad or kind not in ("cpu", "cuda") or (kind == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"out of range: {', '.join(bad) or f'device={cfg.device}'} (limit, probe_train and seed "
                          ">= 0, max_len >= 2, the other lengths >= 1; device cpu, or cuda[:N] when torch sees a GPU)")
    if len(set(ckpt_names)) < len(ckpt_names):
        raise ConfigError(f"two --ckpt have the same name ({ckpt_names}); name them: --ckpt=NAME=PATH")
