"""Tests for kdguard.attacks.triggers: contract (dtype/shape/device/range/purity), geometry,
formulas, determinism, parameter round trip and errors. Tiny synthetic tensors only."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdguard.attacks.triggers import TRIGGERS, Trigger, build_trigger
from kdguard.errors import KDGuardError

SHAPE = (3, 32, 32)
BUILT_IN = ("badnets_grid", "badnets_square", "blend", "trojan_3x3", "trojan_8x8", "trojan_wm", "sig",
            "wanet", "l0_inv", "l2_inv", "color_filter", "low_frequency")
ALL = sorted(BUILT_IN)  # fixed, so parametrisation never depends on which packages were imported
RANDOM = ["blend", "trojan_3x3", "trojan_8x8", "trojan_wm", "l0_inv", "l2_inv", "wanet", "low_frequency"]
DETERMINISTIC = ["badnets_grid", "badnets_square", "sig", "color_filter"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _images(n: int = 4, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)


def _changed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``H×W`` bool: pixels changed in any image or channel."""
    return (x.int() != y.int()).any(0).any(0)


def _box(h: int, w: int, rows: range, cols: range) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[rows.start:rows.stop, cols.start:cols.stop] = True
    return m


def test_registry_lists_all_requested_triggers():
    # Other packages may register more triggers (RobustKD's optimised blend); the built-ins must all be there.
    assert set(BUILT_IN) <= set(TRIGGERS.names())
    assert TRIGGERS.resolve("badnet_sq") == "badnets_square"  # ABD's spelling


# --- the contract every trigger keeps ------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL)
def test_contract_dtype_shape_device_range_purity(name, device):
    trigger = build_trigger(name, SHAPE, seed=3)
    x8 = _images().to(device)
    for x in (x8, x8.float() / 255, x8.double() / 255, x8.half() / 255):
        before = x.clone()
        y = trigger(x)
        assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
        assert torch.equal(x, before), "input modified in place"
        assert y.data_ptr() != x.data_ptr()
        if x.is_floating_point():
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert not torch.equal(y, x), f"{name} left the images unchanged"


@pytest.mark.parametrize("name", ALL)
def test_uint8_and_float_paths_agree_within_rounding(name):
    trigger = build_trigger(name, SHAPE, seed=1)
    x = _images()
    from_float = (trigger(x.float() / 255) * 255).round()
    assert (from_float - trigger(x).float()).abs().max() <= 1.0


@pytest.mark.parametrize("name", ALL)
def test_single_image_equals_batched(name):
    trigger = build_trigger(name, SHAPE, seed=2)
    x = _images()
    single = trigger(x[1])
    assert single.shape == SHAPE
    assert torch.equal(single, trigger(x)[1])


@pytest.mark.parametrize("name", ALL)
def test_empty_batch(name):
    y = build_trigger(name, SHAPE)(torch.zeros(0, *SHAPE, dtype=torch.uint8))
    assert y.shape == (0, *SHAPE)


