"""convert.py --to=hf: out to Hugging Face + PEFT, held to the libraries themselves (transformers' Llama, PEFT's
LoRA), which skip with a reason when absent; the HF -> Meta -> HF round trip is exact without them."""
import json
import shutil

import pytest
import torch

from checkpoint import CheckpointError, load_adapter, load_checkpoint, save_adapter, save_checkpoint
from model import ModelArgs, Transformer, apply_lora

safetensors_torch = pytest.importorskip("safetensors.torch")
import convert  # noqa: E402  (after the optional package, so a missing one skips instead of failing)
from magnet import Magnet  # noqa: E402


@pytest.fixture(scope="module")
def trained(toy_files, tmp_path_factory):
    """A tiny random GQA base (with the toy tokenizer beside it) and an adapter that visibly changes it."""
    d = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=toy_files[2].vocab_size,
                                  multiple_of=16, max_seq_len=128))
    save_checkpoint(model, d / "base")
    shutil.copyfile(toy_files[2].path, d / "base" / "tokenizer.model")
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    save_adapter(model, d / "adapter.pt")
    return d


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).float() if isinstance(model, Transformer) else model(tokens).logits


def test_transformers_and_peft_read_the_export_as_this_project_does(trained, toy_files):
    transformers = pytest.importorskip("transformers", reason="the check is transformers' own Llama")
    peft = pytest.importorskip("peft", reason="the check is PEFT's own LoRA")
    d = trained
    convert.export_hf(d / "base", d / "hf", adapter=d / "adapter.pt")
    convert.export_hf(d / "base", d / "hf-merged", adapter=d / "adapter.pt", merge=True)
    tokens = torch.randint(0, toy_files[2].vocab_size, (2, 24))
    base = logits(load_checkpoint(d / "base").eval(), tokens)
    adapted = logits(load_adapter(load_checkpoint(d / "base"), d / "adapter.pt").eval(), tokens)
    assert (adapted - base).abs().max() > 0.1  # the adapter visibly changes the model
    hf = transformers.AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, tokens), base, rtol=0, atol=1e-4)
    with_adapter = peft.PeftModel.from_pretrained(hf, d / "hf" / "adapter").eval()
    torch.testing.assert_close(logits(with_adapter, tokens), adapted, rtol=0, atol=1e-4)
    merged = transformers.AutoModelForCausalLM.from_pretrained(d / "hf-merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, tokens), adapted, rtol=0, atol=1e-4)
    assert not (d / "hf-merged" / "adapter").exists()
    # the encoder outside this project: BOS + text + EOS, every token seeing every other (a 4-D all-true mask), the
    # final hidden state at EOS (last-token pooling) -- Magnet.encode's vectors
    m = Magnet.load(d / "base", d / "base" / "tokenizer.model", adapter=d / "adapter.pt")
    for text in ("Mia found a kite.", "Under the tree, Tom spotted a big toy drum."):
        ids = torch.tensor([m.tok.encode(text, bos=True, eos=True)])
        everything = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
        with torch.no_grad():
            vector = merged.model(input_ids=ids, attention_mask=everything).last_hidden_state[0, -1]
        torch.testing.assert_close(vector, m.encode([text])[0], rtol=0, atol=1e-4)
    pytest.importorskip("google.protobuf", reason="transformers reads a SentencePiece .model through protobuf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(d / "hf")
    text = "One day, Mia found a story book under the tree."
    assert tokenizer(text).input_ids == m.tok.encode(text, bos=True)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids +
                        [tokenizer.eos_token_id]])  # the README's lines
    everything = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    with torch.no_grad():
        vector = merged.model(input_ids=ids, attention_mask=everything).last_hidden_state[0, -1]
    torch.testing.assert_close(vector, m.encode([text])[0], rtol=0, atol=1e-4)


def test_the_export_says_how_the_model_encodes(trained, toy_files, tmp_path):
    """An adapter trained with mean pooling after an instruction: magnet.json in the export says so, and reading the
    vector by it (mean of the text's states and EOS, after BOS + instruction) gives Magnet.encode's."""
    transformers = pytest.importorskip("transformers", reason="the check is transformers' own Llama")
    d, settings = trained, {"instruction": "Query:", "pooling": "mean"}
    adapted = load_adapter(load_checkpoint(d / "base"), d / "adapter.pt")
    save_adapter(adapted, tmp_path / "mean.pt", magnet=settings)
    convert.export_hf(d / "base", tmp_path / "hf", adapter=tmp_path / "mean.pt", merge=True)
    saved = json.loads((tmp_path / "hf" / "magnet.json").read_text())
    assert saved == {**settings, "bos_token_id": 1, "eos_token_id": 2}
    m, text = Magnet.load(d / "base", d / "base" / "tokenizer.model", adapter=tmp_path / "mean.pt"), "Mia found a kite."
    instruction = m.tok.encode(saved["instruction"])
    ids = torch.tensor([[saved["bos_token_id"]] + instruction + m.tok.encode(text) + [saved["eos_token_id"]]])
    everything = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool)
    encoder = transformers.AutoModel.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        states = encoder(input_ids=ids, attention_mask=everything).last_hidden_state[0]
    torch.testing.assert_close(states[1 + len(instruction):].mean(0), m.encode([text])[0], rtol=0, atol=1e-4)


