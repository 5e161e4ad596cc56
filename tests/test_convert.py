"""convert.py: GGUF and Hugging Face checkpoints in, byte-level BPE tokenizers (data.Tokenizer on tokenizer.json)."""
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, shared_file
from checkpoint import CheckpointError, load_checkpoint
from model import ModelArgs, Transformer

gguf = pytest.importorskip("gguf")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("tokenizers")
import convert  # noqa: E402  (after the optional packages, so a missing one skips instead of failing)
from data import Tokenizer  # noqa: E402
from magnet import Magnet  # noqa: E402

SMOLLM2 = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):\n    "]

# Reference values, recorded once from two independent implementations loading the same GGUF file; none of them
# comes from the code under test.
# (1) llama.cpp through llama-cpp-python 0.3.36 (built from the PyPI sdist with -DGGML_NATIVE=OFF, AMX off), fp32
#     context: Llama(model_path=GGUF, n_ctx=256, n_threads=2, logits_all=True); ids = llm.tokenize(text.encode(),
#     add_bos=False, special=False); llm.eval(ids); llm.scores[len(ids) - 1] -> top-5 ids and logits.
#     llama.cpp dequantizes with its own kernels and multiplies Q4_1 weights by Q8_1-quantized activations, so its
#     logits differ from an fp32 computation by up to ~0.2.
LLAMA_CPP_TOKENS = {  # prompt -> (ids, top-5 ids, their logits)
    PROMPTS[0]: ([504, 3575, 282, 4649, 314], [7042, 260, 4528, 1315, 5145],
                 [17.3441, 14.8042, 13.2078, 13.1494, 13.1207]),
    PROMPTS[1]: ([6403, 1980, 253, 655, 28, 665, 436, 253, 1838], [8180, 3102, 6560, 5432, 7706],
                 [17.4516, 17.0429, 15.1687, 15.0491, 14.9249]),
    PROMPTS[2]: ([1604, 3987, 46477, 24, 94, 727, 2367], [3987, 753, 1003, 585, 2822],
                 [22.0275, 21.9105, 21.4523, 20.999, 20.914]),
}
# (2) Hugging Face transformers 5.24.0 (+ accelerate 1.15.0): AutoModelForCausalLM.from_pretrained(
#     "../shared/assets/smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32), logits of the
#     ids above at the last position, top-5. Its own GGUF loader (it undoes llama.cpp's q/k layout to HF's and runs
#     HF's rotate-half RoPE) on weights dequantized by the gguf package, all fp32: it agrees with us to ~1e-4.
TRANSFORMERS_TOP5 = {
    PROMPTS[0]: ([7042, 260, 4528, 2250, 1315], [17.3713, 14.8886, 13.245, 13.0095, 12.9515]),
    PROMPTS[1]: ([8180, 3102, 6560, 5432, 7706], [17.5509, 17.0577, 15.0643, 14.9877, 14.9517]),
    PROMPTS[2]: ([753, 3987, 1003, 585, 2822], [21.8102, 21.7726, 21.203, 20.7945, 20.7358]),
}
# Mixed text and its ids from llama.cpp's tokenizer (same setup as (1)); llama.cpp's "smollm" pre-tokenizer splits
# every digit, then applies GPT-2's regex, as SmolLM2's own tokenizer.json does.
MIXED = "Hello, world! The year 2024 had 365 days.\n\n  Indented   spaces\tand a tab; café, naïve Zoë: déjà vu 😊 — end.\n"
MIXED_IDS = [19556, 28, 905, 17, 378, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 37, 2009, 30, 8866, 1218, 6574, 256,
             5600, 197, 397, 253, 10147, 43, 37366, 28, 15486, 46494, 26336, 26547, 42, 32564, 90, 16739, 386, 101,
             40303, 228, 1841, 1112, 30, 198]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    src = shared_file(SMOLLM2)
    out = tmp_path_factory.mktemp("smollm2") / "meta"
    t0 = time.perf_counter()
    convert.convert(src, out)
    print(f"converted {src.name} in {time.perf_counter() - t0:.1f} s")  # reported, not asserted: no timed tests
    return out


