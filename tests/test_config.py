"""The one command line of train.py, eval.py (and its --help): every key documented, the same rules everywhere."""
import subprocess
import sys
from dataclasses import fields

import pytest

import eval as ev
import train
from config import ConfigError, parse

from conftest import ROOT


@pytest.mark.parametrize("script, cls", [("train.py", train.Config), ("eval.py", ev.EvalConfig)])
def test_help_prints_what_the_script_does_and_every_key_with_its_default_and_meaning(script, cls):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == sys.modules[cls.__module__].__doc__.strip().splitlines()[0]  # the script's own docstring
    for f in fields(cls):
        row = next((line for line in lines if line.startswith(f"  --{f.name}=")), None)
        assert row is not None, f.name
        shown = f.default if isinstance(f.default, str) else repr(f.default)
        default, _, meaning = row.partition(f"--{f.name}={shown}")[2].partition("  ")
        assert not default and meaning.strip(), f"--{f.name}: no default and meaning in {row!r}"
    if script == "eval.py":
        assert "  --ckpt=...  (may be repeated)" in lines


def test_repeated_keys_are_collected_and_others_are_typed(tmp_path):
    cfg, extra = parse(["--ckpt=a=x", "--limit=3", "--ckpt=b=y", "--keep_going=true"], ev.EvalConfig(),
                       repeated=("ckpt",))
    assert extra == {"ckpt": ["a=x", "b=y"]} and (cfg.limit, cfg.keep_going) == (3, True)
    with pytest.raises(ConfigError, match="unknown key 'limt'; valid keys: ckpt, suite"):
        parse(["--limt=3"], ev.EvalConfig(), repeated=("ckpt",))
    with pytest.raises(ConfigError, match="--limit: expected --key=value"):
        parse(["--limit"], ev.EvalConfig())
    with pytest.raises(ConfigError, match="nowhere.py: config file not found"):
        parse([str(tmp_path / "nowhere.py")], train.Config())