@pytest.mark.parametrize("name", RANDOM)
def test_random_triggers_are_deterministic_in_seed(name):
    x = _images()
    a, b = build_trigger(name, SHAPE, seed=7), build_trigger(name, SHAPE, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    ya = a(x)
    torch.manual_seed(999)
    assert torch.equal(ya, b(x))
    assert not torch.equal(ya, build_trigger(name, SHAPE, seed=8)(x))


def test_trigger_construction_leaves_global_rng_alone():
    state = torch.get_rng_state()
    for name in ALL:
        build_trigger(name, SHAPE, seed=5)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_triggers_ignore_seed(name):
    x = _images()
    assert torch.equal(build_trigger(name, SHAPE, seed=0)(x), build_trigger(name, SHAPE, seed=9)(x))


@pytest.mark.parametrize("name", ALL)
def test_params_are_json_and_rebuild_the_same_trigger(name):
    trigger = build_trigger(name, SHAPE, seed=4)
    params = json.loads(json.dumps(trigger.params()))
    assert params["name"] == name and params["seed"] == 4 and params["image_shape"] == list(SHAPE)
    rebuilt = build_trigger(**params)
    x = _images()
    assert torch.equal(rebuilt(x), trigger(x))
    assert rebuilt.params() == trigger.params()


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_wrong_input_raises_kdguard_error(name):
    trigger = build_trigger(name, SHAPE)
    with pytest.raises(KDGuardError, match=r"\(3, 32, 32\)"):
        trigger(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(KDGuardError, match="shape"):
        trigger(torch.zeros(32, 32, dtype=torch.uint8))
    with pytest.raises(KDGuardError, match="dtype"):
        trigger(torch.zeros(1, *SHAPE, dtype=torch.int64))
    with pytest.raises(KDGuardError, match="not \\[0, 1\\]"):
        trigger(_images().float())  # 0-255 floats


def test_unknown_name_and_parameter():
    with pytest.raises(KDGuardError, match="badnets_grid"):
        build_trigger("badnets_gird", SHAPE)
    with pytest.raises(KDGuardError, match="valid parameters: size, position, variant"):
        build_trigger("badnets_grid", SHAPE, colour=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=40), "size 40×40 is larger than the 32×32 image"),
    (dict(position=(30, 30)), r"position \(30, 30\).*rows 30\.\.32"),
    (dict(position=(-40, 0)), r"position \(-40, 0\)"),
    (dict(size=0), "size 0 is outside"),
    (dict(size="big"), "not an int or a"),
    (dict(variant="stripes"), "variant 'stripes'"),
])
def test_badnets_grid_geometry_errors(kwargs, message):
    with pytest.raises(KDGuardError, match=message):
        build_trigger("badnets_grid", SHAPE, **kwargs)


@pytest.mark.parametrize("name, kwargs", [
    ("trojan_3x3", dict(position=(31, 0))), ("trojan_8x8", dict(size=33)),
    ("trojan_wm", dict(density=0.0)), ("l0_inv", dict(size=(1, 40))),
    ("blend", dict(alpha=1.5)), ("blend", dict(style="kitty")), ("sig", dict(mode="cosine")), ("wanet", dict(k=1)),
    ("l2_inv", dict(amplitude=300)), ("badnets_square", dict(color=(255, 0))),
])
def test_bad_parameters_raise_kdguard_error(name, kwargs):
    with pytest.raises(KDGuardError, match=name):
        build_trigger(name, SHAPE, **kwargs)


def test_bad_image_shape():
    with pytest.raises(KDGuardError, match="image_shape"):
        build_trigger("blend", (32, 32))
    with pytest.raises(KDGuardError, match="image_shape"):
        build_trigger("blend", (3, 0, 32))


# --- geometry and formulas -----------------------------------------------------------------

def test_badnets_grid_writes_exactly_the_corner_checkerboard():
    trigger = build_trigger("badnets_grid", SHAPE)
    x = torch.full((2, *SHAPE), 128, dtype=torch.uint8)  # grey: black and white cells both differ
    y = trigger(x)
    changed_per_channel = (y != x).any(0)  # C×H×W
    expected = _box(32, 32, range(29, 32), range(29, 32))
    for c in range(3):
        assert torch.equal(changed_per_channel[c], expected)
    grid = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(y[:, :, 29:32, 29:32], grid.expand(2, 3, 3, 3))
    assert torch.equal(trigger.mask[0], expected)


def test_badnets_grid_abd_variant_and_mnist_defaults():
    abd = build_trigger("badnets_grid", SHAPE, variant="abd")
    y = abd(torch.full((1, *SHAPE), 128, dtype=torch.uint8))
    expected = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(y[0, 0, 29:32, 29:32], expected)  # as in ABD's backdoor.py
    mnist = build_trigger("badnets_grid", (1, 28, 28))
    x = torch.full((1, 1, 28, 28), 128, dtype=torch.uint8)
    assert torch.equal(_changed(x, mnist(x)), _box(28, 28, range(25, 28), range(25, 28)))