def test_smollm2_gguf_converts_and_generates(smollm2):
    params = json.loads((smollm2 / "params.json").read_text())
    assert params == dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
                          norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True)
    assert ModelArgs(**params).hidden_dim == 1536
    m = Magnet.load(smollm2, smollm2 / "tokenizer.json")
    assert m.model.output.weight is m.model.tok_embeddings.weight
    assert m.generate("The capital of France is", 2).startswith(" Paris")


def test_smollm2_logits_match_llama_cpp_and_transformers(smollm2):
    m = Magnet.load(smollm2, smollm2 / "tokenizer.json")
    for prompt, (ids, lc_top, lc_logits) in LLAMA_CPP_TOKENS.items():
        assert m.tok.encode(prompt) == ids
        with torch.no_grad():
            logits = m.model(torch.tensor([ids]))[0, -1].double()
        top = logits.topk(5)
        hf_top, hf_logits = TRANSFORMERS_TOP5[prompt]
        assert top.indices.tolist() == hf_top
        torch.testing.assert_close(top.values, torch.tensor(hf_logits, dtype=torch.float64), atol=2e-3, rtol=0)
        # llama.cpp: the same five candidates, each logit within its activation-quantization error
        assert set(top.indices.tolist()[:3]) <= set(lc_top)
        torch.testing.assert_close(logits[lc_top], torch.tensor(lc_logits, dtype=torch.float64), atol=0.3, rtol=0)


def test_smollm2_tokenizer(smollm2):
    tok = Tokenizer(smollm2 / "tokenizer.json")
    assert tok.encode(MIXED) == MIXED_IDS and tok.decode(MIXED_IDS) == MIXED
    assert (tok.vocab_size, tok.add_bos) == (49152, False)  # SmolLM2 adds no BOS ...
    assert tok.id_to_piece(tok.bos_id) == "<|endoftext|>"  # ... so its documents start at the separator
    assert tok.id_to_piece(tok.eos_id) == "<|im_end|>" and tok.id_to_piece(tok.mask_id) == "_"
    assert tok.encode("The", bos=True, eos=True) == [tok.bos_id, 504, tok.eos_id]
    # byte-level BPE: the leading space is part of the word, so a right context keeps "Ġunder" as in the whole text
    left, right = tok.context_ids("Mia found a", " under the tree.")
    assert left[0] == tok.bos_id and [tok.id_to_piece(i) for i in right] == ["Ġunder", "Ġthe", "Ġtree", "."]
    whole = tok.encode("Mia found a kite under the tree.")
    assert left[1:] + tok.encode_after("Mia found a kite", " under the tree.") == \
        whole[:len(left) - 1] + whole[-len(right):]
    assert [tok.id_to_piece(i) for i in tok.encode_after("The year", " 2024")] == ["Ġ", "2", "0", "2", "4"]


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face layout, written here from a random model


