"""Building blocks of the data-free methods: generators, BN hooks, losses, transforms, pools."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdguard.augment import cutmix, fit_images, jitter_flip, random_resized_crop, single_image_patches
from kdguard.datafree import BNStatistics, build_generator, reinitialize
from kdguard.datafree.grid import image_grid
from kdguard.datafree.losses import (information_entropy_loss, info_nce, js_divergence, kl_per_sample,
                                     l1_per_sample, negative_masked_kl, total_variation)
from kdguard.datafree.pool import ImagePool, MemoryBank
from kdguard.errors import KDGuardError


# -- generators -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 10, 14)])
def test_generators_make_images_of_the_dataset_shape(shape):
    torch.manual_seed(0)
    g = build_generator("dcgan", shape, latent_dim=16, width=4)
    with torch.no_grad():
        x = g(torch.randn(5, 16))
    assert x.shape == (5, *shape)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0  # sigmoid output


def test_zskt_generator_reference_layout_and_affine_output():
    g = build_generator("zskt", (3, 32, 32), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    assert g.latent_dim == 100 and g.fc.out_features == 128 * 8 * 8  # Linear(100, 128·8·8)
    assert isinstance(g.head, nn.BatchNorm2d) and g.head.affine and g.conv1.bias is not None
    assert g.output == "affine"
    seen = {}
    g.head.register_forward_hook(lambda m, i, o: seen.setdefault("bn", o))
    with torch.no_grad():
        x = g(torch.randn(8, 100))
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    # a model normalising (x − μ)/σ sees exactly the generator's BN output, as in the reference
    assert torch.allclose((x - mean) / std, seen["bn"], atol=1e-5)
    assert float(x.max()) > 1.0 or float(x.min()) < 0.0  # unbounded, as documented
    with torch.no_grad():
        clamped = build_generator("zskt", (3, 32, 32), output="affine_clamp")(torch.randn(8, 100))
    assert 0.0 <= float(clamped.min()) and float(clamped.max()) <= 1.0


def test_generator_rejects_bad_input():
    with pytest.raises(KDGuardError, match="generator kind"):
        build_generator("vae", (3, 32, 32))
    with pytest.raises(KDGuardError, match="output"):
        build_generator("dcgan", (3, 32, 32), output="tanh")
    g = build_generator("dcgan", (3, 8, 8), latent_dim=4, width=2)
    with pytest.raises(KDGuardError, match="N×4"):
        g(torch.randn(2, 5))


def test_reinitialize_follows_cmi_distributions():
    g = build_generator("dcgan", (3, 32, 32), width=32)
    rng = torch.Generator().manual_seed(0)
    reinitialize(g, rng)
    w = g.conv1.weight.detach()
    assert abs(float(w.mean())) < 2e-3 and abs(float(w.std()) - 0.02) < 2e-3
    assert abs(float(g.bn1.weight.detach().mean()) - 1.0) < 0.01 and float(g.conv3.bias.detach().abs().max()) == 0.0


# -- BN statistics hook -----------------------------------------------------------------------
def test_bn_hook_matches_hand_computation():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
    model = nn.Sequential(nn.Identity(), bn)
    stats = BNStatistics(model, instance_means=True)
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    with stats.recording():
        model(x)
    # by hand: per channel mean over (N, H, W) and the biased variance
    flat = x.permute(1, 0, 2, 3).reshape(3, -1)
    mu = flat.sum(1) / flat.shape[1]
    var = ((flat - mu[:, None]) ** 2).sum(1) / flat.shape[1]
    expected = math.sqrt(float(((mu - bn.running_mean) ** 2).sum())) + \
        math.sqrt(float(((var - bn.running_var) ** 2).sum()))
    assert float(stats.loss()) == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(stats.instance_features(), x.mean(dim=(2, 3)))
    assert stats.feature_dim == 3


def test_bn_hook_records_only_when_asked_and_needs_bn():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()
    stats = BNStatistics(model)
    model(torch.randn(2, 3, 4, 4))
    with pytest.raises(KDGuardError, match="recording"):
        stats.loss()
    stats.remove()
    with pytest.raises(KDGuardError, match="BatchNorm"):
        BNStatistics(nn.Sequential(nn.Conv2d(3, 2, 1)))


# -- losses ----------------------------------------------------------------------------------------
def test_kl_and_l1_per_sample_reductions_match_torch():
    torch.manual_seed(0)
    t, s = torch.randn(6, 5), torch.randn(6, 5)
    ref_mean = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="sum") / t.numel()
    ref_batchmean = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    assert torch.allclose(kl_per_sample(t, s, temperature=2, reduction="mean").mean(), ref_mean)
    assert torch.allclose(kl_per_sample(t, s, temperature=2, reduction="batchmean").mean(), ref_batchmean)
    assert torch.allclose(l1_per_sample(t, s).mean(), F.l1_loss(s, t))
    with pytest.raises(KDGuardError, match="reduction"):
        kl_per_sample(t, s, reduction="sum")


def test_js_divergence_is_symmetric_bounded_and_zero_on_equal():
    torch.manual_seed(0)
    p, q = torch.randn(4, 3) * 5, torch.randn(4, 3) * 5
    assert float(js_divergence(p, q)) == pytest.approx(float(js_divergence(q, p)), rel=1e-5)
    assert 0 < float(js_divergence(p, q)) <= math.log(2) + 1e-6
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-6)


def test_masked_kl_counts_only_agreeing_samples():
    t = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # first agrees (class 0), second does not
    kl0 = float(kl_per_sample(t[:1], s[:1]).sum())
    assert float(negative_masked_kl(t, s)) == pytest.approx(-kl0 / 2)


def test_information_entropy_and_tv_and_info_nce_values():
    uniform = torch.zeros(5, 4)
    assert float(information_entropy_loss(uniform)) == pytest.approx(-math.log(4))
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    # four neighbour differences with one non-zero entry each → sum of norms 1+1+0+1 (diag)
    assert float(total_variation(x, "l2")) == pytest.approx(3.0)
    a = F.normalize(torch.eye(3), dim=1)
    loss = info_nce(a, a, temperature=0.5)
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    split = info_nce(a, a, temperature=0.5, n_current=1)
    assert float(split) == pytest.approx(2 * expected, rel=1e-5)


# -- transforms ----------------------------------------------------------------------------------
def test_random_resized_crop_is_differentiable_and_full_crop_is_identity():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = random_resized_crop(x, scale=(0.25, 1.0), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    same = random_resized_crop(x.detach(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
                               generator=torch.Generator())
    assert torch.allclose(same, x.detach(), atol=1e-5)


def test_jitter_flip_and_cutmix_keep_pixels():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = jitter_flip(x, max_shift=(1, 1), flip=True, host_rng=random.Random(3))
    assert sorted(out.flatten().tolist()) == sorted(x.flatten().tolist())
    mixed = cutmix(x, beta=0.25, prob=1.0, generator=torch.Generator().manual_seed(0), host_rng=random.Random(1))
    assert mixed.shape == x.shape and set(mixed.flatten().tolist()) <= set(x.flatten().tolist())
    assert torch.equal(cutmix(x, beta=0.25, prob=0.0, generator=torch.Generator(), host_rng=random.Random(0)), x)
    with pytest.raises(KDGuardError):
        cutmix(x, beta=0.0, prob=1.0, generator=torch.Generator(), host_rng=random.Random(0))


def test_single_image_patches_shape_range_and_determinism():
    image = (torch.rand(3, 70, 50) * 255).to(torch.uint8)
    a = single_image_patches(image, 9, (8, 8), generator=torch.Generator().manual_seed(0), chunk=4)
    b = single_image_patches(image, 9, (8, 8), generator=torch.Generator().manual_seed(0), chunk=4)
    assert a.shape == (9, 3, 8, 8) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert a.float().std() > 0
    with pytest.raises(KDGuardError):
        single_image_patches(image.float(), 2, (8, 8), generator=torch.Generator())


def test_fit_images_converts_size_and_channels():
    rgb = torch.full((2, 3, 16, 16), 200, dtype=torch.uint8)
    gray = fit_images(rgb, (1, 8, 8))
    assert gray.shape == (2, 1, 8, 8) and int(gray[0, 0, 0, 0]) == 200
    assert fit_images(gray, (3, 8, 8)).shape == (2, 3, 8, 8)


# -- pools and grids -------------------------------------------------------------------------------
def test_image_pool_cycles_through_a_permutation_and_round_trips():
    pool = ImagePool((1, 2, 2))
    pool.add(torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 2, 2) / 4)
    rng = torch.Generator().manual_seed(0)
    first = pool.sample(5, rng)[:, 0, 0, 0].tolist()
    assert sorted(first) == sorted(pool.images[:, 0, 0, 0].tolist())  # one full permutation
    state = pool.state_dict()
    nxt = pool.sample(3, rng)
    other = ImagePool((1, 2, 2))
    other.load_state_dict(state)
    rng2 = torch.Generator().manual_seed(0)
    pool.sample(5, rng2)  # advance rng2 as rng was before the snapshot
    assert torch.equal(other.sample(3, rng2), nxt)
    with pytest.raises(KDGuardError, match="shape"):
        pool.add(torch.zeros(1, 3, 2, 2))


def test_memory_bank_wraps_and_samples_filled_rows():
    bank = MemoryBank(4, 2)
    rng = torch.Generator().manual_seed(0)
    assert bank.get(3, rng).shape == (0, 2)
    bank.add(torch.ones(3, 2))
    assert bank.get(10, rng).shape == (3, 2)
    bank.add(torch.full((3, 2), 2.0))
    assert bank.filled == 4 and bank.ptr == 2
    assert sorted(bank.data[:, 0].tolist()) == [1.0, 2.0, 2.0, 2.0]


def test_image_grid_tiles_with_padding():
    grid = image_grid(torch.zeros(5, 3, 4, 4), nrow=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == torch.uint8
    assert int(grid[0, 0, 0]) == 255 and int(grid[1, 1, 0]) == 0
