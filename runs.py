"""Run directories and result files: nothing a user has is lost, and every result says where it came from.

A run directory belongs to one training at a time (a lock file beside it), is never written into or replaced unless
asked (--overwrite moves the old one aside until the new run has finished), and holds checkpoints that a crash at
any moment leaves loadable: distributed checkpoints (DCP) of the trainable state and the optimizer, swapped in by
renames. Result files are written to a temporary name and renamed, and carry their provenance (commit, machine).
"""
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from checkpoint import read_json_object
from config import ConfigError


class TrainingError(RuntimeError):
    """A run that cannot go on (a spiking loss, a failed checkpoint write); the message says how to continue."""


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


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def exclusive_run_dir(out, overwrite, resume, rank=0, world=1):
    """The run directory `out`, for this run alone: a lock refuses a second process on the same out_dir; an existing
    run, or a non-empty directory that is not a run, is refused without --overwrite; with it the old directory is moved
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
        if out.exists() and not overwrite and (not out.is_dir() or (not ours and any(out.iterdir()))):
            raise ConfigError(f"{out} exists and is not a train.py run; pass --overwrite=true to replace it (it is "
                              "kept until the new run has finished), or another --out_dir")
        if (out / "log.jsonl").exists() and not (resume or overwrite):
            raise ConfigError(f"{out} already holds a run; pass --resume=true to continue it, --overwrite=true to "
                              "start over, or another --out_dir")
        if overwrite and not resume and out.exists():
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


def check_resume(out, settings):
    """A resume continues the same run: only schedule and system keys may differ from the saved config.json."""
    if not (out / "config.json").exists():
        return  # a run stopped before it wrote one: nothing to compare
    saved = read_json_object(out / "config.json", "the run's settings")
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
               if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume: {out / 'config.json'} defines the run differently ({', '.join(changed)}); only "
                          f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change. Start a new run in another --out_dir")


def start_log(out, settings, start):
    """Write the run's config.json and open its log.jsonl, keeping the lines of steps < start (a resume runs the later
    ones again; a damaged line is an error). Returns the open log file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if start else []
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}, line {n}: damaged log line {line[:60]!r}; delete it (and any after it) "
                              "to resume") from None
    log = open(path, "w")
    log.write("".join(line + "\n" for line in lines if json.loads(line)["step"] < start))
    return log


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


# ----------------------------------------------------------------------------------------------------------------
# Result files (eval.py, bench.py)

def check_result_path(path, overwrite):
    """Refuse an --out that would fail or replace a file, before hours of work rather than after."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out={path} is a directory; expected the path of a JSON file")
    if not path.parent.is_dir():
        raise ConfigError(f"--out={path}: directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out={path} already exists; pass --overwrite=true to replace it, or another --out")


def write_result(path, report):
    """The report as JSON, written to a temporary name and renamed: never a half-written file under `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def fingerprint(files):
    """What a result was computed on: the files' total size and a hash of their contents."""
    return {"bytes": sum(f.stat().st_size for f in files),
            "sha256": hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]}


def provenance():
    """The code and machine a result comes from: the commit (with "+changes" when a tracked .py, .sh or config file
    differs from it), torch, and the CPU / GPU."""
    git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True).stdout \
        if shutil.which("git") else ""  # no git on the machine: "unknown" (a copied tree without .git: the same)
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.sh", "config").strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return dict(commit=commit + ("+changes" if dirty else ""), torch=torch.__version__, cpu=cpu,
                cpu_cores=os.cpu_count(), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