def hf_permute(w, n_heads):
    """HF's convert_llama_weights_to_hf permutation (rotate-half RoPE layout), written independently of convert.py."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def tiny_model(vocab, **kw):
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=4,
                               ffn_dim_multiplier=0.6, norm_eps=1e-6, rope_theta=5000.0), **kw})
    model = Transformer(args).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))  # not all ones, so a swapped norm shows
    return model


def write_hf(model, directory, shards=2, binary=False):
    a = model.args
    directory.mkdir(parents=True)
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2":
             "mlp.down_proj", "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            w = layer.get_submodule(ours).weight.detach().clone()
            if ours in ("attention.wq", "attention.wk"):
                w = hf_permute(w, a.n_heads if ours == "attention.wq" else a.kv_heads)
            state[f"model.layers.{i}.{theirs}.weight"] = w
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=a.dim, intermediate_size=a.hidden_dim,
                  num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                  vocab_size=a.vocab_size, rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, hidden_act="silu",
                  tie_word_embeddings=False, rope_scaling=None, torch_dtype="float32")
    (directory / "config.json").write_text(json.dumps(config))
    if binary:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys, weight_map = sorted(state), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        safetensors_torch.save_file(part, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def same_logits(model, directory):
    converted = load_checkpoint(directory)
    tokens = torch.randint(0, model.args.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(converted(tokens), model(tokens), atol=1e-5, rtol=0)
    return converted


@pytest.mark.parametrize("binary", [False, True], ids=["sharded-safetensors", "pytorch_model.bin"])
def test_hf_checkpoint_gqa_untied(toy_files, tmp_path, binary):
    model = tiny_model(toy_files[2].vocab_size)
    write_hf(model, tmp_path / "hf", binary=binary)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(toy_files[2].path.read_bytes())
    convert.convert(tmp_path / "hf", tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert ModelArgs(**params).hidden_dim == model.args.hidden_dim == 104  # via ffn_dim_multiplier
    converted = same_logits(model, tmp_path / "meta")
    assert not converted.args.tie_embeddings and converted.args.kv_heads == 2
    assert Magnet.load(tmp_path / "meta", tmp_path / "meta" / "tokenizer.model").tok.vocab_size == toy_files[2].vocab_size


# ----------------------------------------------------------------------------------------------------------------
# GGUF, written here from a random model: names, reversed shapes, Meta's q/k layout, several tensor types


Q = gguf.GGMLQuantizationType
TYPES = {"attention.wq": Q.Q8_0, "attention.wk": Q.Q4_0, "attention.wv": Q.Q4_1, "attention.wo": Q.F16,
         "feed_forward.w1": Q.Q4_K, "feed_forward.w2": Q.Q6_K, "feed_forward.w3": Q.BF16}
GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo":
              "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def k_quant_bytes(shape, qtype, rng):
    """Random bytes in a K-quant's block layout (gguf cannot quantize to Q4_K / Q6_K), with sane fp16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block_elems, block_bytes), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q6_K: [block_bytes - 2]}.get(qtype, [])  # Q4_K: d, dmin first; Q6_K: d last
    for at in scale_at:
        blocks[:, at:at + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return blocks.reshape(shape[0], -1)


def write_gguf(model, path, arch="llama", bad_type=None, tokenizer=False, rope_divisors=None):
    """A GGUF of `model` as llama.cpp lays it out; returns the weights it holds, dequantized (Meta names).
    rope_divisors: Llama-3's scaled RoPE as llama.cpp writes it, a rope_freqs tensor (with the original context)."""
    a, rng, held = model.args, np.random.default_rng(0), {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(a.n_layers)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    if tokenizer:
        w.add_tokenizer_model("llama")  # SentencePiece: convert.py cannot rebuild it
    if rope_divisors is not None:
        w.add_rope_scaling_orig_ctx_len(a.rope_scaling["original_max_position_embeddings"])
        w.add_tensor("rope_freqs.weight", rope_divisors)
    for name, p in model.state_dict().items():
        parts = name.split(".")
        key = ".".join(parts[2:-1]) if parts[0] == "layers" else parts[0]
        gname = (f"blk.{parts[1]}.{GGUF_NAMES[key]}" if parts[0] == "layers" else
                 {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}[key]) + ".weight"
        x = p.detach().numpy()
        qtype = bad_type if bad_type and key == "attention.wv" else TYPES.get(key, Q.F32)
        if qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_1):
            data = k_quant_bytes(x.shape, qtype, rng)
        else:
            data = gguf.quants.quantize(x, qtype) if qtype != Q.F32 else x
        w.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        if qtype != Q.Q8_1:
            held[name] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(x.shape).copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def test_gguf_tensor_types_names_and_layout(toy_files, tmp_path):
    model = tiny_model(toy_files[2].vocab_size, dim=256, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=None, multiple_of=256)
    held = write_gguf(model, tmp_path / "tiny.gguf")
    convert.convert(tmp_path / "tiny.gguf", tmp_path / "meta", tokenizer=toy_files[2].path)
    state = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert state.keys() == held.keys()
    for k, v in held.items():
        assert torch.equal(state[k], v), k  # every type dequantized, shape reversed back, no permutation
    model.load_state_dict(held)  # the model as the GGUF holds it
    same_logits(model, tmp_path / "meta")
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == toy_files[2].path.read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a one-line error that names the file, and nothing written


def refused(src, out, match, **kw):
    before = sorted(out.parent.iterdir())
    with pytest.raises(CheckpointError, match=match) as e:
        convert.convert(src, out, **kw)
    assert "\n" not in str(e.value)
    assert sorted(out.parent.iterdir()) == before  # no OUT_DIR, no temporary directory left behind


def test_bad_inputs(toy_files, tmp_path):
    model = tiny_model(toy_files[2].vocab_size, dim=256, n_heads=4, multiple_of=256, ffn_dim_multiplier=None)
    out = tmp_path / "out" / "meta"
    out.parent.mkdir()
    write_gguf(model, tmp_path / "other.gguf", arch="gpt2")
    refused(tmp_path / "other.gguf", out, r"other\.gguf: general\.architecture is 'gpt2'")
    write_gguf(model, tmp_path / "q81.gguf", bad_type=Q.Q8_1)
    refused(tmp_path / "q81.gguf", out, r"q81\.gguf: tensor blk\.0\.attn_v\.weight has quantization type Q8_1",
            tokenizer=toy_files[2].path)
    write_gguf(model, tmp_path / "ok.gguf", tokenizer=True)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
    refused(tmp_path / "cut.gguf", out, r"cut\.gguf: .*truncated")
    refused(tmp_path / "ok.gguf", out, r"ok\.gguf: cannot rebuild tokenizer .llama. .*--tokenizer")
    (tmp_path / "notgguf.gguf").write_bytes(b"hello")
    refused(tmp_path / "notgguf.gguf", out, r"notgguf\.gguf: not a GGUF file")

    write_hf(tiny_model(toy_files[2].vocab_size), tmp_path / "hf", shards=2)
    (tmp_path / "hf" / "tokenizer.model").write_bytes(toy_files[2].path.read_bytes())
    (tmp_path / "hf" / "config.json").rename(tmp_path / "config.json")
    refused(tmp_path / "hf", out, r"hf/config\.json: not found")
    for bad, message in (("{bad", "not valid JSON"), ("[1]", "expected a JSON object of model settings"),
                         ('{"hidden_size": "64"}', "hidden_size is '64'; expected a positive integer"),
                         ('{"num_attention_heads": 0}', "num_attention_heads is 0; expected")):
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **json.loads(bad)}) if bad[0] == "{" and
                                                     bad != "{bad" else bad)
        refused(tmp_path / "hf", out, r"hf/config\.json: .*" + message)
    (tmp_path / "config.json").rename(tmp_path / "hf" / "config.json")
    (tmp_path / "noise.model").write_bytes(bytes(range(256)))
    refused(tmp_path / "hf", out, r"noise\.model: not a SentencePiece model", tokenizer=tmp_path / "noise.model")
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").rename(tmp_path / "shard2")
    refused(tmp_path / "hf", out, r"hf: shard model-00002-of-00002\.safetensors named in .* is missing")
    (tmp_path / "shard2").rename(tmp_path / "hf" / "model-00002-of-00002.safetensors")
    refused(tmp_path / "missing", out, r"missing: not found")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value in (("rope_scaling", {"type": "linear", "factor": 2.0}), ("attention_bias", True)):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
        refused(tmp_path / "hf", out, rf"hf/config\.json: {key} is .*expected a plain Llama")  # names the key
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    killed = out.parent / f".meta.converting.{socket.gethostname()}-999999999.x1y2"  # a killed conversion's
    killed.mkdir()
    (killed / "consolidated.00.pth").write_bytes(b"half")
    convert.convert(tmp_path / "hf", out)  # good input; then OUT_DIR holds a checkpoint
    assert not killed.exists()  # the next conversion named it and removed it
    first = (out / "consolidated.00.pth").read_bytes()
    refused(tmp_path / "hf", out, r"meta: already holds a checkpoint; pass --overwrite")
    assert (out / "consolidated.00.pth").read_bytes() == first
    convert.convert(tmp_path / "ok.gguf", out, overwrite=True, tokenizer=toy_files[2].path)
    assert sorted(p.name for p in out.parent.iterdir()) == ["meta"]  # replaced, nothing left beside it
    assert json.loads((out / "params.json").read_text())["dim"] == 256


