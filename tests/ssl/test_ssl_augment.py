"""Batched SimCLR augmentation: shapes, ranges, reproducibility and each operation's semantics."""

from __future__ import annotations

import pytest
import torch

from kdguard.errors import KDGuardError
from kdguard.augment import (SimCLRAugment, color_jitter, crop_boxes, grayscale, hsv_to_rgb, random_grayscale,
                             resized_crop, rgb_to_hsv)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_views_have_the_right_shape_range_and_are_reproducible():
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    aug = SimCLRAugment(size=(8, 8))
    a, b = aug(x, _gen(3)), aug(x, _gen(3))
    assert a.shape == (16, 3, 8, 8) and a.dtype == torch.float32
    assert 0.0 <= a.min().item() and a.max().item() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(x, _gen(4)))
    gray = SimCLRAugment()(torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8), _gen())
    assert gray.shape == (4, 1, 12, 12)


def test_identity_settings_return_the_input():
    x = torch.rand(5, 3, 9, 9)
    ident = SimCLRAugment(crop=False, hflip=False, jitter_p=0.0, gray_p=0.0)
    assert torch.equal(ident(x, _gen()), x)


def test_flip_only_mirrors_some_images_exactly():
    x = torch.rand(32, 3, 6, 6)
    y = SimCLRAugment(crop=False, hflip=True, jitter_p=0.0, gray_p=0.0)(x, _gen(1))
    flipped = [torch.allclose(y[i], x[i].flip(2), atol=1e-6) for i in range(32)]
    kept = [torch.allclose(y[i], x[i], atol=1e-6) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 32


def test_crop_boxes_follow_the_scale_and_ratio_bounds():
    boxes = crop_boxes(500, 32, 32, scale=(0.2, 0.5), generator=_gen())
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.15 and area.max() <= 0.56          # rounding to whole pixels
    assert (w / h).min() >= 0.6 and (w / h).max() <= 1.6
    with pytest.raises(KDGuardError):
        crop_boxes(2, 8, 8, scale=(0.5, 0.2), generator=_gen())


def test_resized_crop_of_a_box_equals_upsampling_that_region():
    x = torch.arange(16.0).view(1, 1, 4, 4) / 16
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])                  # top-left 2×2 block
    out = resized_crop(x, box, (2, 2))
    assert torch.allclose(out, x[:, :, :2, :2], atol=1e-6)


def test_hsv_round_trip_and_known_colours():
    x = torch.rand(6, 3, 5, 5)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(rgb_to_hsv(red).flatten(), torch.tensor([0.0, 1.0, 1.0]))
    blue = torch.tensor([0.0, 0.0, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(rgb_to_hsv(blue).flatten(), torch.tensor([2 / 3, 1.0, 0.5]), atol=1e-6)


def test_grayscale_and_jitter_semantics():
    x = torch.rand(8, 3, 4, 4)
    g = random_grayscale(x, p=1.0, generator=_gen())
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 0:1], grayscale(x))
    assert torch.equal(random_grayscale(x, p=0.0, generator=_gen()), x)
    # brightness only, factor in [0.5, 1.5]: every pixel is scaled by one factor per image (then clipped)
    y = color_jitter(x * 0.5, brightness=0.5, contrast=0, saturation=0, hue=0, p=1.0, generator=_gen())
    factor = (y.sum(dim=(1, 2, 3)) / (x * 0.5).sum(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    assert torch.allclose(y, x * 0.5 * factor, atol=1e-5)
    assert ((factor >= 0.5) & (factor <= 1.5)).all() and factor.std() > 0
    with pytest.raises(KDGuardError):
        color_jitter(x, hue=0.7, generator=_gen())
    with pytest.raises(KDGuardError):
        SimCLRAugment()(torch.rand(3, 8, 8), _gen())
