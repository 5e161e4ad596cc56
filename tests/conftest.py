"""Shared test helpers: the project root on sys.path, the ../shared reference files, a tiny random model."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MAGNET_SHARED", ROOT.parent / "shared"))


def shared_file(relative):
    """Path of a file in ../shared, or skip the test with the reason when it is absent (a user's clone has none)."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not found: reference files live in ../shared (or set MAGNET_SHARED)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory):
    """The built-in toy world, small: (corpus path, pairs path, Tokenizer), written once per test session."""
    import toy
    return toy.write_world(tmp_path_factory.mktemp("toy"), n_stories=600, n_pairs=200, seed=0)


@pytest.fixture(scope="session")
def toy_corpus(toy_files, tmp_path_factory):
    import data
    return data.TextCorpus(toy_files[0], toy_files[2], cache_dir=tmp_path_factory.mktemp("cache"))