def test_hf_to_meta_to_hf_gives_back_every_tensor_exactly(trained, tmp_path):
    d = trained
    convert.export_hf(d / "base", tmp_path / "hf")  # an HF directory (one safetensors file)
    convert.convert(tmp_path / "hf", tmp_path / "meta")  # in again
    convert.export_hf(tmp_path / "meta", tmp_path / "hf2")  # and out
    first, second = (safetensors_torch.load_file(p / "model.safetensors") for p in (tmp_path / "hf", tmp_path / "hf2"))
    assert first.keys() == second.keys() and len(first) == 2 * 9 + 3
    for key, w in first.items():
        assert torch.equal(second[key], w), key
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["max_position_embeddings"], config["tie_word_embeddings"]) == \
        (2, 4096, False)


def test_large_exports_are_sharded_with_an_index(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "SHARD_BYTES", 200_000)  # as transformers' max_shard_size, scaled down
    convert.export_hf(trained / "base", tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    loaded = {k: v for s in shards for k, v in safetensors_torch.load_file(tmp_path / "hf" / s).items()}
    assert loaded.keys() == index["weight_map"].keys()
    assert convert.convert(tmp_path / "hf", tmp_path / "meta")["dim"] == 64  # and they read back in


def test_a_bad_export_is_refused_and_nothing_is_written(trained, tmp_path):
    other = apply_lora(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=256)), rank=4, alpha=8)
    save_adapter(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="adapter does not fit this model"):
        convert.export_hf(trained / "base", tmp_path / "hf", adapter=tmp_path / "other.pt")
    (tmp_path / "taken").mkdir()  # e.g. a train.py run directory: it has a config.json too
    for name in ("config.json", "adapter.pt"):
        (tmp_path / "taken" / name).write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="taken: exists and is not an earlier export"):
            convert.export_hf(trained / "base", tmp_path / "taken", overwrite=overwrite)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["adapter.pt", "config.json"]
    shutil.copyfile(trained / "base" / "consolidated.00.pth", tmp_path / "lonely.pth")
    with pytest.raises(CheckpointError, match="no tokenizer beside it"):
        convert.export_hf(tmp_path / "lonely.pth", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lonely.pth", "other.pt", "taken"]


def test_llama3_rope_scaling_matches_transformers(toy_files, tmp_path):
    """Llama-3.1's RoPE scaling, from an HF config.json (transformers >= 5 writes it as rope_parameters): our logits
    equal transformers' over 200 positions of a config whose original context is 32 (so the scaling matters); the
    context length comes along (magnet.json) and is enforced; the export carries both back out."""
    transformers = pytest.importorskip("transformers", reason="the check is transformers' own Llama")
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    config = transformers.LlamaConfig(vocab_size=toy_files[2].vocab_size, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False,
                                      rope_scaling=dict(rope_type="llama3", **scaling))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(toy_files[2].path, tmp_path / "hf" / "tokenizer.model")
    convert.convert(tmp_path / "hf", tmp_path / "meta")
    ours = load_checkpoint(tmp_path / "meta").eval()
    assert ours.args.rope_scaling == scaling and ours.args.max_seq_len == 256
    tokens = torch.randint(0, toy_files[2].vocab_size, (1, 200))
    torch.testing.assert_close(logits(ours, tokens), logits(hf, tokens), rtol=0, atol=1e-4)
    unscaled = load_checkpoint(tmp_path / "meta", rope_scaling=None).eval()
    assert (logits(unscaled, tokens) - logits(hf, tokens)).abs().max() > 1e-3  # without it, they part
    with pytest.raises(ValueError, match="beyond max_seq_len=256"):
        ours(torch.zeros(1, 257, dtype=torch.long))
    convert.export_hf(tmp_path / "meta", tmp_path / "hf2")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again, tokens), logits(hf, tokens), rtol=0, atol=1e-4)


def test_meta_llama3_params_say_use_scaled_rope(tmp_path):
    """Meta's Llama-3.1 params.json marks its scaling "use_scaled_rope": true (factor 8, original context 8192):
    read as such, and written back the same way, so Meta's own code reads our exports."""
    from checkpoint import LLAMA3_SCALING
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16,
                                  rope_scaling=dict(LLAMA3_SCALING)))
    save_checkpoint(model, tmp_path / "meta")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and "rope_scaling" not in params
    assert load_checkpoint(tmp_path / "meta").args.rope_scaling == LLAMA3_SCALING


def test_the_real_stories260k_goes_out_tied(tmp_path):
    """A llama2.c .bin with a tied output layer: HF's tie_word_embeddings, no lm_head stored; transformers' logits
    are the real model's."""
    from conftest import shared_file
    transformers = pytest.importorskip("transformers", reason="the check is transformers' own Llama")
    bin_path, tok = shared_file("assets/stories260K/stories260K.bin"), shared_file("assets/stories260K/tok512.model")
    config = convert.export_hf(bin_path, tmp_path / "hf", tokenizer=tok)
    assert config["tie_word_embeddings"] and config["max_position_embeddings"] == 512
    assert "lm_head.weight" not in safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 64))
    torch.testing.assert_close(logits(hf, tokens), logits(load_checkpoint(bin_path).eval(), tokens), rtol=0, atol=1e-4)
