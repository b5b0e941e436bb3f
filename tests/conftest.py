"""Shared fixtures: tiny synthetic datasets and models that train in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TinyNet, make_blobs

# Tests run two workers on two cores (pytest -n 2): one thread each, also inside jobs that call
# kdguard.runtime.configure_threads.
os.environ["KDGUARD_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture
def blobs():
    return make_blobs()


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Never touch the user's cache or data directories from tests.
    monkeypatch.setenv("KDGUARD_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("KDGUARD_DATA_ROOT", str(tmp_path_factory.getbasetemp() / "no-data-root"))