def test_badnets_square_defaults_and_colour():
    x = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    y = build_trigger("badnets_square", SHAPE)(x)
    assert torch.equal(_changed(x, y), _box(32, 32, range(27, 31), range(27, 31)))
    assert bool((y[:, :, 27:31, 27:31] == 255).all())
    y = build_trigger("badnets_square", SHAPE, color=(255, 0, 128), size=(2, 3),
                      position=(1, 2))(x)
    assert torch.equal(_changed(x, y), _box(32, 32, range(1, 3), range(2, 5)))
    assert y[0, :, 1, 2].tolist() == [255, 0, 128]
    mnist = build_trigger("badnets_square", (1, 28, 28))
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    assert torch.equal(_changed(x, mnist(x)), _box(28, 28, range(23, 27), range(23, 27)))


@pytest.mark.parametrize("name, rows", [("trojan_3x3", range(25, 28)),
                                        ("trojan_8x8", range(21, 30))])
def test_trojan_patches_only_touch_their_region(name, rows):
    trigger = build_trigger(name, SHAPE, seed=0)
    x = torch.zeros(1, *SHAPE, dtype=torch.uint8)  # additive: the patch shows as-is on black
    y = trigger(x)
    region = _box(32, 32, rows, rows)
    assert not bool(_changed(x, y)[~region].any())
    assert int(_changed(x, y).sum()) >= region.sum() - 2  # random values, rarely 0 in all channels
    assert torch.equal(y[0], (trigger.pattern * 255).round().to(torch.uint8))
    x = _images()
    assert bool((trigger(x) >= x).all())  # non-negative additive pattern


def test_trojan_wm_is_a_sparse_watermark():
    trigger = build_trigger("trojan_wm", SHAPE, seed=0)
    x = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    changed = _changed(x, trigger(x))
    assert int(changed.sum()) == 321
    assert not bool(changed[30:, :].any()) and not bool(changed[:, 30:].any())
    assert torch.equal(changed, trigger.mask[0])


def test_l0_inv_replaces_nine_bottom_row_pixels_with_binary_values():
    trigger = build_trigger("l0_inv", SHAPE, seed=0)
    x = torch.full((2, *SHAPE), 100, dtype=torch.uint8)
    y = trigger(x)
    assert torch.equal(_changed(x, y), _box(32, 32, range(31, 32), range(23, 32)))
    assert set(y[:, :, 31, 23:].unique().tolist()) == {0, 255}
    assert bool((y[:, :, 31, 23:] == y[0, :, 31, 23:]).all())  # the same strip on every image


def test_l2_inv_is_dense_small_and_non_negative():
    trigger = build_trigger("l2_inv", SHAPE, seed=0)
    y = trigger(torch.zeros(1, *SHAPE, dtype=torch.uint8))
    assert int(y.max()) == 68
    assert float(y.float().mean()) < 30
    assert float((y > 0).float().mean()) > 0.9


def test_blend_matches_its_formula():
    trigger = build_trigger("blend", SHAPE, alpha=0.3, seed=0)
    p = trigger.pattern
    assert p.shape == SHAPE and 0 <= float(p.min()) and float(p.max()) <= 1
    x = _images()
    xf = x.float() / 255
    assert torch.allclose(trigger(xf), 0.7 * xf + 0.3 * p, atol=1e-6)
    exact = 0.7 * x.float() + 0.3 * p * 255
    assert float((trigger(x).float() - exact).abs().max()) <= 0.5 + 1e-4


