"""Tiny data and settings for the SSL-track tests: 3×16×16 blobs, ResNet-8 with a small head."""

from __future__ import annotations

import pytest
import torch

from helpers import make_blobs
from kdguard.config import OptimConfig, TrainConfig
from kdguard.data import DATASETS
from kdguard.ssl.config import AugmentConfig, DefenseConfig, ProbeConfig
from kdguard.ssl.encoder import build_ssl_model

#: A registered synthetic dataset (train 48 / test 32 images, 4 classes) for CLI and job tests.
BLOBS_NAME = "ssl_test_blobs"


def _load_blobs(*, split: str, root, cache, name: str):
    seed, n = (0, 48) if split == "train" else (1, 32)
    return make_blobs(n=n, num_classes=4, channels=3, size=16, seed=seed, name=name)


if BLOBS_NAME not in DATASETS:
    DATASETS.add(BLOBS_NAME, _load_blobs, needs_root=False, description="SSL test blobs 3×16×16")


def adam(epochs: int = 1, batch_size: int = 16) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, progress=False, device="cpu", amp="off",
                       channels_last="off",
                       optim=OptimConfig(name="adam", lr=1e-3, weight_decay=1e-6, schedule="constant"))


@pytest.fixture
def train_cfg():
    """``train_cfg(epochs=1, batch_size=16)``: a tiny fp32 Adam schedule on CPU."""
    return adam


@pytest.fixture
def blobs3():
    return make_blobs(n=32, num_classes=4, channels=3, size=16, name=BLOBS_NAME)


@pytest.fixture
def tiny_model(blobs3):
    return build_ssl_model("resnet8", blobs3.shape, mean=blobs3.mean, std=blobs3.std, proj_hidden=16,
                           proj_dim=8, seed=0)


@pytest.fixture
def tiny_defense() -> DefenseConfig:
    return DefenseConfig(train=adam(), finetune=adam(), warmup=adam(), augment=AugmentConfig())


@pytest.fixture
def tiny_probe() -> ProbeConfig:
    return ProbeConfig(hidden=[16], epochs=2, batch_size=16, lr=1e-3, device="cpu")


@pytest.fixture
def state_equal():
    """``state_equal(a, b)``: two state dicts hold the same keys and identical tensors."""
    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return same
