"""Shared fixtures. Tests never download: real data come from SEQVAE_DATA or ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    for candidate in (os.environ.get("SEQVAE_DATA"), REPO.parent / "shared" / "data", REPO / "data"):
        if candidate and (Path(candidate) / "binarized_mnist").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder with the real data sets; a failure under CI if it is missing."""
    found = _data_dir()
    if found is None:
        message = "no data folder: set SEQVAE_DATA to a folder holding binarized_mnist/, mnist/, polyphonic/"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session", autouse=True)
def _gemm_cache(tmp_path_factory):
    """Kernel choices (seqvae/gemm.py) go to a folder of this session, not the user's ~/.cache;
    subprocesses (the CLI tests) inherit it, so that every process of the session agrees."""
    os.environ["SEQVAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("seqvae-cache"))
    yield


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a URL fails, as it would offline."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