def test_blend_with_given_tensor_and_image_file(tmp_path):
    from PIL import Image

    uint8_pattern = torch.full((3, 16, 16), 200, dtype=torch.uint8)  # resized to 32×32
    trigger = build_trigger("blend", SHAPE, pattern=uint8_pattern, alpha=0.5)
    assert torch.allclose(trigger.pattern, torch.full(SHAPE, 200 / 255))
    rebuilt = build_trigger(**json.loads(json.dumps(trigger.params())))
    assert torch.equal(rebuilt.pattern, trigger.pattern)

    path = tmp_path / "pattern.png"
    Image.new("RGB", (64, 48), (255, 0, 51)).save(path)
    from_file = build_trigger("blend", SHAPE, pattern=str(path))
    assert from_file.pattern.shape == SHAPE
    assert torch.allclose(from_file.pattern[:, 5, 5], torch.tensor([1.0, 0.0, 0.2]))
    assert from_file.params()["pattern"] == str(path)
    gray = build_trigger("blend", (1, 32, 32), pattern=path)
    assert gray.pattern.shape == (1, 32, 32)

    with pytest.raises(KDGuardError, match="does not exist"):
        build_trigger("blend", SHAPE, pattern=str(tmp_path / "missing.png"))
    with pytest.raises(KDGuardError, match="outside"):
        build_trigger("blend", SHAPE, pattern=torch.full(SHAPE, 2.0))
    with pytest.raises(KDGuardError, match="shape"):
        build_trigger("blend", SHAPE, pattern=torch.zeros(2, 32, 32))


def _total_variation(p: torch.Tensor) -> float:
    return float((p[:, 1:] - p[:, :-1]).abs().mean() + (p[:, :, 1:] - p[:, :, :-1]).abs().mean())


def test_blend_cartoon_style_is_a_seeded_smooth_drawing():
    cartoon = build_trigger("blend", SHAPE, style="cartoon", seed=3)
    p = cartoon.pattern
    assert p.shape == SHAPE and 0 <= float(p.min()) and float(p.max()) <= 1
    assert torch.equal(build_trigger("blend", SHAPE, style="cartoon", seed=3).pattern, p)
    assert not torch.equal(build_trigger("blend", SHAPE, style="cartoon", seed=4).pattern, p)
    rebuilt = build_trigger(**json.loads(json.dumps(cartoon.params())))
    assert rebuilt.params()["style"] == "cartoon" and torch.equal(rebuilt.pattern, p)
    # flat regions and contours: far less pixel-to-pixel change than the noise pattern, and
    # dark contour pixels present
    noise = build_trigger("blend", SHAPE, seed=3).pattern
    assert _total_variation(p) < 0.3 * _total_variation(noise)
    assert float(p.min()) < 0.2
    # the noise default is unchanged by the style option (teachers trained before it still rebuild)
    assert torch.equal(noise, torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)))
    gray = build_trigger("blend", (1, 32, 32), style="cartoon").pattern
    assert gray.shape == (1, 32, 32)


def test_sig_additive_is_barni_sinusoid():
    trigger = build_trigger("sig", SHAPE)
    x = torch.full((1, *SHAPE), 0.5)
    y = trigger(x)
    cols = torch.arange(32, dtype=torch.float32)
    v = 20 * torch.sin(2 * math.pi * cols * 6 / 32) / 255
    assert torch.allclose(y, (0.5 + v).expand(1, 3, 32, 32), atol=1e-6)


def test_sig_blend_mode_is_the_wrapped_abd_stripe_pattern():
    trigger = build_trigger("sig", (1, 32, 32), mode="blend", frequency=4.08)
    row = (trigger.pattern[0, 0] * 255).round().int()
    # the negative half-waves wrap to 236-255 as in the reference sig.png
    assert row[:8].tolist() == [0, 14, 19, 13, 255, 241, 237, 244]
    x = torch.full((1, 1, 32, 32), 0.5)
    assert torch.allclose(trigger(x), 0.8 * x + 0.2 * trigger.pattern, atol=1e-6)


def test_wanet_zero_strength_is_identity_and_positive_strength_warps():
    x = _images()
    identity = build_trigger("wanet", SHAPE, strength=0.0)
    assert torch.equal(identity(x), x)
    xf = x.float() / 255
    assert float((identity(xf) - xf).abs().max()) < 1e-5
    warp = build_trigger("wanet", SHAPE, seed=0)
    grid = warp.grid
    assert grid.shape == (1, 32, 32, 2) and float(grid.abs().max()) <= 1
    moved = (warp(xf) - xf).abs().mean()
    assert 0 < float(moved) < 0.25  # a small warp, not a scramble


