"""Batched random crop / flip: shapes, determinism and agreement with a per-sample reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdguard.augment import Augment, random_crop, random_hflip
from kdguard.data import ImageDataset
from kdguard.errors import KDGuardError


def batch(dtype=torch.uint8, n=16, c=3, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g)
    return x.to(dtype) if dtype == torch.uint8 else x.to(dtype) / 255


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_is_a_window_of_the_padded_input(dtype):
    x, p = batch(dtype), 3
    out = random_crop(x, p, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == dtype
    padded = F.pad(x.float(), (p, p, p, p)).to(dtype)
    offsets_seen = set()
    for i in range(len(x)):  # reference: the sample must equal exactly one window
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]])]
        assert matches, f"sample {i} is not a window of its padded input"
        offsets_seen.add(matches[0])
    assert len(offsets_seen) > 3  # offsets really vary per sample


def test_crop_offsets_match_generator_draws():
    x, p = batch(n=5), 2
    out = random_crop(x, p, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 2 * p + 1, (5,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (5,), generator=g)
    padded = F.pad(x, (p, p, p, p))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 6])


def test_crop_padding_zero_is_identity_and_deterministic():
    x = batch()
    assert torch.equal(random_crop(x, 0, torch.Generator()), x)
    a = random_crop(x, 4, torch.Generator().manual_seed(3))
    b = random_crop(x, 4, torch.Generator().manual_seed(3))
    c = random_crop(x, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hflip():
    x = batch(n=64)
    out = random_hflip(x, 0.5, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    g = torch.Generator()
    assert torch.equal(random_hflip(random_hflip(x, 1.0, g), 1.0, g), x)
    assert torch.equal(random_hflip(x, 1.0, g), x.flip(3))
    assert torch.equal(random_hflip(x, 0.0, g), x)
    assert torch.equal(random_hflip(x, 0.5, torch.Generator().manual_seed(0)), out)


def test_augment_object_and_errors():
    x = batch()
    aug = Augment(crop_padding=2, hflip=True)
    seeded = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(aug(x, seeded()), aug(x, seeded()))
    ds = ImageDataset(images=x, labels=torch.zeros(16, dtype=torch.long), classes=("a",),
                      hflip=False)
    no_flip = Augment.for_dataset(ds, crop_padding=0)
    assert not no_flip.hflip and torch.equal(no_flip(x, seeded()), x)
    with pytest.raises(KDGuardError, match="N×C×H×W"):
        random_crop(x[0], 4, seeded())
    with pytest.raises(KDGuardError, match="padding -1"):
        random_crop(x, -1, seeded())
    with pytest.raises(KDGuardError, match="flip probability 1.5"):
        random_hflip(x, 1.5, seeded())
    with pytest.raises(KDGuardError, match="padding"):
        Augment(crop_padding=2.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_given_a_cpu_generator():
    x = batch()
    aug = Augment(4, hflip=True)
    cpu = aug(x, torch.Generator().manual_seed(9))
    gpu = aug(x.cuda(), torch.Generator().manual_seed(9))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    cuda_gen = torch.Generator(device="cuda").manual_seed(9)
    assert aug(x.cuda(), cuda_gen).shape == x.shape