def test_command_line_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(tmp_path / "nothing.gguf"), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "nothing.gguf: not found" in r.stderr
    assert not (tmp_path / "o").exists()


def test_setting_c_recipe_runs_a_few_steps(smollm2, tmp_path):
    """config/smollm2.py (Setting C) on a slice of its data: trains, exports with the BPE tokenizer beside the merged
    weights, and LLM2Vec's second stage starts from that export, as experiments.sh C runs them."""
    import train
    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(shared_file("data/wikitext2/valid.txt").read_text().split("\n \n")[:60]))
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(shared_file("data/snli/entailment_pairs.tsv").read_text().splitlines(True)[:40]))
    tiny = [f"--init_from={smollm2}", f"--tokenizer={smollm2 / 'tokenizer.json'}", f"--data={text}",
            f"--pairs={pairs}", "--batch_size=2", "--seq_len=32", "--sscl_len=16", "--max_iters=2",
            "--warmup_iters=1", "--demo=false", f"--cache_dir={tmp_path / 'cache'}", "--device=cpu"]
    assert train.main([str(ROOT / "config/smollm2.py"), *tiny, f"--out_dir={tmp_path / 'mntp'}", "--max_spans=0",
                       "--p_causal=0.0", "--w_msg=0.0", "--w_sscl=0.0"]) == 0
    merged = tmp_path / "mntp" / "merged"
    assert (merged / "tokenizer.json").is_file() and (merged / "tokenizer_config.json").is_file()
    tiny[:2] = [f"--init_from={merged}", f"--tokenizer={merged / 'tokenizer.json'}"]
    assert train.main([str(ROOT / "config/smollm2.py"), *tiny, f"--out_dir={tmp_path / 'simcse'}", "--w_mntp=0.0",
                       "--w_msg=0.0", "--pooling=mean"]) == 0
    log = [json.loads(line) for line in (tmp_path / "simcse" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["sscl"]) for r in log)
    m = Magnet.load(merged, merged / "tokenizer.json", adapter=tmp_path / "simcse" / "adapter.pt")
    assert m.pooling == "mean" and m.encode(["A man is playing a guitar."]).shape == (1, 576)


