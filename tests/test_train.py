"""train.py: config parsing, FSDP2 under torchrun (gloo, 1 and 2 CPU processes) against one process, exact resume,
a crash during a checkpoint save, exports, and clear errors that overwrite nothing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import runs
import toy
import train
from magnet import Magnet
from checkpoint import load_checkpoint, save_checkpoint
from config import ConfigError, parse, validate_train_config
from model import ModelArgs, Transformer, apply_lora, merge_lora

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random base (with the toy tokenizer beside it) and a small toy corpus + paraphrase pairs."""
    d = tmp_path_factory.mktemp("train")
    corpus, pairs, tok = toy.write_world(d / "toy", n_stories=300, n_pairs=100)
    torch.manual_seed(0)
    base = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                                 multiple_of=16, max_seq_len=128))
    save_checkpoint(base, d / "base")
    shutil.copyfile(tok.path, d / "base" / "tokenizer.model")
    return d, [f"--init_from={d / 'base'}", f"--data={corpus}", f"--pairs={pairs}", f"--cache_dir={d / 'cache'}",
               "--batch_size=4", "--seq_len=48", "--sscl_len=16", "--warmup_iters=2", "--lr=1e-2", "--demo=false",
               "--device=cpu"]  # also on a machine with a GPU


def losses(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def run_main(argv):
    assert train.main(argv) == 0


def fresh_env(**extra):
    """This environment without the RANK variables of a torchrun that may be running these tests, plus extra."""
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}, **extra}


