"""Checkpoint files: Meta's directory format (params.json + consolidated.NN.pth, model-parallel shards merged),
llama2.c's .bin, LoRA adapter files, and the tokenizer files a checkpoint directory carries.

Kept apart from model.py (as llama2.c keeps its formats in export.py): the model is the lesson, the formats are not.
Every failure is a CheckpointError that names the file and what was expected.
"""
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from model import LoRALinear, ModelArgs, Transformer, apply_lora, lora_layers


class CheckpointError(ValueError):
    """A checkpoint, adapter or params.json that cannot be used; the message names the file and the problem."""


PARAMS_JSON_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                      "ffn_dim_multiplier", "norm_eps", "rope_theta", "rope_scaling", "tie_embeddings")
# Meta's Llama-3.1 params.json says "use_scaled_rope": true, which means this (another factor is written as
# "rope_scaling_factor", which only Meta's newer code reads):
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
INT_PARAMS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # SentencePiece, or Hugging Face's (+ tokenizer_config.json)


def tokenizer_beside(directory):
    """The tokenizer file a checkpoint directory holds (the first of TOKENIZER_FILES present), else None."""
    return next((Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()), None)


def copy_tokenizer(path, directory):
    """Copy a tokenizer into a checkpoint directory under its usual name; a tokenizer.json brings the
    tokenizer_config.json beside it (its special tokens and BOS convention)."""
    path, directory = Path(path), Path(directory)
    copies = {path: directory / TOKENIZER_FILES[path.suffix == ".json"]}
    if path.suffix == ".json" and (path.parent / "tokenizer_config.json").is_file():
        copies[path.parent / "tokenizer_config.json"] = directory / "tokenizer_config.json"
    for src, dst in copies.items():  # under a temporary name, then renamed: never half a tokenizer
        shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
        dst.with_name(dst.name + ".tmp").replace(dst)



# --------------------------------------------------------------------------------------------------------------
# LoRA adapter files

def save_adapter(model, path, overwrite=False, magnet=None):
    """Save only the LoRA matrices and their config (plus `magnet`, a dict of the settings the adapter was trained
    with): megabytes instead of the base model's gigabytes."""
    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapter to save (call apply_lora first)")
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}
    _atomic_save({"lora_config": model.lora_config, "state_dict": state, "magnet": magnet or {}}, Path(path))