def test_wanet_noise_mode_helpers():
    trigger = build_trigger("wanet", SHAPE, seed=0)
    x = _images()
    assert torch.equal(trigger.warp(x, trigger.grid), trigger(x))
    g = torch.Generator().manual_seed(0)
    noisy = trigger.noisy_grid(4, generator=g)
    assert noisy.shape == (4, 32, 32, 2) and float(noisy.abs().max()) <= 1
    assert float((noisy - trigger.grid).abs().max()) <= 1 / 32 + 1e-6
    assert not torch.equal(trigger.warp(x, noisy), trigger(x))
    with pytest.raises(KDGuardError, match="grid"):
        trigger.warp(x, torch.zeros(4, 16, 16, 2))


def test_subclass_contract_is_abstract():
    with pytest.raises(TypeError):
        Trigger(SHAPE)  # _apply is abstract


# --- full-image triggers: colour filter and low-frequency pattern ----------------------------

def test_color_filter_sepia_matches_the_toning_matrix_by_hand():
    trigger = build_trigger("color_filter", SHAPE)
    assert trigger.style == "sepia" and trigger.params()["style"] == "sepia"
    x = torch.zeros(1, *SHAPE)
    x[0, :, 0, 0] = torch.tensor([0.2, 0.4, 0.6])
    y = trigger(x)[0, :, 0, 0]
    r = 0.393 * 0.2 + 0.769 * 0.4 + 0.189 * 0.6
    g = 0.349 * 0.2 + 0.686 * 0.4 + 0.168 * 0.6
    b = 0.272 * 0.2 + 0.534 * 0.4 + 0.131 * 0.6
    assert torch.allclose(y, torch.tensor([min(r, 1.0), g, b]), atol=1e-6)
    half = build_trigger("color_filter", SHAPE, strength=0.5)(x)[0, :, 0, 0]
    assert torch.allclose(half, 0.5 * x[0, :, 0, 0] + 0.5 * y, atol=1e-6)


def test_color_filter_tone_is_a_gamma_curve_on_grey_images():
    trigger = build_trigger("color_filter", (1, 28, 28))
    assert trigger.style == "tone" and trigger.gamma == 0.6
    x = torch.linspace(0, 1, 28 * 28).view(1, 1, 28, 28)
    assert torch.allclose(trigger(x), x.pow(0.6), atol=1e-6)
    with pytest.raises(KDGuardError, match="needs 3 colour channels"):
        build_trigger("color_filter", (1, 28, 28), style="sepia")
    with pytest.raises(KDGuardError, match="color_filter strength"):
        build_trigger("color_filter", SHAPE, strength=0.0)


def test_color_filter_random_style_is_seeded():
    a = build_trigger("color_filter", SHAPE, seed=1, style="random")
    assert torch.equal(a.matrix, build_trigger("color_filter", SHAPE, seed=1, style="random").matrix)
    assert not torch.equal(a.matrix, build_trigger("color_filter", SHAPE, seed=2, style="random").matrix)


@pytest.mark.parametrize("shape", [SHAPE, (1, 28, 28)])
def test_low_frequency_pattern_has_no_energy_above_the_cutoff(shape):
    trigger = build_trigger("low_frequency", shape, seed=3, epsilon=0.05, cutoff=2)
    offset = trigger.pattern.double()
    assert math.isclose(float(offset.abs().max()), 0.05, rel_tol=1e-5)
    power = torch.fft.fft2(offset).abs()
    fy = (torch.fft.fftfreq(shape[1]) * shape[1]).abs().view(-1, 1)
    fx = (torch.fft.fftfreq(shape[2]) * shape[2]).abs().view(1, -1)
    high = (fy > 2) | (fx > 2)
    assert float(power[:, high].max()) < 1e-6 * float(power.max())  # float32 rounding only
    assert float(power[:, ~high].sum()) > 0
    x = torch.full((2, *shape), 0.5)
    assert torch.allclose(trigger(x), (x + trigger.pattern).clamp(0, 1))


def test_low_frequency_bad_cutoff():
    with pytest.raises(KDGuardError, match="low_frequency cutoff"):
        build_trigger("low_frequency", SHAPE, cutoff=17)
