"""kdguard.augment: every transform draws only from the generators it is given, so a generator
state saved between batches (a checkpoint) reproduces the rest of the stream exactly."""

from __future__ import annotations

import random

import pytest
import torch

from kdguard.augment import (Augment, SimCLRAugment, bcs_jitter, color_jitter, cutmix, jitter_flip,
                             random_resized_crop, single_image_patches)

X_U8 = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
X = X_U8.float() / 255
IMAGE = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))

TRANSFORMS = {
    "standard": lambda g, h: Augment(4, hflip=True)(X_U8, g),
    "simclr": lambda g, h: SimCLRAugment(size=(10, 10))(X_U8, g),
    "color_jitter": lambda g, h: color_jitter(X, generator=g),
    "local_view": lambda g, h: random_resized_crop(X, generator=g),
    "jitter_flip": lambda g, h: jitter_flip(X, max_shift=(2, 2), flip=True, host_rng=h),
    "cutmix": lambda g, h: cutmix(X, beta=0.25, prob=1.0, generator=g, host_rng=h),
    "bcs_jitter": lambda g, h: bcs_jitter(X, prob=0.5, generator=g),
    "patches": lambda g, h: single_image_patches(IMAGE, 6, (8, 8), generator=g, chunk=4),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_a_saved_generator_state_resumes_the_stream_bit_exactly(name):
    fn = TRANSFORMS[name]
    global_state = torch.get_rng_state()
    g, h = torch.Generator().manual_seed(7), random.Random(7)
    first = fn(g, h)
    saved = (g.get_state(), h.getstate())
    rest = [fn(g, h) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never read
    g2, h2 = torch.Generator(), random.Random()
    g2.set_state(saved[0])
    h2.setstate(saved[1])
    assert all(torch.equal(a, fn(g2, h2)) for a in rest)
    again = fn(torch.Generator().manual_seed(7), random.Random(7))
    assert torch.equal(first, again)


def test_every_transform_needs_its_generator():
    with pytest.raises(TypeError):
        Augment(4)(X_U8)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        color_jitter(X)  # type: ignore[call-arg]
