"""Foreign checkpoints in: a GGUF file or a Hugging Face Llama directory -> a Meta directory that
checkpoint.load_checkpoint reads; and out again: a Meta directory (+ a trained adapter) -> Hugging Face (+ PEFT).

    python convert.py SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2    # GGUF: every tensor dequantized
    python convert.py /path/to/Llama-2-7b-hf models/llama-2-7b           # HF: its q/k rotary permutation undone
    python convert.py --to=hf out/base/merged hf/base --adapter=out/adapter.pt   # out: HF Llama + PEFT adapter

OUT_DIR gets params.json, consolidated.00.pth and the tokenizer (tokenizer.model, or tokenizer.json + its
tokenizer_config.json). Tensors are read one at a time (memory-mapped), in the target dtype: peak memory is about one
copy of the model. A failure leaves nothing half-written. The optional packages are imported only when needed.
"""
import argparse
import glob
import re
import importlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import (LLAMA3_SCALING, CheckpointError, check_params, copy_tokenizer, load_adapter, load_checkpoint,
                        merged_state_dict, read_encoder_settings, read_json_object, tokenizer_beside)
from data import Tokenizer
from model import ModelArgs, Transformer, rope_angles

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WRITTEN = {"params.json", "consolidated.00.pth", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
           "magnet.json"}
BLOCK = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
         "feed_forward.w3", "attention_norm", "ffn_norm")  # Meta's names inside layers.{i}
GGUF_BLOCK = dict(zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up", "attn_norm",
                       "ffn_norm"), BLOCK))