def torchrun(n, argv, timeout=300):
    """train.py under torchrun with n gloo processes."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           str(ROOT / "train.py")] + argv, cwd=ROOT, env=fresh_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text('"""doc"""\nlr = 1e-4  # a comment\nlora = False\nmax_iters = 7\n')
    cfg = parse([str(cfg_file), "--max_iters=9", "--instruction=Retrieve: x"], train.Config())[0]
    assert (cfg.lr, cfg.lora, cfg.max_iters, cfg.instruction) == (1e-4, False, 9, "Retrieve: x")
    with pytest.raises(ConfigError, match="unknown key 'max_iter'; valid keys: .*out_dir.*max_iters"):
        parse(["--max_iter=3"], train.Config())[0]
    with pytest.raises(ConfigError, match="lr expects float"):
        parse(["--lr=fast"], train.Config())[0]
    cfg_file.write_text("import os\n")
    with pytest.raises(ConfigError, match=r"c\.py, line 1: expected `key = literal`"):
        parse([str(cfg_file)], train.Config())[0]
    for path in sorted((ROOT / "config").glob("*.py")):
        parse([str(path)], train.Config())  # every shipped config parses, and says where SSCL's positives come from
        assert "SSCL positives:" in path.read_text(), path.name


def test_torchrun_one_and_two_processes_match_one_process(setup):
    """Same global batch, every dropout on (LoRA's, and SimCSE's attention noise: no --pairs), drawn for the whole
    batch whatever the number of processes (noise.py): FSDP2 under torchrun, with one rank (the multi-GPU path on one
    GPU) and with two, reproduces the plain process's losses and adapter to 1e-5 relative (only the order of
    floating-point sums differs, e.g. the gradient reduce-scatter). At a gentle lr: at 1e-2 this tiny run is chaotic
    (Adam turns float-noise differences of near-zero gradients into full-size steps)."""
    d, common = setup
    args = common + ["--max_iters=4", "--pairs=", "--lr=1e-3"]
    run_main(args + [f"--out_dir={d / 'one'}"])
    one = losses(d / "one")
    assert len(one) == 4 and one[-1]["total"] < one[0]["total"]
    tokens = torch.randint(0, 256, (2, 20))
    for n in (1, 2):
        out, cache = d / f"torchrun{n}", d / f"cache{n}"
        proc = torchrun(n, args + [f"--out_dir={out}", f"--cache_dir={cache}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"FSDP2 (world size {n}) on cpu, fp32" in proc.stderr
        sharded = losses(out)
        assert len(sharded) == 4
        for a, b in zip(one, sharded):
            for k in ("mntp", "msg", "sscl", "total", "grad_norm"):  # grad_norm: a wrong gradient scale shows here
                assert b[k] == pytest.approx(a[k], rel=1e-5), (n, a["step"], k)
        adapters = [torch.load(run / "adapter.pt", weights_only=True)["state_dict"] for run in (d / "one", out)]
        for k, v in adapters[0].items():
            torch.testing.assert_close(adapters[1][k], v, rtol=1e-5, atol=1e-6, msg=f"{n} processes: {k}")
        assert len(list(cache.glob("*.npy"))) == 2  # rank 0 tokenized into the fresh cache (rank 1 read it)
        # the exports gathered from the shards equal those of the plain process
        m1, m2 = load_checkpoint(d / "one" / "merged"), load_checkpoint(out / "merged")
        assert torch.allclose(m1(tokens), m2(tokens), atol=1e-4), n


def test_bf16_mixed_precision_on_a_cpu(setup):
    """--precision=bf16 runs the GPU's numerics on a CPU: a bf16 base under fp32 adapters, with bf16 autocast in one
    process and FSDP2's bf16 MixedPrecisionPolicy under torchrun. Both follow the fp32 run to bf16 accuracy (LoRA
    dropout off: its masks are drawn per rank) without equalling it (bf16 is really on), and the merged fp32 export
    is the bf16-rounded base plus the fp32 adapter, merged in fp32."""
    d, common = setup
    args = common + ["--max_iters=3", "--lora_dropout=0.0", "--lr=1e-3"]
    run_main(args + ["--precision=fp32", f"--out_dir={d / 'fp32'}"])
    run_main(args + ["--precision=bf16", f"--out_dir={d / 'bf16'}"])
    proc = torchrun(2, args + ["--precision=bf16", f"--out_dir={d / 'bf16_fsdp'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ("mntp", "msg", "sscl", "grad_norm")
    fp32 = [[r[k] for k in keys] for r in losses(d / "fp32")]
    for run in ("bf16", "bf16_fsdp"):
        got = [[r[k] for k in keys] for r in losses(d / run)]
        assert got == [pytest.approx(row, rel=2e-2) for row in fp32], run
        assert got != fp32, run
    ref = load_checkpoint(d / "base").to(torch.bfloat16).float()  # the base as the bf16 runs held it
    adapter = torch.load(d / "bf16" / "adapter.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    apply_lora(ref, rank=16, alpha=32.0, dropout=0.0)
    ref.load_state_dict(adapter, strict=False)
    merge_lora(ref)
    for k, v in load_checkpoint(d / "bf16" / "merged").state_dict().items():
        assert torch.allclose(v, ref.state_dict()[k], rtol=0, atol=1e-6), k


def test_fsdp2_before_torch_2_8_refuses_a_bf16_base_under_fp32_adapters(monkeypatch):
    """FSDP2 before torch 2.8 rejects a block whose parameters have two dtypes, at the first forward, deep inside
    FSDP: under torchrun train.py says so before anything runs, with the two ways out."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    bf16 = parse(["--precision=bf16"], train.Config())[0]
    with pytest.raises(ConfigError, match=r"torch 2\.7\.1\+cu126 needs one dtype per block.*--precision=fp32"):
        validate_train_config(bf16, 1)
    validate_train_config(parse(["--precision=fp32"], train.Config())[0], 1)  # one dtype throughout
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    validate_train_config(bf16, 1)


def test_resume_replays_the_uninterrupted_run(setup):
    d, common = setup
    run_main(common + ["--max_iters=8", f"--out_dir={d / 'straight'}"])
    run_main(common + ["--max_iters=8", "--stop_at=4", f"--out_dir={d / 'stopped'}"])
    assert not (d / "stopped" / "merged").exists() and len(losses(d / "stopped")) == 4
    run_main(common + ["--max_iters=8", "--stop_at=4", "--resume=true", f"--out_dir={d / 'stopped'}"])
    assert (d / "stopped" / "merged" / "params.json").exists()  # the resumed run went on to the end and exported
    straight, resumed = losses(d / "straight"), losses(d / "stopped")
    assert [r["step"] for r in resumed] == list(range(8))
    for a, b in zip(straight, resumed):
        assert b["total"] == pytest.approx(a["total"], rel=1e-6, abs=1e-7)