def llama3_divisors(head_dim, theta, factor, low, high, context):
    """llama.cpp's rope_freqs for Llama-3.1's scaling, in float64 from the published rule: frequencies of wavelength
    above context/low are divided by factor, below context/high kept, and blended between."""
    out = []
    for freq in 1 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelength = 2 * np.pi / freq
        smooth = (context / wavelength - low) / (high - low)
        out.append(1.0 if wavelength < context / high else factor if wavelength > context / low else
                   1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_scaling_comes_from_rope_freqs(toy_files, tmp_path):
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=400)
    model = tiny_model(toy_files[2].vocab_size, dim=256, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=None,
                       multiple_of=256, rope_theta=500000.0, rope_scaling=scaling)
    divisors = llama3_divisors(64, 500000.0, 8.0, 1.0, 4.0, 400)
    assert divisors[0] == 1.0 and 1.0 < divisors[8] < 8.0 and divisors[-1] == 8.0  # all three bands occur
    model.load_state_dict(write_gguf(model, tmp_path / "l3.gguf", rope_divisors=divisors))  # as quantized
    convert.convert(tmp_path / "l3.gguf", tmp_path / "meta", tokenizer=toy_files[2].path)
    assert load_checkpoint(tmp_path / "meta").args.rope_scaling == scaling
    same_logits(model, tmp_path / "meta")
    write_gguf(model, tmp_path / "other.gguf", rope_divisors=divisors * np.linspace(1, 1.5, 32, dtype=np.float32))
    refused(tmp_path / "other.gguf", tmp_path / "meta2", r"rope_freqs\.weight is not Llama-3's RoPE scaling",
            tokenizer=toy_files[2].path)