GGUF_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
HF_BLOCK = dict(zip(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.down_proj", "mlp.up_proj", "input_layernorm", "post_attention_layernorm"), BLOCK))
HF_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def need(module):
    """Import an optional package, or a one-line error naming what to pip install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"convert.py needs the '{module}' package for this input: pip install {module}") from None


def meta_name(name, top, block, prefix):
    """'blk.3.attn_q.weight' -> 'layers.3.attention.wq.weight' (prefix 'blk'; HF: 'model.layers'), else None."""
    stem, i, rest = name.removesuffix(".weight"), None, None
    if stem.startswith(prefix + "."):
        i, _, rest = stem[len(prefix) + 1:].partition(".")
    if rest in block and i.isdigit():
        return f"layers.{i}.{block[rest]}.weight"
    return f"{top[stem]}.weight" if stem in top and name.endswith(".weight") else None


def ffn_params(dim, hidden, source):
    """multiple_of (and ffn_dim_multiplier if needed) for which ModelArgs.hidden_dim is the file's FFN width. SmolLM2:
    1536 = int(8 * 576 / 3), any multiple_of; otherwise multiple_of=1 and the multiplier is hidden / int(8 dim / 3),
    nudged up until int() lands on `hidden` (floating point may leave it one short)."""
    ffn = next((dict(multiple_of=m) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1)
                if ModelArgs(dim=dim, multiple_of=m).hidden_dim == hidden), None)
    mult = hidden / int(8 * dim / 3)
    while ffn is None and int(mult * int(8 * dim / 3)) < hidden:
        mult = math.nextafter(mult, math.inf)
    ffn = ffn or dict(multiple_of=1, ffn_dim_multiplier=mult)
    if ModelArgs(dim=dim, **ffn).hidden_dim != hidden:
        raise CheckpointError(f"{source}: FFN width {hidden} is not reachable with Meta's params for dim={dim}")
    return ffn


# ----------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp). Shapes are stored reversed (ne order: innermost dimension first). wq/wk are already in Meta's
# interleaved RoPE layout: llama.cpp's converter permutes HF weights back to it (checked against llama.cpp's logits).


def read_gguf(path: Path, dtype, own_tokenizer):
    gguf = need("gguf")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)  # memory-mapped: tensor data is read when used
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as GGUF, truncated or damaged ({type(e).__name__}: {e})")
    meta = {k: f.contents() for k, f in reader.fields.items() if k.split(".")[-1] not in ("tokens", "merges", "scores")}
    if meta.get("general.architecture") != "llama":
        raise CheckpointError(f"{path}: general.architecture is {meta.get('general.architecture')!r}; expected 'llama'")
    dim, heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    plain = {"llama.expert_count": not meta.get("llama.expert_count"),
             "llama.rope.scaling.type": meta.get("llama.rope.scaling.type", "none") == "none",
             "llama.rope.dimension_count": meta.get("llama.rope.dimension_count", dim // heads) == dim // heads}
    bad = [key for key, ok in plain.items() if not ok]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} is {meta[bad[0]]!r}: experts, scaled or partial RoPE are not the "
                              "plain Llama this project runs")
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if own_tokenizer and (model != "gpt2" or pre not in ("smollm", "starcoder", "gpt-2")):
        raise CheckpointError(f"{path}: cannot rebuild tokenizer {model!r} (pre-tokenizer {pre!r}); only 'gpt2' with "
                              "'smollm', 'starcoder' or 'gpt-2'; pass --tokenizer=FILE with the model's own")
    state, rope_factors = {}, None
    for t in reader.tensors:
        name = meta_name(t.name, GGUF_TOP, GGUF_BLOCK, "blk")
        if t.name == "rope_freqs.weight":  # Llama-3.1's scaled RoPE, as llama.cpp stores it: a divisor per frequency
            rope_factors = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).copy())
            continue
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (not one of a plain Llama's)")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)  # float32 numpy, (rows, row length)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name} has quantization type {t.tensor_type.name}, which the "
                                  "gguf package cannot dequantize") from None
        state[name] = torch.tensor(w.reshape(tuple(reversed(t.shape.tolist()))), dtype=dtype)
    params = dict(dim=dim, n_layers=meta["llama.block_count"], n_heads=heads,
                  n_kv_heads=meta.get("llama.attention.head_count_kv", heads),
                  vocab_size=state["tok_embeddings.weight"].shape[0],
                  **ffn_params(dim, meta["llama.feed_forward_length"], path),
                  norm_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),  # float32 in the file
                  rope_theta=float(f"{meta.get('llama.rope.freq_base', 10000.0):.7g}"))
    if meta.get("llama.context_length"):  # the context it was made for: kept beside, in magnet.json
        params["max_seq_len"] = int(meta["llama.context_length"])
    if rope_factors is not None:
        params["rope_scaling"] = llama3_scaling(rope_factors, dim // heads, params["rope_theta"],
                                                meta.get("llama.rope.scaling.original_context_length", 8192), path)
    return params, state, lambda out: gguf_tokenizer(reader, meta, out)


def llama3_scaling(factors, head_dim, theta, original_context, source):
    """Llama-3's RoPE scaling from llama.cpp's per-frequency divisors: the factor is the largest of them, the other
    settings Llama-3.1's published ones; refused unless they give back every divisor."""
    scaling = {**LLAMA3_SCALING, "factor": float(factors.max()), "original_max_position_embeddings": original_context}
    one = torch.ones(1, 1)  # position 1: the angles are the frequencies themselves
    plain, scaled = (rope_angles(one, head_dim, theta, s)[0, 0, 0].angle() for s in (None, scaling))
    if factors.shape != plain.shape or not torch.allclose(plain / scaled, factors, rtol=1e-4):
        raise CheckpointError(f"{source}: rope_freqs.weight is not Llama-3's RoPE scaling (factor "
                              f"{scaling['factor']:g}, original context {original_context})")
    return scaling


def gguf_tokenizer(reader, meta, out: Path):
    """tokenizer.json + tokenizer_config.json rebuilt from a byte-level BPE GGUF: tokens (id = position), merges,
    control tokens (type 3) as special tokens, BOS added only if add_bos_token. The pre-tokenizer "smollm" (like
    "starcoder") is llama.cpp's split at every digit, then GPT-2's regex: SmolLM2's own Digits + ByteLevel."""
    tk, pre = need("tokenizers"), meta.get("tokenizer.ggml.pre", "gpt-2")
    tokens, types = reader.fields["tokenizer.ggml.tokens"].contents(), meta["tokenizer.ggml.token_type"]
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    tok = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]))
    digits = [tk.pre_tokenizers.Digits(individual_digits=True)] if pre != "gpt-2" else []
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(digits + [tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = tk.decoders.ByteLevel()
    ids = {f"{r}_token": meta.get(f"tokenizer.ggml.{k}_token_id") for r, k in
           (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    role = {r: tokens[i] for r, i in ids.items() if i is not None}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        bos = role.get("bos_token")
        tok.post_processor = tk.processors.TemplateProcessing(single=f"{bos} $A",
                                                              special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(role, add_bos_token=add_bos), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face: config.json + *.safetensors or pytorch_model*.bin, sharded (with an index) or not. HF permutes wq/wk
# so that RoPE rotates the two halves of a head; Meta rotates interleaved pairs. Undone here, head by head.


def unpermute(w, n_heads):
    """Inverse of HF's permute: rows (head, 2, hd/2) -> (head, hd/2, 2). w: (n_heads * hd, dim)."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_tensors(directory: Path):
    """(file, name, tensor), one tensor at a time, from every weight file (all shards present)."""
    for index, pattern in (("model.safetensors.index.json", "*.safetensors"),
                           ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        files = sorted(directory.glob(pattern))
        if (directory / index).is_file():
            files = sorted({directory / f for f in json.loads((directory / index).read_text())["weight_map"].values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{directory}: shard {missing[0]} named in {index} is missing")
        for f in files:
            try:
                if f.suffix == ".safetensors":
                    with need("safetensors").safe_open(str(f), framework="pt") as st:
                        yield from ((f, k, st.get_tensor(k)) for k in st.keys())
                else:
                    yield from ((f, k, v) for k, v in torch.load(f, "cpu", mmap=True, weights_only=True).items())
            except (CheckpointError, GeneratorExit):
                raise
            except Exception as e:
                raise CheckpointError(f"{f}: cannot be read ({type(e).__name__}: {e})") from None
        if files:
            return
    raise CheckpointError(f"{directory}: no weights (expected *.safetensors or pytorch_model*.bin)")


def read_hf(directory: Path, dtype, own_tokenizer):
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a Hugging Face model directory holds config.json and its weights")
    found = tokenizer_beside(directory)
    if own_tokenizer and not found:
        raise CheckpointError(f"{directory}: no tokenizer.model or tokenizer.json; pass --tokenizer=FILE")
    c = read_json_object(path, "model settings")
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    bad = [k for k in sizes if type(c.get(k)) is not int or c[k] <= 0]
    if bad:
        raise CheckpointError(f"{path}: {bad[0]} is {c.get(bad[0])!r}; expected a positive integer")
    rope = {**(c.get("rope_parameters") or {}), **(c.get("rope_scaling") or {})}  # transformers >= 5: the former
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    plain = dict(model_type=c.get("model_type") == "llama", rope_scaling=rope_type in ("default", "llama3"),
                 attention_bias=not c.get("attention_bias"), mlp_bias=not c.get("mlp_bias"),
                 hidden_act=c.get("hidden_act", "silu") == "silu",
                 head_dim=c.get("head_dim") in (None, c["hidden_size"] // c["num_attention_heads"]))
    bad = [key for key, ok in plain.items() if not ok]
    if bad:
        value = rope_type if bad[0] == "rope_scaling" else c.get(bad[0])
        raise CheckpointError(f"{path}: {bad[0]} is {value!r}; expected a plain Llama (model_type 'llama', RoPE "
                              "unscaled or scaled as Llama-3's, no biases, silu, head_dim = hidden_size / heads)")
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    state = {}
    for f, key, w in hf_tensors(directory):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a cached RoPE table in old checkpoints
        name = meta_name(key, HF_TOP, HF_BLOCK, "model.layers")
        if name is None:
            raise CheckpointError(f"{f}: unexpected tensor {key!r} (not one of a plain Llama's)")
        if name.endswith(("wq.weight", "wk.weight")):
            w = unpermute(w, heads if name.endswith("wq.weight") else kv_heads)
        state[name] = w.to(dtype or w.dtype)  # auto: as stored
    if c.get("tie_word_embeddings"):
        state.pop("output.weight", None)  # some tied checkpoints also store the embedding as lm_head
    params = dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=kv_heads,
                  vocab_size=c["vocab_size"], **ffn_params(c["hidden_size"], c["intermediate_size"], path),
                  norm_eps=c.get("rms_norm_eps", 1e-6),
                  rope_theta=c.get("rope_theta") or rope.get("rope_theta", 10000.0))
    if rope_type == "llama3":
        params["rope_scaling"] = {k: rope[k] for k in LLAMA3_SCALING}
    if c.get("max_position_embeddings"):  # the context it was made for: kept beside, in magnet.json
        params["max_seq_len"] = c["max_position_embeddings"]
    return params, state, lambda out: copy_tokenizer(found, out)


# ----------------------------------------------------------------------------------------------------------------
# The Meta directory


def convert(src, out, overwrite=False, dtype="auto", tokenizer=None):
    """Convert SRC (a .gguf file or an HF directory) into the Meta directory OUT (new, empty, or with --overwrite an
    earlier conversion). dtype "auto": as stored (HF), float32 (GGUF: dequantized values are exact in fp32 only)."""
    src, out = Path(src), Path(out)
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if out.exists() and not out.is_dir() or present - WRITTEN:
        raise CheckpointError(f"{out}: exists and is not empty nor an earlier conversion; choose a new directory")
    if present and not overwrite:
        raise CheckpointError(f"{out}: already holds a checkpoint; pass --overwrite to replace it")
    if not src.exists():
        raise CheckpointError(f"{src}: not found (expected a .gguf file or a Hugging Face model directory)")
    try:
        params, state, write_tokenizer = read_hf(src, DTYPES.get(dtype), tokenizer is None) if src.is_dir() else \
            read_gguf(src, DTYPES.get(dtype, torch.float32), tokenizer is None)
    except KeyError as e:
        raise CheckpointError(f"{src}: its config lacks {e}") from None
    context = params.pop("max_seq_len", None)  # not a params.json field: magnet.json beside it
    check_params(params, src)
    if tokenizer:
        try:
            n = Tokenizer(tokenizer).vocab_size
        except ValueError as e:  # not a tokenizer file at all
            raise CheckpointError(str(e)) from None
        if n != params["vocab_size"]:
            raise CheckpointError(f"--tokenizer={tokenizer}: {n} tokens, but {src} has {params['vocab_size']}; it "
                                  "must be the model's own")
    if "output.weight" not in state:  # tied: the output layer is the embedding, one tensor saved once
        params["tie_embeddings"], state["output.weight"] = True, state.get("tok_embeddings.weight")
    with torch.device("meta"):  # the shapes params.json implies, checked before anything is written
        expected = {k: tuple(v.shape) for k, v in Transformer(ModelArgs(**params)).state_dict().items()}
    for key in sorted(set(expected) | set(state)):
        got = tuple(state[key].shape) if state.get(key) is not None else "missing"
        if got != expected.get(key):
            raise CheckpointError(f"{src}: {key} is {got} but its config implies {expected.get(key, 'no such tensor')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(out)
    try:
        tmp.chmod(0o755)
        torch.save(state, tmp / "consolidated.00.pth")
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        if context:
            (tmp / "magnet.json").write_text(json.dumps({"max_seq_len": context}) + "\n")
        copy_tokenizer(Path(tokenizer), tmp) if tokenizer else write_tokenizer(tmp)
        if out.exists():  # empty, or the earlier conversion: moved into tmp, removed with it
            out.rename(tmp / "replaced")
        tmp.rename(out)
        shutil.rmtree(out / "replaced", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return params


# ----------------------------------------------------------------------------------------------------------------
# Out to Hugging Face (+ PEFT): the reverse of read_hf

SHARD_BYTES = 5 * 10 ** 9  # transformers 4's default max_shard_size ("5GB"): a larger model is split, with an index
HF_NAMES = {**{v: k for k, v in HF_BLOCK.items()}, **{v: k for k, v in HF_TOP.items()}}  # Meta's names -> HF's


def permute(w, n_heads):
    """HF's rotate-half layout from Meta's interleaved one (inverse of unpermute): rows (head, hd/2, 2) -> (head, 2,
    hd/2). w: (n_heads * hd, in)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_name(meta_key):
    """Meta's name of a weight as HF's: 'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem = meta_key.removesuffix(".weight")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}.weight"
    return f"{HF_NAMES[stem]}.weight"


def to_hf_state(model, state):
    """A Meta state dict (no LoRA keys) as HF's: names mapped, wq / wk permuted, a tied output left out."""
    args, out = model.args, {}
    for key, w in state.items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        if key.endswith(("wq.weight", "wk.weight")):
            w = permute(w, args.n_heads if key.endswith("wq.weight") else args.kv_heads)
        out[hf_name(key)] = w.contiguous()
    return out


def hf_config(model, tok, dtype):
    a = model.args
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=a.dim,
                intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                num_key_value_heads=a.kv_heads, head_dim=a.head_dim, vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps,
                rope_theta=a.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
                rope_scaling={**a.rope_scaling, "rope_type": "llama3"} if a.rope_scaling else None,
                tie_word_embeddings=a.tie_embeddings, max_position_embeddings=a.max_seq_len, bos_token_id=tok.bos_id,
                eos_token_id=tok.eos_id, torch_dtype=str(dtype).removeprefix("torch."))


def save_safetensors(state, directory, prefix="model"):
    """`prefix`.safetensors, or shards of at most SHARD_BYTES with `prefix`.safetensors.index.json, as transformers."""
    st = need("safetensors.torch")
    shards, size = [{}], 0
    for key, w in state.items():
        if size and size + w.nbytes > SHARD_BYTES:
            shards, size = shards + [{}], 0
        shards[-1][key], size = w, size + w.nbytes
    if len(shards) == 1:
        return st.save_file(shards[0], directory / f"{prefix}.safetensors", metadata={"format": "pt"})
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"{prefix}-{n:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(w.nbytes for w in state.values())
    (directory / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def save_hf_tokenizer(tok, directory):
    """The tokenizer as transformers loads it: the file itself and a tokenizer_config.json naming its special tokens."""
    copy_tokenizer(tok.path, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if tok.sp is not None:  # SentencePiece: Llama's tokenizer class, Llama's BOS convention
        config.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                      legacy=True, unk_token=tok.id_to_piece(tok.unk_id))
    config.update(bos_token=tok.id_to_piece(tok.bos_id), eos_token=tok.id_to_piece(tok.eos_id))
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def peft_adapter(model, lora_config, directory, base_path):
    """The LoRA matrices of `model` as a PEFT adapter: PEFT's key names, B's rows permuted for q / k (the update
    B A is then permuted as the weight is), alpha / r as PEFT's scaling."""
    args, state = model.args, {}
    for key, w in model.state_dict().items():
        if "lora_" not in key:
            continue
        stem, _, which = key.removesuffix(".weight").rpartition(".lora_")  # ('layers.0.attention.wq', 'A')
        if which == "B" and stem.endswith(("wq", "wk")):
            w = permute(w, args.n_heads if stem.endswith("wq") else args.kv_heads)
        state[f"base_model.model.{hf_name(stem + '.weight').removesuffix('.weight')}.lora_{which}.weight"] = \
            w.detach().float().contiguous()
    targets = sorted({HF_NAMES[f"{part}.{t}"].split(".")[-1] for t in lora_config["targets"]
                      for part in ("attention", "feed_forward") if f"{part}.{t}" in HF_NAMES})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_path),
                  r=lora_config["rank"], lora_alpha=lora_config["alpha"], lora_dropout=lora_config["dropout"],
                  target_modules=targets, bias="none", fan_in_fan_out=False, inference_mode=True,
                  init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None)
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    need("safetensors.torch").save_file(state, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def export_hf(src, out, tokenizer=None, adapter=None, merge=False, overwrite=False, dtype="float32"):
    """SRC (what Magnet.load reads: a Meta directory, a llama2.c .bin) as the Hugging Face Llama directory OUT, with
    ADAPTER as a PEFT adapter in OUT/adapter, or, with merge, folded into OUT's weights (in fp32, then cast)."""
    src, out = Path(src), Path(out)
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if out.exists() and not out.is_dir() or any(not HF_WRITTEN.fullmatch(name) for name in present):
        raise CheckpointError(f"{out}: exists and is not an earlier export (it holds {sorted(present)[:4]}); choose "
                              "a new directory")
    if present and not overwrite:
        raise CheckpointError(f"{out}: already holds an export; pass --overwrite to replace it")
    tok_path = Path(tokenizer) if tokenizer else tokenizer_beside(src if src.is_dir() else src.parent)
    if tok_path is None or not tok_path.is_file():
        raise CheckpointError(f"{src}: no tokenizer beside it; pass --tokenizer=FILE")
    tok = Tokenizer(tok_path)
    model = load_checkpoint(src, vocab_size=tok.vocab_size)
    if adapter:
        load_adapter(model, adapter)
    encoder = read_encoder_settings(src, adapter) if src.is_dir() or adapter else {}  # how it was trained to encode
    encoder = {"instruction": "", "pooling": "last", **encoder, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if adapter and not merge:
        state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    else:
        state = merged_state_dict(model, torch.float32)
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(out)
    try:
        save_safetensors(to_hf_state(model, state), tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config(model, tok, DTYPES[dtype]), indent=2) + "\n")
        save_hf_tokenizer(tok, tmp)
        (tmp / "magnet.json").write_text(json.dumps(encoder, indent=2) + "\n")  # for an encoder read elsewhere
        if adapter and not merge:
            peft_adapter(model, model.lora_config, tmp / "adapter", out.resolve())
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)  # safetensors writes 0600: an export is for others to read
        if out.exists():
            out.rename(tmp / "replaced")
        tmp.rename(out)
        shutil.rmtree(out / "replaced", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf_config(model, tok, DTYPES[dtype])


HF_WRITTEN = re.compile(r"config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                        r"tokenizer\.model|tokenizer\.json|tokenizer_config\.json|magnet\.json|adapter$")


def temporary_dir(out):
    """A new hidden directory beside OUT (the same file system: renamed into place at the end), after removing what
    a killed conversion into OUT left there (as large as the model)."""
    here = f"{socket.gethostname()}-"  # a conversion on another machine sharing the disk is never taken for dead
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.converting.{glob.escape(here)}*"):
        pid = leftover.name[len(f".{out.name}.converting.{here}"):].split(".")[0]
        if not pid.isdigit() or not process_alive(int(pid)):
            print(f"convert.py: removing {leftover}, left by an interrupted conversion", file=sys.stderr)
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting.{here}{os.getpid()}.", dir=out.parent))
    tmp.chmod(0o755)
    return tmp


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="in: a llama .gguf file or a Hugging Face Llama directory; --to=hf: a Meta directory "
                               "or a llama2.c .bin")
    p.add_argument("out_dir", help="the directory to write (new, or with --overwrite an earlier conversion)")
    p.add_argument("--to", default="meta", choices=["meta", "hf"], help="meta: into this project (default); hf: out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: as stored (HF), float32 (GGUF; and --to=hf)")
    p.add_argument("--tokenizer", help="use this tokenizer.model / tokenizer.json instead of SRC's")
    p.add_argument("--adapter", help="--to=hf: a train.py adapter.pt, written as a PEFT adapter in OUT_DIR/adapter")
    p.add_argument("--merge", action="store_true", help="--to=hf: fold --adapter into the weights instead")
    a = p.parse_args(argv)
    try:
        if a.to == "hf":
            params = export_hf(a.src, a.out_dir, a.tokenizer, a.adapter, a.merge, a.overwrite,
                               "float32" if a.dtype == "auto" else a.dtype)
        elif a.adapter or a.merge:
            raise CheckpointError("--adapter and --merge go with --to=hf")
        else:
            params = convert(a.src, a.out_dir, a.overwrite, a.dtype, a.tokenizer)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"convert.py: {e}")
    print(f"wrote {a.out_dir}: {json.dumps(params)}")


if __name__ == "__main__":
    main()
