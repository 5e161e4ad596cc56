"""model.py: architecture sizes, checkpoint round trips (incl. model-parallel shards), KV cache, LoRA, clear errors."""
import json

import numpy as np
import pytest
import torch

from attention import CONTEXT, SPAN
from checkpoint import CheckpointError, load_adapter, load_checkpoint, save_adapter, save_checkpoint
from model import (LOGITS_PER_PIECE, KVCache, LoRALinear, ModelArgs, Transformer, apply_lora, lora_layers, merge_lora,
                   unmerge_lora)

ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=8, max_seq_len=64)


def tiny(**kw):
    return Transformer(ModelArgs(**{**ARGS, **kw})).eval()


# ---------------------------------------------------------------------------------------------------- sizes

def test_llama2_7b_parameter_count_on_meta_device():
    params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": 32000}
    with torch.device("meta"):
        model = Transformer(ModelArgs(**params))
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert model.args.hidden_dim == 11008


def test_ffn_widths_13b_70b():
    assert ModelArgs(dim=5120, multiple_of=256).hidden_dim == 13824
    assert ModelArgs(dim=8192, multiple_of=4096, ffn_dim_multiplier=1.3).hidden_dim == 28672
    assert ModelArgs(dim=64, multiple_of=4).hidden_dim == 172  # stories260K


# ---------------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("tied", [False, True])
def test_save_load_roundtrip(tmp_path, tied):
    model = tiny(tie_embeddings=tied)
    tokens = torch.randint(0, 61, (2, 10))
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", max_seq_len=64)
    assert loaded.args.tie_embeddings == tied
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tied
    assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(FileExistsError):  # never overwrites without being asked
        save_checkpoint(model, tmp_path / "ckpt")


def split_like_meta(state, n):
    """The inverse of Meta's merge, written here independently: column-parallel weights split on dim 0,
    row-parallel weights and the embedding on dim 1, norms replicated."""
    rows = ("wq", "wk", "wv", "w1", "w3", "output")
    cols = ("wo", "w2", "tok_embeddings")
    shards = [{} for _ in range(n)]
    for key, t in state.items():
        kind = key.split(".")[-2]
        parts = t.chunk(n, 0) if kind in rows else t.chunk(n, 1) if kind in cols else [t] * n
        for s, p in zip(shards, parts):
            s[key] = p.clone()
    shards[0]["rope.freqs"] = torch.zeros(4)  # present in Meta's files, must be ignored
    return shards


def test_two_model_parallel_shards_merge(tmp_path):
    model = tiny()
    for i, shard in enumerate(split_like_meta(model.state_dict(), 2)):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps({k: ARGS[k] for k in ARGS if k != "max_seq_len"}))
    loaded = load_checkpoint(tmp_path, max_seq_len=64)
    tokens = torch.randint(0, 61, (2, 10))
    assert torch.equal(loaded(tokens), model(tokens))