def test_a_run_resumes_on_more_processes(setup):
    """A run stopped in one plain process continues under torchrun on two FSDP2 ranks (the distributed checkpoint
    is resharded on load) and follows the uninterrupted run, every dropout on (no --pairs: SimCSE's noise too)."""
    d, common = setup
    args = common + ["--max_iters=6", "--pairs=", "--lr=1e-3"]
    run_main(args + [f"--out_dir={d / 'whole'}"])
    run_main(args + ["--stop_at=3", f"--out_dir={d / 'moved'}"])
    first_half = (d / "moved" / "log.jsonl").read_text()
    proc = torchrun(2, args + ["--resume=true", f"--out_dir={d / 'moved'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, moved = losses(d / "whole"), losses(d / "moved")
    assert [r["step"] for r in moved] == list(range(6))
    assert (d / "moved" / "log.jsonl").read_text().startswith(first_half)  # steps 0-2 kept (timings too), not rerun
    for a, b in zip(whole, moved):
        for k in ("total", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    adapters = [torch.load(d / run / "adapter.pt", weights_only=True)["state_dict"] for run in ("whole", "moved")]
    for k, v in adapters[0].items():
        torch.testing.assert_close(adapters[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_accumulation_equals_the_larger_batch(setup):
    """MNTP + MSG are token means over the whole step: 2 micro-batches of 2 rows = 1 batch of 4 rows. (SSCL is not
    compared: its in-batch negatives are per micro-batch by design.)"""
    d, common = setup
    args = common + ["--max_iters=3", "--lora_dropout=0.0", "--w_sscl=0.0"]
    run_main(args + ["--batch_size=4", f"--out_dir={d / 'big'}"])
    run_main(args + ["--batch_size=2", "--grad_accum=2", f"--out_dir={d / 'accum'}"])
    for a, b in zip(losses(d / "big"), losses(d / "accum")):
        for k in ("mntp", "msg", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)


def test_two_phase_run_from_scratch_with_stop_and_resume(tmp_path):
    """init_from=scratch + LoRA: phase 1 trains a causal base (never stopped early), phase 2 adapts it; stop_at
    stops phase 2 only, and stop_at == max_iters still exports."""
    small = ["--dim=32", "--n_layers=1", "--n_heads=2", "--batch_size=2", "--seq_len=32", "--sscl_len=12",
             "--pretrain_iters=2", "--max_iters=3", f"--out_dir={tmp_path / 'run'}", f"--cache_dir={tmp_path}",
             "--demo=false"]
    run_main(small + ["--stop_at=1"])
    assert (tmp_path / "run" / "base" / "merged" / "params.json").exists()
    assert len(losses(tmp_path / "run" / "base")) == 2 and len(losses(tmp_path / "run")) == 1
    run_main(small + ["--stop_at=3", "--resume=true"])
    assert (tmp_path / "run" / "adapter.pt").exists() and len(losses(tmp_path / "run")) == 3


def test_exports_reload_and_equal_the_adapted_model(setup):
    d, common = setup
    run_main(common + ["--max_iters=5", "--instruction=Query: ", "--pooling=mean", f"--out_dir={d / 'exp'}"])
    tok = d / "base" / "tokenizer.model"
    adapted = Magnet.load(d / "base", tok, adapter=d / "exp" / "adapter.pt")
    merged = Magnet.load(d / "exp" / "merged", d / "exp" / "merged" / "tokenizer.model")
    # both remember how the model was trained to encode, and eval.py uses it
    evaluated = ev.load(f"m={d / 'base'}::{d / 'exp' / 'adapter.pt'}", ev.EvalConfig(tokenizer=str(tok)))[1]
    for m in (adapted, merged, evaluated):
        assert (m.instruction, m.pooling) == ("Query: ", "mean")
    assert Magnet.load(d / "base", tok).instruction == ""
    adapted, merged = adapted.model, merged.model
    base = load_checkpoint(d / "base")
    tokens = torch.randint(0, 256, (2, 20))
    assert torch.allclose(merged(tokens), adapted(tokens), atol=1e-5)
    assert not torch.allclose(merged(tokens), base(tokens), atol=1e-4)  # training did change the model


def test_a_crash_during_save_keeps_the_previous_checkpoint(setup, monkeypatch):
    d, common = setup
    out = d / "crash"
    run_main(common + ["--max_iters=6", "--stop_at=3", f"--out_dir={out}"])
    cfg = parse(common + [f"--out_dir={out}"], train.Config())[0]
    tok, _, _ = train.setup_data(cfg, out, write=True)
    model = train.build_model(cfg, tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert runs.load_state(out, model, opt) == 3

    def dies_halfway(state, checkpoint_id):
        Path(checkpoint_id).mkdir(parents=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("torch.distributed.checkpoint.save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        runs.save_state(out, model, opt, 99, rank=0)
    monkeypatch.undo()
    assert runs.load_state(out, model, opt) == 3
    # killed between the two renames: only ckpt.old is complete, and resume finds it
    (out / "ckpt").rename(out / "ckpt.old")
    assert runs.load_state(out, model, opt) == 3
    run_main(common + ["--max_iters=6", "--resume=true", f"--out_dir={out}"])
    assert [r["step"] for r in losses(out)] == list(range(6))


@pytest.mark.parametrize("bad, message", [
    (["--data=/nowhere/corpus.txt"], "corpus file not found"),
    (["--data={empty}"], "has no text"),
    (["--seq_len=5000"], "beyond the model's max_seq_len=4096"),
    (["--tokenizer={other_tok}"], "vocabulary has 256 tokens but the tokenizer's has 512"),
    (["--bogus=1"], "unknown key 'bogus'"),
    (["--init_from=/nowhere/base"], "no such checkpoint"),
    (["--span_min=0"], "need 1 <= span_min <= span_max"),
    (["--pairs=", "--sscl_dropout=0"], "no --pairs, no noise): set --sscl_dropout=0.3"),
    (["--sscl_dropout=1.0"], "sscl_dropout must be in [0, 1)"),
    (["--merged_dtype=float16"], "merged_dtype must be one of ['float32', 'bfloat16']"),
    (["--precision=fp16"], "precision must be 'auto', 'bf16' or 'fp32' (got 'fp16')"),
    (["--device=foo"], "device=foo: expected auto, cpu or cuda"),
    (["--lr=inf"], "lr must be a finite number (got inf)"),
    (["--seed=-1"], "seed must be >= 0 (got -1)"),
])
def test_bad_input_exits_nonzero_with_a_clear_error(setup, capsys, bad, message):
    d, common = setup
    (d / "empty.txt").write_text("\n\n")
    other_tok = toy.train_tokenizer(toy.stories(300, 0), d / "tok512.model", 512).path
    out = d / "bad-run"
    bad = [b.format(empty=d / "empty.txt", other_tok=other_tok) for b in bad]
    assert train.main(common + bad + [f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (out / "log.jsonl").exists() and not (out / "merged").exists()


def test_a_loss_spike_stops_the_run_before_the_update(setup, capsys, monkeypatch):
    d, common = setup
    real = train.magnet_losses
    calls = []

    def spiking(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 25:  # step 24: every loss x 1000
            out = {k: v * 1000 for k, v in out.items()}
        return out

    monkeypatch.setattr(train, "magnet_losses", spiking)
    out = d / "spike"
    assert train.main(common + ["--max_iters=30", "--ckpt_interval=10", f"--out_dir={out}"]) == 1
    assert "spiking loss at step 24" in capsys.readouterr().err
    assert len(losses(out)) == 24 and not (out / "merged").exists()
    cfg = parse(common + [f"--out_dir={out}"], train.Config())[0]
    tok, _, _ = train.setup_data(cfg, out, write=True)
    model = train.build_model(cfg, tok)
    assert runs.load_state(out, model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])) == 20


def test_an_existing_run_is_never_overwritten(setup, capsys):
    d, common = setup
    out = d / "kept"
    run_main(common + ["--max_iters=2", f"--out_dir={out}"])
    before = (out / "log.jsonl").read_text()
    assert train.main(common + ["--max_iters=2", f"--out_dir={out}"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "log.jsonl").read_text() == before
    # asked to start over, an invalid new run still leaves the old one alone; a valid one replaces it entirely
    assert train.main(common + ["--max_iters=3", "--overwrite=true", "--data=/nowhere.txt", f"--out_dir={out}"]) == 1
    assert (out / "log.jsonl").read_text() == before
    run_main(common + ["--max_iters=3", "--stop_at=1", "--overwrite=true", f"--out_dir={out}"])
    assert len(losses(out)) == 1 and not (out / "merged").exists() and not (out / "adapter.pt").exists()
    # a directory (or file) that is not a run of train.py, e.g. a Hugging Face model's, is not written into either
    foreign = d / "hf-model"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    (d / "a-file").write_text("mine")
    for target in (foreign, d / "a-file"):
        assert train.main(common + ["--max_iters=2", f"--out_dir={target}"]) == 1
        assert "is not a train.py run; pass --overwrite=true" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["config.json"] and (d / "a-file").read_text() == "mine"
    run_main(common + ["--max_iters=1", "--overwrite=true", f"--out_dir={d / 'a-file'}"])  # asked: replaced, not kept
    assert (d / "a-file" / "log.jsonl").exists() and not (d / "a-file.replaced").exists()
    # names a run writes (toy/, config.json) do not make a directory a run: only the marker a run writes first does
    mine = d / "mine"
    (mine / "toy").mkdir(parents=True)
    (mine / "toy" / "stories.txt").write_text("my stories")
    (mine / "config.json").write_text("mine")
    mine_before = snapshot(mine)
    assert train.main(common + ["--max_iters=1", f"--out_dir={mine}"]) == 1
    assert "is not a train.py run; pass --overwrite=true" in capsys.readouterr().err
    assert snapshot(mine) == mine_before and sorted(p.name for p in mine.iterdir()) == ["config.json", "toy"]
    # a run killed before its log (only its marker and toy/ written) is one: rerunning it is not refused
    (d / "toy-started" / "toy").mkdir(parents=True)
    (d / "toy-started" / runs.RUN_MARKER).write_text("")
    run_main(common + ["--max_iters=1", f"--out_dir={d / 'toy-started'}"])


def snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad, message", [
    ("--lr=-1", "lr must be > 0 (got -1.0)"), ("--ckpt_interval=0", "ckpt_interval must be > 0"),
    ("--grad_accum=0", "grad_accum must be > 0"), ("--batch_size=0", "batch_size must be > 0"),
    ("--temperature=0", "temperature must be > 0"), ("--lora_alpha=-2", "lora_alpha must be > 0"),
    ("--sscl_len=0", "sscl_len must be > 0"), ("--seq_len=0", "seq_len must be > 0"),
    ("--max_iters=0", "max_iters must be > 0"), ("--warmup_iters=-1", "warmup_iters must be >= 0"),
    ("--lora_dropout=1.5", "lora_dropout must be in [0, 1)"), ("--lr=nan", "lr must be > 0 (got nan)"),
])
def test_overwrite_with_a_bad_value_loses_nothing(setup, capsys, bad, message):
    d, common = setup
    out = d / "precious"
    if not out.exists():
        run_main(common + ["--max_iters=2", f"--out_dir={out}"])
    before, _ = snapshot(out), capsys.readouterr()
    assert train.main(common + ["--max_iters=2", "--overwrite=true", bad, f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert snapshot(out) == before


def test_a_run_that_fails_midway_puts_the_replaced_run_back(setup, capsys, monkeypatch):
    d, common = setup
    out = d / "replaced"
    run_main(common + ["--max_iters=2", f"--out_dir={out}"])
    before = snapshot(out)
    real = train.train_step

    def fails_at_step_1(*args):
        if args[5] == 1:
            raise train.TrainingError("non-finite or spiking loss at step 1 (...); stopped before the update")
        return real(*args)

    monkeypatch.setattr(train, "train_step", fails_at_step_1)
    assert train.main(common + ["--max_iters=4", "--overwrite=true", f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "No checkpoint was written yet" in err and f"the run this one was replacing is back in {out}" in err
    assert snapshot(out) == before and not (d / "replaced.replaced").exists()
    monkeypatch.setattr(train, "train_step", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert train.main(common + ["--max_iters=4", "--overwrite=true", f"--out_dir={out}"]) == 130  # Ctrl-C too
    assert "interrupted: --resume=true continues" in capsys.readouterr().err
    assert snapshot(out) == before
    # killed outright during an overwrite: the old run waits in OUT.replaced, and the next run says so
    out.rename(d / "replaced.replaced")
    assert train.main(common + ["--max_iters=2", "--overwrite=true", f"--out_dir={out}"]) == 1
    assert "replaced.replaced holds the run that an interrupted --overwrite was replacing" in capsys.readouterr().err


def test_a_run_that_failed_before_its_first_checkpoint_resumes_from_step_0(setup, capsys, monkeypatch):
    d, common = setup
    out = d / "early-failure"
    real = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: (_ for _ in ()).throw(train.TrainingError("spike"))
                        if a[5] == 1 else real(*a))
    assert train.main(common + ["--max_iters=3", f"--out_dir={out}"]) == 1
    assert "--resume=true starts again from step 0" in capsys.readouterr().err and len(losses(out)) == 1
    monkeypatch.undo()
    run_main(common + ["--max_iters=3", "--resume=true", f"--out_dir={out}"])
    assert "has no checkpoint yet; starting from step 0" in capsys.readouterr().err
    assert [r["step"] for r in losses(out)] == [0, 1, 2] and (out / "adapter.pt").exists()
    # but a finished run whose checkpoints are gone (deleted, say) is not silently started over: all of it stays
    run_main(common + ["--max_iters=2", f"--out_dir={d / 'deleted'}"])
    shutil.rmtree(d / "deleted" / "ckpt")
    before = snapshot(d / "deleted")
    assert train.main(common + ["--max_iters=4", "--resume=true", f"--out_dir={d / 'deleted'}"]) == 1
    assert "has no loadable checkpoint, yet it is not a run stopped before its first one" in capsys.readouterr().err
    assert snapshot(d / "deleted") == before


def test_damaged_checkpoints_fall_back_to_the_older_one_or_say_so(setup, capsys, monkeypatch):
    d, common = setup
    out = d / "damaged"
    run_main(common + ["--max_iters=4", "--stop_at=2", f"--out_dir={out}"])
    shutil.copytree(out / "ckpt", out / "ckpt.old")  # as left by a kill between save_state's two renames
    cfg = parse(common + [f"--out_dir={out}"], train.Config())[0]
    tok, _, _ = train.setup_data(cfg, out, write=True)
    model = train.build_model(cfg, tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    shard = next((out / "ckpt").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    assert runs.load_state(out, model, opt) == 2
    assert "ckpt: EOFError; continuing from" in capsys.readouterr().err
    assert not (out / "ckpt").exists()  # the damaged one is dropped: the next save cannot turn it into ckpt.old
    shard = next((out / "ckpt.old").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert train.main(common + ["--max_iters=4", "--resume=true", f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "error: --resume: no checkpoint of this run can be loaded" in err and "Traceback" not in err
    # Ctrl-C during a load (DCP wraps it like any failure) is an interruption, not a damaged checkpoint
    shutil.rmtree(out / "ckpt.old")
    run_main(common + ["--max_iters=4", "--stop_at=2", "--overwrite=true", f"--out_dir={out}"])
    before = snapshot(out)
    monkeypatch.setattr("torch.distributed.checkpoint.filesystem.FileSystemReader.read_data",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert train.main(common + ["--max_iters=4", "--resume=true", f"--out_dir={out}"]) == 130
    assert "interrupted" in capsys.readouterr().err and snapshot(out) == before
    monkeypatch.undo()
    # a failed write (e.g. a full disk) names the checkpoint and what is still intact
    monkeypatch.setattr("torch.distributed.checkpoint.save", lambda *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(train.TrainingError, match=r"ckpt.tmp: writing the checkpoint of step 3 failed \(OSError"):
        runs.save_state(out, model, opt, 3, rank=0)


def test_one_process_per_run_directory_and_damaged_logs(setup, capsys):
    import fcntl
    d, common = setup
    out = d / "locked"
    run_main(common + ["--max_iters=4", "--stop_at=2", f"--out_dir={out}"])
    (d / "alias").symlink_to(out)
    with open(out / runs.LOCK_FILE, "a") as other:  # as if a second process were training in it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for name in (out, d / "alias"):  # by any path: the lock is the directory's own
            assert train.main(common + ["--max_iters=4", "--resume=true", f"--out_dir={name}"]) == 1
            assert f"{name.name}: another process is running in it" in capsys.readouterr().err
    assert not list(d.glob("*.lock"))  # a refused run leaves nothing behind
    with open(out / "log.jsonl", "a") as log:
        log.write("3086}\n")
    assert train.main(common + ["--max_iters=4", "--resume=true", f"--out_dir={out}"]) == 1
    assert "log.jsonl, line 3: damaged log line '3086}'" in capsys.readouterr().err


def test_resume_refuses_keys_that_define_the_run(setup, capsys):
    d, common = setup
    out = d / "defined"
    run_main(common + ["--max_iters=4", "--stop_at=2", f"--out_dir={out}"])
    assert train.main(common + ["--max_iters=4", "--resume=true", "--seed=7", "--lora_rank=4",
                                f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "defines the run differently (lora_rank 16 -> 4, seed 0 -> 7)" in err and "Traceback" not in err
    run_main(common + ["--max_iters=5", "--resume=true", "--lr=5e-3", f"--out_dir={out}"])  # schedule keys may change
    assert len(losses(out)) == 5
    (out / "config.json").write_text("{damaged")
    assert train.main(common + ["--max_iters=6", "--resume=true", f"--out_dir={out}"]) == 1
    assert "config.json: not valid JSON" in capsys.readouterr().err


def test_bad_files_name_themselves(setup, tmp_path, capsys):
    d, common = setup
    (tmp_path / "syntax.py").write_text('"""doc"""\nlr = (1e-3\n')
    with pytest.raises(ConfigError, match=r"syntax\.py, line 2: "):
        parse([str(tmp_path / "syntax.py")], train.Config())[0]
    (tmp_path / "latin1.py").write_bytes("instruction = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.py: not UTF-8 text"):
        parse([str(tmp_path / "latin1.py")], train.Config())[0]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "hi.txt").write_text("hi\n")
    for corpus, message in ((tmp_path / "latin1.txt", "latin1.txt: not UTF-8 text"),
                            (tmp_path / "hi.txt", "only 1 distinct SSCL passages for batches of 4 rows")):
        assert train.main(common + ["--pairs=", f"--data={corpus}", f"--out_dir={tmp_path / 'o'}"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_torchrun_reports_a_configuration_error_once(setup):
    d, common = setup
    proc = torchrun(2, common + ["--lr=-1", f"--out_dir={d / 'tr'}"], timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("lr must be > 0") == 1, proc.stderr[-2000:]


def test_simcse_noise_only_when_sscl_has_no_pairs(setup, monkeypatch):
    d, common = setup
    seen = []
    real = train.magnet_losses
    monkeypatch.setattr(train, "magnet_losses", lambda *a, **k: seen.append(k["sscl_dropout"]) or real(*a, **k))
    run_main(common + ["--max_iters=1", f"--out_dir={d / 'paired'}"])
    run_main(common + ["--max_iters=1", "--pairs=", f"--out_dir={d / 'unpaired'}"])
    assert seen == [0.0, 0.3]


def test_the_prepared_gpu_check_runs(tmp_path):
    """gpu_check.sh (docs/performance.md, "GPU") at tiny shapes on the CPU: every step runs and writes its results,
    so a session with a GPU does not spend its few minutes on a broken script. Its step 2 compares with Hugging Face +
    PEFT: without them installed, it is left out (SKIP_HF=1) and every other step still runs."""
    import importlib.util
    has_hf = all(importlib.util.find_spec(p) is not None for p in ("transformers", "peft"))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "gpu_check.sh"), str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=fresh_env(DEVICE="cpu", QUICK="1", RUN_DIR=str(tmp_path / "run"),
                                        SKIP_HF="0" if has_hf else "1",  # and the script runs this Python:
                                        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = json.loads((out / "bench_7b.json").read_text())["results"]["magnet"][0]
    assert step["tokens_per_s"] > 0 and step["mfu_percent"] > 0
    assert (out / "bench_vs_hf.json").exists() == has_hf
    assert "every check passed" in proc.stdout
    fsdp, resumed, plain = ((out / f"train_{run}.md").read_text() for run in ("7b", "resume", "plain"))
    assert all(f"step {i}:" in fsdp for i in range(5)) and "step 5:" not in fsdp  # stopped at stop_at=5
    assert all(f"step {i}:" in resumed for i in range(4))
    assert "FSDP2 (world size 1)" in (out / "train_resumed.log").read_text()
    assert (tmp_path / "run" / "resume" / "merged" / "params.json").exists()  # the resumed run exported
    assert all(f"step {i}:" in plain for i in range(3)) and "step 3:" not in plain


def test_a_run_replaces_only_what_it_wrote(setup, monkeypatch):
    """--overwrite moves aside (and, once the new run has finished, deletes) only the entries a run writes: a model
    converted into the run directory, or any other file of the user's, stays byte for byte."""
    d, common = setup
    out = d / "shared-dir"
    run_main(common + ["--max_iters=1", f"--out_dir={out}"])
    (out / "smollm2").mkdir()
    (out / "smollm2" / "params.json").write_text('{"dim": 576}')
    (out / "notes.txt").write_text("mine")
    run_main(common + ["--max_iters=2", "--overwrite=true", f"--out_dir={out}"])
    assert len(losses(out)) == 2 and not (d / "shared-dir.replaced").exists()
    assert (out / "smollm2" / "params.json").read_text() == '{"dim": 576}' and (out / "notes.txt").read_text() == "mine"
    before = snapshot(out)  # and a replacement that fails puts the old run back beside them, byte for byte
    monkeypatch.setattr(train, "train_step", lambda *a: (_ for _ in ()).throw(train.TrainingError("spike")))
    assert train.main(common + ["--max_iters=3", "--overwrite=true", f"--out_dir={out}"]) == 1  # fails at step 0
    assert snapshot(out) == before and not (d / "shared-dir.replaced").exists()


def test_the_kept_log_is_on_disk_before_the_first_resumed_step(tmp_path):
    """A resume rewrites log.jsonl without the steps it will run again: the kept lines are on disk (renamed into
    place) before it returns, so a kill -9 right after loses none; a last line cut short by a kill is dropped."""
    out = tmp_path / "run"
    out.mkdir()
    lines = [json.dumps({"step": i, "total": 1.0}) for i in range(5)]
    (out / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "tot')  # killed while logging step 5
    log = runs.start_log(out, {"seed": 0}, 3)
    try:
        assert (out / "log.jsonl").read_text() == "\n".join(lines[:3]) + "\n"  # before any write or flush of `log`
        assert json.loads((out / "config.json").read_text()) == {"seed": 0}
        assert not list(out.glob("*.tmp"))
    finally:
        log.close()
    (out / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "tot\n')  # a whole damaged line: refused
    with pytest.raises(ConfigError, match="line 6: damaged log line"):
        runs.start_log(out, {"seed": 0}, 3)


def test_resume_refuses_a_corpus_that_changed(setup, capsys):
    d, common = setup
    corpus = d / "corpus-copy.txt"
    shutil.copyfile(next(a for a in common if a.startswith("--data=")).partition("=")[2], corpus)
    args = [a for a in common if not a.startswith("--data=")] + [f"--data={corpus}", "--max_iters=3"]
    out = d / "changing"
    run_main(args + ["--stop_at=1", f"--out_dir={out}"])
    corpus.write_text(corpus.read_text().replace("kite", "boat"))  # same path, other text
    assert train.main(args + ["--resume=true", f"--out_dir={out}"]) == 1
    assert f"--resume: {corpus} changed since the run started" in capsys.readouterr().err
    assert len(losses(out)) == 1


def test_the_demo_runs_after_the_run_is_safe(tmp_path, capsys, monkeypatch):
    """The toy world, LoRA on a random base (no phase 1): the demo reads the merged export; and should the demo fail,
    the finished run stays where it is. The merged export records the rows its model was made for (max_seq_len),
    which Meta's params.json cannot: loaded, it refuses to generate past them."""
    args = ["--pretrain_iters=0", "--dim=32", "--n_layers=1", "--n_heads=2", "--multiple_of=16", "--max_iters=2",
            "--batch_size=4", "--seq_len=32", "--sscl_len=16", "--max_seq_len=64", "--device=cpu",
            f"--cache_dir={tmp_path / 'cache'}"]
    run_main(args + [f"--out_dir={tmp_path / 'ok'}"])
    assert "cosine similarity to" in capsys.readouterr().out
    merged = Magnet.load(tmp_path / "ok" / "merged", tmp_path / "ok" / "merged" / "tokenizer.model")
    assert merged.model.args.max_seq_len == 64
    with pytest.raises(ValueError, match="max_seq_len is 64"):
        merged.generate("Mia found a", 100)
    monkeypatch.setattr(train.toy, "demo", lambda *a: (_ for _ in ()).throw(ValueError("demo failed")))
    assert train.main(args + ["--max_iters=3", "--overwrite=true", f"--out_dir={tmp_path / 'ok'}"]) == 1
    assert "demo failed" in capsys.readouterr().err  # replacing a run: the new, finished one stays, the old is gone
    assert (tmp_path / "ok" / "merged" / "params.json").exists() and len(losses(tmp_path / "ok")) == 3
    assert not list(tmp_path.glob("*replaced*"))


def test_phase_1_is_validated_as_well(tmp_path, capsys):
    """From scratch, phase 1 trains the causal base with MSG alone: --w_msg=0 leaves it nothing to train."""
    assert train.main(["--w_msg=0", "--device=cpu", f"--out_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert "nothing to train" in err and "Traceback" not in err
