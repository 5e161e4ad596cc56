"""bench.py's FLOP formulas, the numerators of every MFU in the README, against torch's own count of the matmuls a
step really runs (torch.utils.flop_counter.FlopCounterMode, forward and backward); and that --out overwrites
nothing unasked."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
from model import ModelArgs, Transformer, apply_lora
from objectives import magnet_losses

B, T, V = 2, 128, 500


def counted(step):
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def small_model(kv_heads):
    """attn_backend="math": attention as plain matmuls, which the counter sees (it does not know the CPU's fused
    kernel); both backends do the same multiplications."""
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=kv_heads, vocab_size=V, multiple_of=32,
                                 max_seq_len=T, attn_backend="math"))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_full_training_flops(kv_heads):
    """flops_per_token (6 N + 12 n_layers dim seq) counts every matmul of a full training step, plus 6 FLOPs per
    RMSNorm gain, which is in N but multiplies nothing."""
    model = small_model(kv_heads)
    tokens, targets = torch.randint(0, V, (2, B, T))
    got = counted(lambda: F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward())
    gains = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert got == B * T * (bench.flops_per_token(model, T) - 6 * gains)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lora_step_flops(kv_heads):
    """lora_flops_per_token, on MAGNET's view-A LoRA step (logits only at the target positions), counts every matmul
    autograd runs plus one that it skips: the input gradient of the first block's q/k/v projections (their input
    comes from the frozen embedding, so nothing needs it). That is about 1% of the issue's step (dim 512, 8 layers) and
    0.4% at Llama-2-7B's shape: the README's MFU figures are high by that much, this project's and HF's alike."""
    model = apply_lora(small_model(kv_heads), rank=8, alpha=16, dropout=0.05).train()
    batch = bench.view_a_batch(B, T, V, torch.Generator().manual_seed(0))
    got = counted(lambda: magnet_losses(model, batch, dict(mntp=1.0, msg=1.0, sscl=0.0))["total"].backward())
    targets = int(((batch["mntp_labels"] != data.IGNORE) | (batch["msg_labels"] != data.IGNORE)).sum())
    first = model.layers[0].attention
    skipped = 2 * sum(p.weight.numel() + p.lora_A.numel() for p in (first.wq, first.wk, first.wv))
    assert got == B * T * (bench.lora_flops_per_token(model, T, targets / (B * T)) - skipped)


def test_out_is_checked_before_the_runs_and_never_replaced_unasked(tmp_path):
    bench_py = Path(__file__).resolve().parents[1] / "bench.py"
    mine = tmp_path / "mine.json"
    mine.write_text("my results")
    for out, message in ((mine, "already exists; pass --overwrite=true"),
                         (tmp_path / "nowhere" / "x.json", "nowhere does not exist")):
        run = subprocess.run([sys.executable, str(bench_py), "--bench=load", "--quick=true", f"--out={out}"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert mine.read_text() == "my results"