def test_load_keeps_checkpoint_dtype_off_cpu_and_fp32_on_cpu(tmp_path):
    model = tiny().to(torch.bfloat16)
    save_checkpoint(model, tmp_path)
    assert load_checkpoint(tmp_path).tok_embeddings.weight.dtype == torch.float32
    assert load_checkpoint(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- KV cache

def test_kv_cache_causal_generation_equals_recomputation():
    model = tiny()
    tokens = torch.randint(0, 61, (2, 12))
    full = model(tokens)
    cache = KVCache(model.args, batch_size=2, max_len=12)
    steps = [model(tokens[:, :5], cache=cache)]  # the prompt in one go, then one token at a time
    steps += [model(tokens[:, t:t + 1], start_pos=t, cache=cache) for t in range(5, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_kv_cache_span_decoding_after_context_equals_recomputation():
    """Infilling: encode CONTEXT at positions 0..L-1 and L+n.. once, then decode the n SPAN tokens one at a time."""
    model = tiny()
    L, n, T = 4, 3, 11
    tokens = torch.randint(0, 61, (1, T))
    roles = torch.full((1, T), CONTEXT)
    roles[0, L:L + n] = SPAN
    full = model(tokens, roles)
    cache = KVCache(model.args, batch_size=1, max_len=T)
    ctx_pos = torch.cat([torch.arange(L), torch.arange(L + n, T)])
    ctx_out = model(tokens[:, ctx_pos], torch.full((1, T - n), CONTEXT), positions=ctx_pos, cache=cache)
    assert torch.allclose(ctx_out, full[:, ctx_pos], atol=1e-5)
    for p in range(L, L + n):
        step = model(tokens[:, p:p + 1], torch.full((1, 1), SPAN), positions=torch.tensor([p]), cache=cache)
        assert torch.allclose(step[0, 0], full[0, p], atol=1e-5)


def test_targets_give_each_targets_loss_in_bounded_pieces():
    """forward(targets=) projects only the target positions onto the vocabulary, in pieces of at most
    LOGITS_PER_PIECE logits; each loss equals a float64 log-softmax of the full logits at that position."""
    torch.manual_seed(0)
    model = tiny(vocab_size=32000, dim=16, n_heads=2, n_kv_heads=1, multiple_of=16)
    tokens = torch.randint(0, 32000, (8, 64))
    targets = torch.randint(0, 32000, (8, 64))
    targets[torch.rand(8, 64) < 0.3] = -100  # data.IGNORE: no target here
    pieces = []
    model.output.register_forward_hook(lambda module, inputs, out: pieces.append(out.shape))
    nll = model(tokens, targets=targets)
    keep = targets >= 0
    n = int(keep.sum())
    assert nll.shape == (n,) and n * 32000 > 2 * LOGITS_PER_PIECE  # enough targets for three pieces or more
    assert len(pieces) >= 3 and sum(rows for rows, _ in pieces) == n
    assert all(rows * vocab <= LOGITS_PER_PIECE for rows, vocab in pieces)
    logp = torch.log_softmax(model(tokens).double(), -1)  # (B, T, V): every logit, in float64
    expected = -logp[keep].gather(1, targets[keep][:, None])[:, 0]  # (N,) in row-major order
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- LoRA

def test_lora_starts_at_base_merges_and_trains_only_adapters(tmp_path):
    model = tiny()
    tokens = torch.randint(0, 61, (2, 10))
    base = model(tokens)
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * 2
    assert torch.equal(model(tokens), base)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    adapted = model(tokens)
    assert not torch.allclose(adapted, base, atol=1e-3)
    # the update, re-derived in the test: W + (alpha/r) B A
    wq = model.layers[0].attention.wq
    x = torch.randn(3, 32)
    assert torch.allclose(wq(x), x @ (wq.weight + 2.0 * wq.lora_B @ wq.lora_A).T, atol=1e-5)
    merge_lora(model)
    assert torch.allclose(model(tokens), adapted, atol=1e-5)
    unmerge_lora(model)
    assert torch.allclose(model(tokens), adapted, atol=1e-5)
    # the merged Meta export equals the adapted model
    save_checkpoint(model, tmp_path / "merged")
    assert torch.allclose(load_checkpoint(tmp_path / "merged", max_seq_len=64)(tokens), adapted, atol=1e-5)


@pytest.mark.parametrize("alpha", [32, 24])  # alpha/r = 2 (a power of two: bit for bit PEFT's order) and 1.5
def test_lora_scaling_on_the_rank_r_activations(alpha):
    """LoRALinear scales A x (r numbers per token), PEFT scales B A x (out numbers): the same map and gradients, to
    float64; identical bits when alpha/r is a power of two."""
    torch.manual_seed(0)
    lin = LoRALinear(torch.nn.Parameter(torch.randn(48, 40), requires_grad=False), rank=16, alpha=alpha, dropout=0.0)
    torch.nn.init.normal_(lin.lora_B, std=0.3)
    x, g = torch.randn(5, 7, 40), torch.randn(5, 7, 48)
    def value_and_grads(forward, *tensors):
        for t in tensors:
            t.grad = None
        y = forward(*tensors)
        y.backward(g.to(y.dtype))
        return [y.detach()] + [t.grad for t in tensors]
    xr = x.clone().requires_grad_()
    ours = value_and_grads(lambda x, a, b: lin(x), xr, lin.lora_A, lin.lora_B)
    peft_order = lambda x, a, b: x @ lin.weight.to(x.dtype).T + (x @ a.T @ b.T) * (alpha / 16)
    exact = value_and_grads(peft_order, *(t.detach().double().requires_grad_() for t in (x, lin.lora_A, lin.lora_B)))
    for o, e in zip(ours, exact):
        assert torch.allclose(o.double(), e, rtol=1e-5, atol=1e-5)
    peft = value_and_grads(peft_order, *(t.detach().clone().requires_grad_() for t in (x, lin.lora_A, lin.lora_B)))
    assert all(torch.equal(o, q) for o, q in zip(ours, peft)) == (alpha == 32)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_lora_dropout_drops_each_element_independently_with_probability_p(p):
    """The sparse sampler against the Bernoulli(p) law it stands for: every output is 0 or x / (1 - p); the count
    dropped, in the whole tensor, in its last 2%, in the first and last 8 elements of 400 tensors (where the gap sums
    start and must end), and of adjacent pairs (independence: n p^2) within 6 standard deviations; the gradient is the
    same mask; one seed gives one mask, another a different one; outside training LoRALinear applies none."""
    from noise import dropout
    torch.manual_seed(0)
    x = torch.rand(40, 5000) + 0.5  # no zeros of its own
    torch.manual_seed(1)
    xr = x.clone().requires_grad_()
    y = dropout(xr, p)
    dropped, flat = y == 0, (y == 0).flatten()
    assert torch.equal(y[~dropped], (x * torch.tensor(1 / (1 - p)))[~dropped])
    def within_6_sd(count, n, q):
        return abs(count - n * q) < 6 * (n * q * (1 - q)) ** 0.5
    n = flat.numel()
    assert within_6_sd(int(flat.sum()), n, p)
    assert within_6_sd(int(flat[-n // 50:].sum()), n // 50, p)
    assert within_6_sd(int((flat[1:] & flat[:-1]).sum()), n - 1, p * p)
    masks = torch.stack([dropout(torch.ones(40_000), p) == 0 for _ in range(400)])
    for edge in (masks[:, :8], masks[:, -8:]):  # the first gap starts at index 0; the sums must pass the very end
        assert within_6_sd(int(edge.sum()), edge.numel(), p)
    y.backward(torch.full_like(y, 3.0))
    assert torch.equal(xr.grad, torch.where(dropped, 0.0, 3.0 * torch.tensor(1 / (1 - p))))
    torch.manual_seed(1)
    assert torch.equal(dropout(x, p), y.detach())
    assert not torch.equal(dropout(x, p), y.detach())  # the generator moved on: a new mask
    lin = LoRALinear(torch.nn.Parameter(torch.randn(8, 5000), requires_grad=False), rank=4, alpha=8, dropout=p)
    torch.nn.init.normal_(lin.lora_B)
    assert not torch.equal(lin(x), lin(x))
    lin.eval()
    assert torch.equal(lin(x), lin(x))


def test_lora_dropout_is_replayed_by_activation_checkpointing():
    """Recomputing a block in backward draws the same LoRA dropout masks (torch.utils.checkpoint restores the RNG
    state): with checkpointing the loss and the adapter gradients equal those without, bit for bit (and another seed
    gives another loss, so the masks are really drawn). Also when the step has two forwards whose rows are parts of
    larger batches (MAGNET's view A, then views B and C: the recomputation of the first must use its own rows). A
    dropout outside [0, 1) is refused when LoRA is applied."""
    torch.manual_seed(0)
    model = apply_lora(Transformer(ModelArgs(**ARGS)), rank=4, alpha=8, dropout=0.3).train()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 16))
    tokens3 = torch.randint(0, ARGS["vocab_size"], (3, 12))
    def loss_and_grads(checkpointed, parts=False):
        model.checkpoint_activations = checkpointed
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = model(tokens, targets=tokens).mean()
        if parts:  # rows 1-2 of 4, then rows 0, 3, 4 of 6
            loss = model(tokens, targets=tokens, noise_rows=(torch.tensor([1, 2]), 4)).mean() + \
                model(tokens3, targets=tokens3, noise_rows=(torch.tensor([0, 3, 4]), 6)).mean()
        loss.backward()
        return [loss] + [p.grad for p in model.parameters() if p.requires_grad]
    for parts in (False, True):
        for a, b in zip(loss_and_grads(False, parts), loss_and_grads(True, parts)):
            assert torch.equal(a, b)
    model.checkpoint_activations = False
    torch.manual_seed(8)
    assert not torch.equal(model(tokens, targets=tokens).mean(), loss_and_grads(False)[0])  # the masks matter
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\), got 1.0"):
        apply_lora(Transformer(ModelArgs(**ARGS)), dropout=1.0)


def test_adapter_roundtrip_onto_same_base(tmp_path):
    torch.manual_seed(1)
    base = tiny()
    save_checkpoint(base, tmp_path / "base")
    model = apply_lora(load_checkpoint(tmp_path / "base", max_seq_len=64), rank=4, alpha=8, dropout=0.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(0, 61, (2, 10))
    save_adapter(model, tmp_path / "adapter.pt")
    reloaded = load_adapter(load_checkpoint(tmp_path / "base", max_seq_len=64), tmp_path / "adapter.pt")
    assert torch.equal(reloaded(tokens), model(tokens))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_adapter(tiny(dim=48, n_heads=4), tmp_path / "adapter.pt")


def test_merged_export_of_a_bf16_base_keeps_the_adapter(tmp_path):
    """A bf16 base (as on GPU) with a small rank-16 update (~0.2% of the weights): merged into fp32 the update is
    exact; merged into bf16 most of it is rounded away, which is why train.py's merged_dtype defaults to float32."""
    torch.manual_seed(0)
    model = apply_lora(tiny(dim=64, n_heads=4).to(torch.bfloat16), rank=16, alpha=32, dropout=0.0)
    for m in lora_layers(model):
        m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()  # fp32 adapters, as train.py
        torch.nn.init.normal_(m.lora_B, std=8e-5)
    wq = model.layers[0].attention.wq
    update = wq.delta().detach()
    assert 0.001 < float(update.abs().mean() / wq.weight.float().abs().mean()) < 0.005

    def recovered_error(dtype):
        save_checkpoint(model, tmp_path / str(dtype), dtype=dtype)
        merged = torch.load(tmp_path / str(dtype) / "consolidated.00.pth")["layers.0.attention.wq.weight"]
        assert merged.dtype == dtype
        return float((merged.float() - wq.weight.float() - update).norm() / update.norm())

    assert recovered_error(torch.float32) < 1e-4  # fp32 rounding of W + update, seen through W + update - W
    assert recovered_error(torch.bfloat16) > 0.3  # measured ~0.6: the cost the README states


# ---------------------------------------------------------------------------------------------------- errors

def test_clear_errors_for_bad_meta_checkpoints(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "ok")
    with pytest.raises(CheckpointError, match=r"params\.json: not found"):
        load_checkpoint(tmp_path / "ok" / "..")
    (tmp_path / "noshard").mkdir()
    (tmp_path / "noshard" / "params.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth is missing"):
        load_checkpoint(tmp_path / "noshard")
    for i, shard in enumerate(split_like_meta(model.state_dict(), 3)):
        if i != 1:
            torch.save(shard, tmp_path / "noshard" / f"consolidated.{i:02d}.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth is missing"):
        load_checkpoint(tmp_path / "noshard")
    params = json.loads((tmp_path / "ok" / "params.json").read_text())
    (tmp_path / "ok" / "params.json").write_text(json.dumps({**params, "dim": 48}))
    with pytest.raises(CheckpointError, match=r"attention\.wk\.weight has shape \(16, 32\).*implies \(24, 48\)"):
        load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "params.json").write_text(json.dumps({**params, "moe_num_experts": 8}))
    with pytest.raises(CheckpointError, match="unsupported key"):
        load_checkpoint(tmp_path / "ok")
    for bad, message in (('{"dim": "64"}', r"bad value\(s\) dim='64'"), ('{"n_heads": 0}', "n_heads=0"),
                         ('{"dim": null}', "dim=None"), ('{"norm_eps": true}', "norm_eps=True")):
        (tmp_path / "ok" / "params.json").write_text(json.dumps({**params, **json.loads(bad)}))
        with pytest.raises(CheckpointError, match=r"params\.json: .*" + message):
            load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "params.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"params\.json: expected a JSON object"):
        load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "params.json").write_text(json.dumps(params))
    good = (tmp_path / "ok" / "consolidated.00.pth").read_bytes()
    for not_a_state_dict in ([1, 2], {"a": 1}, {}):
        torch.save(not_a_state_dict, tmp_path / "ok" / "consolidated.00.pth")
        with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: expected a state dict"):
            load_checkpoint(tmp_path / "ok")
    (tmp_path / "ok" / "consolidated.00.pth").write_bytes(good)
    with pytest.raises(CheckpointError, match=r"params\.json: not a LoRA adapter file .*\(not a PyTorch file\)"):
        load_adapter(load_checkpoint(tmp_path / "ok"), tmp_path / "ok" / "params.json")
    with pytest.raises(CheckpointError, match="61 tokens but the tokenizer's has 32000"):
        load_checkpoint(tmp_path / "ok", vocab_size=32000)
    (tmp_path / "ok" / "consolidated.00.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot be read"):
        load_checkpoint(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def write_llama2c(path, model, seq_len=16):
    """A llama2.c v0 file written independently of model.py's reader (tied, so vocab_size positive)."""
    a, sd = model.args, model.state_dict()
    header = np.array([a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.kv_heads, a.vocab_size, seq_len], "<i4")
    per_layer = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    blocks = [sd["tok_embeddings.weight"]]
    blocks += [sd[f"layers.{i}.{name}.weight"] for name in per_layer for i in range(a.n_layers)]
    blocks += [sd["norm.weight"], torch.zeros(seq_len * a.head_dim)]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for b in blocks:
            f.write(b.detach().numpy().astype("<f4").tobytes())


def test_llama2c_bin_roundtrip_and_truncation(tmp_path):
    model = tiny(tie_embeddings=True, max_seq_len=16)
    write_llama2c(tmp_path / "m.bin", model)
    loaded = load_checkpoint(tmp_path / "m.bin")
    assert loaded.args.max_seq_len == 16 and loaded.args.tie_embeddings
    tokens = torch.randint(0, 61, (1, 9))
    assert torch.equal(loaded(tokens), model(tokens))
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.bin: \d+ bytes.*truncated"):
        load_checkpoint(tmp_path / "cut.bin")
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="too short"):
        load_checkpoint(tmp_path / "tiny.bin")


def test_dropout_of_some_rows_is_the_whole_batchs_on_those_rows():
    """noise.dropout with rows=(index, n): a process holding rows `index` of a batch of n gets exactly the mask the
    whole batch would get on those rows, from the same seed, however the rows are split."""
    from noise import dropout
    x = torch.rand(6, 7, 33) + 0.5  # (rows, T, features), no zeros of its own
    torch.manual_seed(3)
    whole = dropout(x, 0.3)
    for index in (torch.arange(6), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([1, 4])):
        torch.manual_seed(3)
        assert torch.equal(dropout(x[index], 0.3, rows=(index, 6)), whole[index]), index
    assert 0.2 < float((whole == 0).float().mean()) < 0.4
