"""Run directories and result files: nothing a user has is lost, and every result says where it came from.

A run directory belongs to one training at a time (its directory is locked), is never written into or replaced
unless asked (--overwrite moves what the old run wrote aside until the new run has finished), and holds checkpoints
that a crash at any moment leaves loadable: distributed checkpoints (DCP) of the trainable state and the optimizer,
swapped in by renames. Result files are written to a temporary name and renamed, and carry their provenance
(commit, machine).
"""
import contextlib
import errno
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

from checkpoint import read_json_object, write_atomic
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


RUN_MARKER = ".magnet_run"  # written first into a run directory: it tells a run from a directory of the user's
LOCK_FILE = ".magnet_lock"  # in the run directory, flock'ed while a process trains there (opened for writing: NFS)
RUN_ENTRIES = (RUN_MARKER, "config.json", "config.json.tmp", "log.jsonl", "log.jsonl.tmp", "ckpt", "ckpt.tmp",
               "ckpt.old", "adapter.pt", "adapter.pt.tmp", "merged", "toy", "base")  # all a run writes in its
# directory, and so all that --overwrite may replace


def remove(path):
    """Delete a file, a symlink or a directory tree."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def is_run(out):
    return (out / RUN_MARKER).exists() or ((out / "log.jsonl").is_file() and (out / "config.json").is_file())


@contextlib.contextmanager
def exclusive_run_dir(out, overwrite, resume, rank=0, world=1):
    """The run directory `out`, for this run alone: a lock file in it (LOCK_FILE) is held while the run lives, so a
    second process is refused whatever path it names the directory by. An existing run, or a non-empty directory that
    is not a run, is refused without --overwrite; with it, the entries a run writes (RUN_ENTRIES, nothing else) are
    moved aside to OUT.replaced until the new run has finished or stopped at stop_at, and put back if it fails."""
    held = {}  # rank 0's: the lock, OUT.replaced (beside the real directory) and the moves made into it

    def refuse_foreign():
        if out.is_dir() and not is_run(out) and not overwrite and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise ConfigError(f"{out} exists and is not a train.py run; pass --overwrite=true to replace it (it is "
                              "kept until the new run has finished), or another --out_dir")

    def move(src, dst):  # recorded first: an interruption between the two leaves nothing unaccounted for
        held.setdefault("moved", []).append((src, dst))
        src.rename(dst)

    def restore():
        for entry in RUN_ENTRIES:  # what the failed run wrote
            if (out / entry).exists() or (out / entry).is_symlink():
                remove(out / entry)
        for src, dst in reversed(held.pop("moved", [])):
            if src == out and out.is_dir():  # a file the user had at out_dir: the run's directory goes
                shutil.rmtree(out)
            if dst.exists() or dst.is_symlink():
                dst.rename(src)
        if held["aside"].is_dir() and not any(held["aside"].iterdir()):
            held["aside"].rmdir()

    def acquire():
        refuse_foreign()  # before anything is written into a directory of the user's
        if out.exists() and not out.is_dir():
            if not overwrite:
                raise ConfigError(f"{out} exists and is not a train.py run; pass --overwrite=true to replace it (it "
                                  "is kept until the new run has finished), or another --out_dir")
            held["aside"] = out.with_name(out.name + ".replaced")
            if held["aside"].exists():
                raise ConfigError(f"{held['aside']} holds what an interrupted --overwrite was replacing: move it "
                                  f"back to {out} or delete it")
            move(out, held["aside"])
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        real = out.resolve()
        held.setdefault("aside", real.with_name(real.name + ".replaced"))
        held["lock"] = open(real / LOCK_FILE, "a")  # released when this process ends, however it ends
        try:
            try:
                fcntl.flock(held["lock"], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{out}: another process is running in it") from None
            check_and_move_aside()
        except BaseException:
            held.pop("lock").close()
            if created:
                (real / LOCK_FILE).unlink()
                real.rmdir()
            restore() if held.get("moved") else None
            raise
        (out / RUN_MARKER).write_text("a train.py run directory: --overwrite=true may replace what it wrote\n")

    def check_and_move_aside():
        aside = held["aside"]
        if aside.exists() and not held.get("moved"):
            raise ConfigError(f"{aside} holds the run that an interrupted --overwrite was replacing: move it back "
                              f"to {out} or delete it")
        trash = aside.with_name(f".{aside.name}.deleting")
        if trash.exists():  # what a finished --overwrite was deleting when it was stopped
            print(f"removing {trash}, left by an interrupted clean-up", file=sys.stderr)
            shutil.rmtree(trash)
        refuse_foreign()
        if is_run(out) and (out / "log.jsonl").exists() and not (resume or overwrite):
            raise ConfigError(f"{out} already holds a run; pass --resume=true to continue it, --overwrite=true to "
                              "start over, or another --out_dir")
        theirs = [out / e for e in RUN_ENTRIES if (out / e).exists() or (out / e).is_symlink()]
        if overwrite and not resume and theirs:
            aside.mkdir()
            for entry in theirs:
                move(entry, aside / entry.name)

    try:
        rank0_first(lambda: acquire() if rank == 0 else None, rank, world)
        yield
    except BaseException:
        if held.get("moved"):
            restore()
            print(f"the run this one was replacing is back in {out}", file=sys.stderr)
        raise
    else:
        if held.get("moved"):  # the new run is in place: delete the old one, renamed first so that a stop midway
            trash = held["aside"].with_name(f".{held['aside'].name}.deleting")  # leaves no half of it behind
            held["aside"].rename(trash)
            remove(trash)
    finally:
        if "lock" in held:
            held.pop("lock").close()


MAY_CHANGE_ON_RESUME = {"out_dir", "resume", "overwrite", "stop_at", "max_iters", "lr", "min_lr", "warmup_iters",
                        "grad_clip", "spike_factor", "ckpt_interval", "device", "activation_checkpointing",
                        "cache_dir", "demo", "merged_dtype", "precision"}


def check_resume(out, settings):
    """A resume continues the same run: only schedule and system keys may differ from the saved config.json, and the
    data files (settings["data_files"]) must be the ones the run started with."""
    if not (out / "config.json").exists():
        return  # a run stopped before it wrote one: nothing to compare
    saved = read_json_object(out / "config.json", "the run's settings")
    for path, now in settings["data_files"].items():
        before = saved.get("data_files", {}).get(path, now)  # (a run from before data_files were recorded: trusted)
        if before != now:
            raise ConfigError(f"--resume: {path} changed since the run started ({before} -> {now}); a resume reads "
                              "the same data. Restore the file, or start a new run in another --out_dir")
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
               if k not in MAY_CHANGE_ON_RESUME and k != "data_files" and saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume: {out / 'config.json'} defines the run differently ({', '.join(changed)}); only "
                          f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change. Start a new run in another --out_dir")


def file_identity(path):
    """What a data file is: its size and the hash of all of it (read in pieces; the corpus is read whole anyway, to
    tokenize or to find its token cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return f"{path.stat().st_size} bytes, sha256 {digest.hexdigest()[:16]}"


def start_log(out, settings, start):
    """Write the run's config.json and open its log.jsonl, keeping the lines of steps < start (a resume runs the later
    ones again): rewritten to disk before the first new step, so a kill at any moment loses no kept line. A damaged
    line is an error, except a last line cut short by a kill mid-write (no newline at its end), which is dropped."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(settings, indent=2) + "\n")
    path, text = out / "log.jsonl", (out / "log.jsonl").read_text() if start else ""
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # the partial line of a step that was being logged when the run was killed
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}, line {n}: damaged log line {line[:60]!r}; delete it (and any after it) "
                              "to resume") from None
    write_atomic(path, "".join(line + "\n" for line in lines if json.loads(line)["step"] < start))
    return open(path, "a")


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


def write_result(path, report, overwrite=False):
    """The report as JSON, written to a temporary name and then put in place: never a half-written file under `path`,
    and, without `overwrite`, never over a file, not even one that appeared while the report was being made."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # this process's own: writers never share one
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    if overwrite:
        tmp.replace(path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists, at the moment it is put in place
    except FileExistsError:
        raise ConfigError(f"--out={path} appeared while this ran; the new results are in {tmp} (pass "
                          "--overwrite=true to replace a file)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise ConfigError(f"--out={path} appeared while this ran; the new results are in {tmp}") from None
        tmp.replace(path)
        return
    tmp.unlink()


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