def load_adapter(model, path):
    """Apply LoRA with the saved config and load the saved matrices into it (strictly)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        config, state = saved["lora_config"], saved["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        why = "not a PyTorch file" if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: not a LoRA adapter file written by save_adapter ({why})") from None
    apply_lora(model, **config)
    expected = {k: v.shape for k, v in model.state_dict().items() if "lora_" in k}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        bad = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise CheckpointError(f"{path}: adapter does not fit this model; first mismatches (key, shape): {bad}")
    model.load_state_dict(state, strict=False)
    return model



# ----------------------------------------------------------------------------------------------------------------
# Checkpoint I/O

# Meta's model-parallel layout: which dimension each weight is split along (norms are replicated).
SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def read_json_object(path, what):
    """A JSON file that holds one object (params.json, a run's config.json, ...); a CheckpointError otherwise."""
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object of {what}")
    return value


def merge_shards(shards, names):
    """Merge Meta model-parallel shards (state dicts) into one state dict by the SHARD_DIM rules."""
    merged = {}
    for key in (k for k in shards[0] if k != "rope.freqs"):  # rope.freqs: Meta's cached RoPE table, unused here
        missing = [name for shard, name in zip(shards, names) if key not in shard]
        if missing:
            raise CheckpointError(f"{missing[0]}: key {key} is missing (it is in {names[0]})")
        dim = SHARD_DIM.get(key.split(".")[-2])
        parts = [s[key] for s in shards]
        merged[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    return merged


def _read_meta_dir(directory: Path):
    params_path = directory / "params.json"
    if not params_path.is_file():
        raise CheckpointError(f"{params_path}: not found; a Meta checkpoint directory holds params.json and "
                              "consolidated.00.pth ... consolidated.NN.pth")
    params = read_json_object(params_path, "model settings (dim, n_layers, ...)")
    paths = sorted(directory.glob("consolidated.*.pth"))
    expected = [directory / f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if not paths or paths != expected:
        missing = [p.name for p in expected if p not in paths] or ["consolidated.00.pth"]
        raise CheckpointError(f"{directory}: model-parallel shard {missing[0]} is missing "
                              f"(found {[p.name for p in paths]})")
    shards = []
    for p in paths:
        try:  # mmap: the weights stay on disk until they are used, so peak memory is about one copy
            shards.append(torch.load(p, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises many types for a damaged file
            raise CheckpointError(f"{p}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from None
        if not (isinstance(shards[-1], dict) and shards[-1]
                and all(isinstance(k, str) and torch.is_tensor(v) for k, v in shards[-1].items())):
            raise CheckpointError(f"{p}: expected a state dict (weight names -> tensors)")
    state = merge_shards(shards, [p.name for p in paths])
    if params.get("vocab_size", -1) <= 0 and "tok_embeddings.weight" in state:
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    return params, state, str(params_path)


def _read_llama2c(path: Path):
    """Read Karpathy's llama2.c 'legacy v0' .bin: a header of 7 int32, then fp32 weights grouped by kind."""
    size = path.stat().st_size
    if size < 28:
        raise CheckpointError(f"{path}: {size} bytes is too short for a llama2.c header (28 bytes)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(x) for x in np.fromfile(path, "<i4", 7))
    tied, vocab = vocab > 0, abs(vocab)  # a negative vocab_size means a separate output matrix follows
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{path}: header {dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len} "
                              "is not a llama2.c model header")
    hd, L = dim // n_heads, n_layers
    blocks = [("tok_embeddings", (vocab, dim)), ("attention_norm", (L, dim)), ("attention.wq", (L, dim, dim)),
              ("attention.wk", (L, n_kv_heads * hd, dim)), ("attention.wv", (L, n_kv_heads * hd, dim)),
              ("attention.wo", (L, dim, dim)), ("ffn_norm", (L, dim)), ("feed_forward.w1", (L, hidden, dim)),
              ("feed_forward.w2", (L, dim, hidden)), ("feed_forward.w3", (L, hidden, dim)), ("norm", (dim,)),
              ("rope_tables", (seq_len * hd,))] + ([] if tied else [("output", (vocab, dim))])
    n_floats = sum(math.prod(shape) for _, shape in blocks)
    if size != 28 + 4 * n_floats:
        raise CheckpointError(f"{path}: {size} bytes, but its header (dim={dim}, n_layers={n_layers}, vocab={vocab}) "
                              f"implies {28 + 4 * n_floats}: the file is truncated or not a llama2.c v0 model")
    data, offset, state = np.memmap(path, dtype="<f4", mode="r", offset=28), 0, {}
    for name, shape in blocks:
        block = torch.from_numpy(np.array(data[offset:offset + math.prod(shape)]).reshape(shape))
        offset += math.prod(shape)
        if name in ("tok_embeddings", "norm", "output"):
            state[f"{name}.weight"] = block
        elif name != "rope_tables":  # the legacy RoPE tables are recomputed, not read
            state.update({f"layers.{i}.{name}.weight": block[i] for i in range(L)})
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    # llama2.c stores the FFN width itself; find Meta's multiple_of that reproduces it
    multiple_of = next((m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)
                        if ModelArgs(dim=dim, multiple_of=m).hidden_dim == hidden), None)
    if multiple_of is None:
        raise CheckpointError(f"{path}: hidden_dim={hidden} is not Llama's FFN width for dim={dim}")
    params = dict(dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                  multiple_of=multiple_of, norm_eps=1e-5, tie_embeddings=tied)
    return params, state, str(path), seq_len


def check_params(params, source):
    """params.json values of the right type: positive int sizes (vocab_size -1 = from the weights), positive floats,
    a bool tie_embeddings; n_kv_heads and ffn_dim_multiplier may be null."""
    def valid(key, value):
        if key == "tie_embeddings":
            return isinstance(value, bool)
        if key == "rope_scaling":
            return value is None or isinstance(value, dict) and set(value) == set(LLAMA3_SCALING) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values())
        if value is None:
            return key in ("n_kv_heads", "ffn_dim_multiplier")
        if isinstance(value, bool) or not isinstance(value, int if key in INT_PARAMS else (int, float)):
            return False
        return value > 0 or (key == "vocab_size" and value == -1)
    bad = [f"{k}={v!r}" for k, v in params.items() if not valid(k, v)]
    if bad:
        raise CheckpointError(f"{source}: bad value(s) {', '.join(bad)}; expected positive numbers (integers for "
                              "sizes; vocab_size -1 = from the weights; n_kv_heads, ffn_dim_multiplier may be null)")


def load_checkpoint(path, device="cpu", dtype=None, vocab_size=None, **overrides) -> Transformer:
    """Load a Meta checkpoint directory (params.json + consolidated.NN.pth, shards merged) or a llama2.c .bin.

    The model is built on the meta device and the (memory-mapped) tensors are assigned into it, so peak memory is
    about one copy of the weights. dtype: default fp32 on CPU (bf16 matmul is slow there), the file's dtype elsewhere.
    vocab_size: the tokenizer's, checked against the checkpoint's. overrides: runtime ModelArgs (max_seq_len, ...).
    """
    path = Path(path)
    if path.is_dir():
        params, state, source = _read_meta_dir(path)
        if "max_seq_len" in read_export_settings(path):  # a merged export of a model made for shorter rows
            overrides.setdefault("max_seq_len", read_export_settings(path)["max_seq_len"])
    elif path.is_file():
        params, state, source, seq_len = _read_llama2c(path)
        overrides.setdefault("max_seq_len", seq_len)
    else:
        raise CheckpointError(f"{path}: no such checkpoint (expected a Meta directory or a llama2.c .bin file)")
    if params.pop("use_scaled_rope", False):  # Meta's Llama-3.1 / 3.2
        params["rope_scaling"] = {**LLAMA3_SCALING, "factor": params.pop("rope_scaling_factor", 8.0)}
    if isinstance(params.get("rope_scaling"), dict) and "max_seq_len" not in overrides:  # the context it stretches to
        scaling = params["rope_scaling"]
        overrides["max_seq_len"] = int(scaling.get("original_max_position_embeddings", 0) * scaling.get("factor", 0)) \
            or ModelArgs.max_seq_len
    unknown = set(params) - set(PARAMS_JSON_FIELDS)  # a setting not written here would change the numerics
    if unknown:
        raise CheckpointError(f"{source}: unsupported key(s) {sorted(unknown)}; known: {list(PARAMS_JSON_FIELDS)}")
    check_params(params, source)
    args = ModelArgs(**{**params, **overrides})
    if vocab_size is not None and vocab_size != args.vocab_size:
        raise CheckpointError(f"{path}: the checkpoint's vocabulary has {args.vocab_size} tokens but the tokenizer's "
                              f"has {vocab_size}; they must come from the same model")
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise CheckpointError(f"{path}: {key} has shape {got.get(key, 'missing')} but params.json implies "
                                  f"{expected.get(key, 'no such key')}")
    model.load_state_dict(state, strict=True, assign=True)
    if args.tie_embeddings:  # assign=True gave output its own tensor; share it again
        model.output.weight = model.tok_embeddings.weight
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else state["tok_embeddings.weight"].dtype
    del state  # merged shards live in RAM: drop them so each is freed as soon as the model has converted it
    return model.to(device=device, dtype=dtype)


def _atomic_save(obj, path: Path):
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_atomic(path, text):
    """Write a text file under a temporary name, flush it to disk, then rename: `path` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def merged_state_dict(model: Transformer, dtype=None):
    """The base state dict with every LoRA update folded into its weight (adapter keys dropped), on the CPU, in
    `dtype` (default: the model's). The sum is formed in fp32; casting it to bf16 loses most of a small update
    (bf16 keeps 8 bits of mantissa: an update of ~0.2% of a weight is mostly rounded away)."""
    dtype = dtype or model.tok_embeddings.weight.dtype
    state = {k: v.detach().cpu().to(dtype) for k, v in model.state_dict().items() if "lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged:  # cast each sum at once: one fp32 matrix alive at a time
            state[f"{name}.weight"] = (m.weight.float() + m.delta()).detach().cpu().to(dtype)
    return state


def save_checkpoint(model: Transformer, directory, overwrite=False, dtype=None):
    """Write a Meta-format checkpoint (params.json + consolidated.00.pth) that load_checkpoint reads back.
    LoRA updates are folded in, so the file is the adapted model in the base model's format; dtype: see
    merged_state_dict."""
    directory = Path(directory)
    if not overwrite and ((directory / "params.json").exists() or any(directory.glob("consolidated.*.pth"))):
        raise FileExistsError(f"{directory} already holds a checkpoint; pass overwrite=True to replace it")
    for stale in directory.glob("consolidated.*.pth"):  # overwriting: old model-parallel shards must not linger
        stale.unlink()
    params = {k: getattr(model.args, k) for k in PARAMS_JSON_FIELDS}
    # keep params.json readable by Meta's own Llama-2 code: write our extra keys only when they are not the default
    params = {k: v for k, v in params.items()
              if v is not None and not (k in ("rope_theta", "tie_embeddings") and v == getattr(ModelArgs, k))}
    if params.get("rope_scaling") and {**params["rope_scaling"], "factor": 8.0} == LLAMA3_SCALING:  # as Meta writes it
        factor = params.pop("rope_scaling")["factor"]
        params.update(use_scaled_rope=True, **({} if factor == 8.0 else {"rope_scaling_factor": factor}))
    _atomic_save(merged_state_dict(model, dtype), directory / "consolidated.00.pth")
    write_atomic(directory / "params.json", json.dumps(params, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# What an adapted model was trained with, stored beside it

ENCODER_SETTINGS = ("instruction", "pooling")  # how a model was trained to encode: inference must do the same
EXPORT_SETTINGS = ENCODER_SETTINGS + ("max_seq_len",)  # magnet.json: also the longest row the model was made for


def read_export_settings(directory):
    """magnet.json beside a merged export (train.py writes the EXPORT_SETTINGS there); {} for a plain base model."""
    path = Path(directory) / "magnet.json"
    settings = read_json_object(path, f"the settings {EXPORT_SETTINGS}") if path.is_file() else {}
    if set(settings) - set(EXPORT_SETTINGS) or not (type(settings.get("max_seq_len", 1)) is int
                                                    and settings.get("max_seq_len", 1) > 0):
        raise CheckpointError(f"{path}: expected the settings {EXPORT_SETTINGS} a model was trained with, got "
                              f"{settings!r}")
    return settings


def read_encoder_settings(checkpoint, adapter=None):
    """The ENCODER_SETTINGS a model was trained with: from the adapter file (train.py stores them under "magnet"),
    else from magnet.json beside a merged export; {} for a plain base model."""
    if adapter is None:
        return {k: v for k, v in read_export_settings(checkpoint).items() if k in ENCODER_SETTINGS}
    settings = torch.load(adapter, map_location="cpu", weights_only=True).get("magnet", {})
    if not isinstance(settings, dict) or set(settings) - set(ENCODER_SETTINGS):
        raise CheckpointError(f"{adapter}: expected the settings {ENCODER_SETTINGS} a model was trained with, "
                              f"got {settings!r}")
    return settings
