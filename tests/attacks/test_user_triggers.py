"""The user's own trigger: the ``patch`` trigger read from pattern/mask files (PNG, NPY), and a
batched trigger function named ``pkg.mod:fn`` (from Python and from the command line)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLI_FAST, cli_error

from kdguard.attacks import AttackSpec, build_attack, build_trigger, poison_dataset
from kdguard.attacks.triggers import FilePatch, FunctionTrigger
from kdguard.cli import main
from kdguard.errors import KDGuardError

SHAPE = (3, 8, 8)
CHECKER = np.array([[0, 255, 0], [255, 0, 255], [0, 255, 0]], dtype=np.uint8)


def _png(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _npy(path, array) -> str:
    np.save(path, array)
    return str(path)


def _images(n=4, shape=SHAPE, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- the patch trigger from files --------------------------------------------------------------

def test_png_pattern_is_pasted_bottom_right_by_default(tmp_path):
    rgb = np.stack([CHECKER, 255 - CHECKER, np.full((3, 3), 7, np.uint8)], axis=-1)  # 3×3×3
    t = build_trigger("patch", SHAPE, pattern_file=_png(tmp_path / "p.png", rgb))
    x = _images()
    y = t(x)
    expected = x.clone()
    expected[:, :, 5:8, 5:8] = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(y, expected)
    assert t.position == (5, 5) and t.mask.sum() == 9
    # float images get the same pixels, to float precision
    torch.testing.assert_close(t(x.float() / 255), expected.float() / 255)


def test_grey_png_is_used_in_every_channel_and_mask_png_selects_pixels(tmp_path):
    mask = np.zeros((3, 3), np.uint8)
    mask[1, :] = 255  # only the middle row is trigger
    t = build_trigger("patch", SHAPE, pattern_file=_png(tmp_path / "g.png", CHECKER),
                      mask_file=_png(tmp_path / "m.png", mask), position=[0, 2])
    x = _images()
    y = t(x)
    changed = (y != x).any(0).any(0)
    assert not changed[[0, 2]].any() and not changed[:, :2].any()  # rows 0/2 of the patch kept
    assert torch.equal(y[:, :, 1, 2:5], torch.tensor([255, 0, 255], dtype=torch.uint8).expand(4, 3, 3))
    assert torch.equal(t.mask[0].nonzero()[:, 0].unique(), torch.tensor([1]))


def test_npy_pattern_and_soft_mask_blend_with_alpha(tmp_path):
    pattern = np.random.default_rng(0).random((2, 4), dtype=np.float32)  # H×W float, grey
    mask = np.array([[1.0, 0.5, 0.0, 1.0], [1.0, 1.0, 1.0, 0.25]], np.float32)
    t = build_trigger("patch", SHAPE, pattern_file=_npy(tmp_path / "p.npy", pattern),
                      mask_file=_npy(tmp_path / "m.npy", mask), position=[-2, 0], alpha=0.5)
    x = torch.rand(3, *SHAPE)
    w = torch.zeros(1, 8, 8)
    w[0, 6:8, 0:4] = 0.5 * torch.from_numpy(mask)
    p = torch.zeros(8, 8)
    p[6:8, 0:4] = torch.from_numpy(pattern)
    torch.testing.assert_close(t(x), x + w * (p - x))
    # uint8 images are blended in float and rounded back
    x8 = _images(3)
    ref = (x8.float() / 255 + w * (p - x8.float() / 255)).mul(255).round().to(torch.uint8)
    assert torch.equal(t(x8), ref)


def test_uint8_npy_mask_of_zeros_and_ones_and_channel_last_pattern(tmp_path):
    pattern = np.random.default_rng(1).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    mask = np.array([[1, 0], [0, 1]], np.uint8)  # 0/1, not 0/255
    t = build_trigger("patch", SHAPE, pattern_file=_npy(tmp_path / "p.npy", pattern),
                      mask_file=_npy(tmp_path / "m.npy", mask), position=[3, 3])
    y = t(torch.zeros(1, *SHAPE, dtype=torch.uint8))
    assert torch.equal(y[0, :, 3, 3], torch.from_numpy(pattern[0, 0]))
    assert torch.equal(y[0, :, 4, 4], torch.from_numpy(pattern[1, 1]))
    assert int((y != 0).any(1).sum()) <= 2


def test_full_image_pattern_file_needs_no_position(tmp_path):
    full = np.random.default_rng(2).random((8, 8, 3)).astype(np.float32)
    t = build_trigger("patch", SHAPE, pattern_file=_npy(tmp_path / "full.npy", full), alpha=0.2)
    assert t.position == (0, 0)
    x = torch.rand(2, *SHAPE)
    torch.testing.assert_close(t(x), 0.8 * x + 0.2 * torch.from_numpy(full).permute(2, 0, 1))
    with pytest.raises(KDGuardError, match="outside the 8×8 image"):
        build_trigger("patch", SHAPE, pattern_file=str(tmp_path / "full.npy"), position=[1, 0])


def test_params_round_trip_through_json_and_record_paths_and_digests(tmp_path):
    pat = _png(tmp_path / "p.png", CHECKER)
    msk = _npy(tmp_path / "m.npy", np.ones((3, 3), np.float32) * 0.5)
    t = build_trigger("patch", SHAPE, seed=4, pattern_file=pat, mask_file=msk, position=[1, 1], alpha=0.8)
    params = json.loads(json.dumps(t.params()))
    assert params["pattern_file"] == str((tmp_path / "p.png").resolve())
    assert len(params["pattern_sha256"]) == 64 and len(params["mask_sha256"]) == 64
    assert params["position"] == [1, 1] and params["alpha"] == 0.8
    x = _images()
    assert torch.equal(build_trigger(**params)(x), t(x))
    spec = build_attack("patch", SHAPE, target=2, pattern_file=pat)
    assert torch.equal(AttackSpec.from_params(json.loads(json.dumps(spec.params()))).trigger(x), spec.trigger(x))


def test_rebuild_refuses_a_changed_file(tmp_path):
    pat = _png(tmp_path / "p.png", CHECKER)
    params = json.loads(json.dumps(build_trigger("patch", SHAPE, pattern_file=pat).params()))
    _png(tmp_path / "p.png", 255 - CHECKER)
    with pytest.raises(KDGuardError) as err:
        build_trigger(**params)
    assert "changed since the trigger was recorded" in str(err.value)
    assert "attack.params.pattern_sha256" in str(err.value)
    _png(tmp_path / "p.png", CHECKER)  # restored: accepted again
    assert build_trigger(**params).pattern_sha256 == params["pattern_sha256"]


@pytest.mark.parametrize("make, kwargs, fragment", [
    (None, dict(pattern_file="nowhere.png"), "does not exist"),
    (None, dict(), "needs a pattern file"),
    (lambda d: _npy(d / "big.npy", np.zeros((9, 9), np.float32)), {}, "is 9×9 but the images are 8×8"),
    (lambda d: _npy(d / "hi.npy", np.full((2, 2), 1.5, np.float32)), {}, "not [0, 1]"),
    (lambda d: _npy(d / "nan.npy", np.array([[0.1, np.nan]], np.float32)), {}, "NaN"),
    (lambda d: _npy(d / "i64.npy", np.ones((2, 2), np.int64)), {}, "dtype int64"),
    (lambda d: _npy(d / "chw.npy", np.zeros((3, 4, 4), np.float32)), {}, "has 4 channels"),
    (lambda d: _npy(d / "obj.npy", np.array([{"a": 1}], dtype=object)), {}, "does not unpickle"),
    (lambda d: str(d / "p.txt"), {}, "neither a PNG/JPEG image nor a .npy"),
    (lambda d: _png(d / "p.png", CHECKER), dict(alpha=0.0), "alpha"),
    (lambda d: _png(d / "p.png", CHECKER), dict(mask_file="absent.png"), "does not exist"),
    (lambda d: _png(d / "p.png", CHECKER), dict(position=[7, 7]), "outside the 8×8 image"),
    (lambda d: _png(d / "p.png", CHECKER), dict(pattern_sha256="abc"), "not a sha256"),
    (lambda d: _png(d / "p.png", CHECKER), dict(mask_sha256="0" * 64), "without a mask_file"),
])
def test_bad_pattern_files(tmp_path, make, kwargs, fragment):
    if make is not None:
        (tmp_path / "p.txt").write_text("x")
        kwargs = {"pattern_file": make(tmp_path), **kwargs}
    with pytest.raises(KDGuardError) as err:
        build_trigger("patch", SHAPE, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mask, fragment", [
    (np.ones((2, 3), np.float32), "is 2×3 but the pattern is 3×3"),
    (np.zeros((3, 3), np.float32), "selects no pixel"),
    (np.full((3, 3), -0.5, np.float32), "not [0, 1]"),
])
def test_bad_mask_files(tmp_path, mask, fragment):
    with pytest.raises(KDGuardError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        build_trigger("patch", SHAPE, pattern_file=_png(tmp_path / "p.png", CHECKER),
                      mask_file=_npy(tmp_path / "m.npy", mask))


def test_colour_png_is_read_as_grey_for_one_channel_images(tmp_path):
    rgb = np.stack([CHECKER] * 3, axis=-1)
    t = build_trigger("patch", (1, 6, 6), pattern_file=_png(tmp_path / "p.png", rgb))
    assert t.pattern.shape == (1, 6, 6) and torch.equal(t.pattern[0, 3:, 3:] * 255, torch.from_numpy(CHECKER).float())


def test_bad_pattern_file_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    bad = _npy(tmp_path / "nan.npy", np.array([[np.nan, 0.0]], np.float32))
    err = cli_error(["train-teacher", *CLI_FAST, "attack.name=patch", f"attack.params.pattern_file={bad}",
                     f"out={tmp_path / 'run'}"], capsys)
    assert "NaN" in err and "attack.params.pattern_file" in err
    err = cli_error(["train-teacher", *CLI_FAST, "attack.name=patch", f"out={tmp_path / 'run2'}"], capsys)
    assert "attack.params.pattern_file" in err


# --- the user's trigger function ---------------------------------------------------------------

USER_MODULE = '''
import torch

CALLS = []


def stamp(images):
    CALLS.append(tuple(images.shape))
    out = images.clone()
    out[:, :, :2, :2] = 1.0
    return out


def too_bright(images):
    return images * 255


def wrong_shape(images):
    return images[:, :, 1:]


def not_tensor(images):
    return images.tolist()


def with_nan(images):
    out = images.clone()
    out[0, 0, 0, 0] = float("nan")
    return out


def broken(images):
    raise RuntimeError("no GPU in the trigger")


def in_place(images):
    images.zero_()
    return images


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``kdg_user_trigs`` importable from ``tmp_path`` (fresh for every test)."""
    (tmp_path / "kdg_user_trigs.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kdg_user_trigs", raising=False)
    yield "kdg_user_trigs"
    sys.modules.pop("kdg_user_trigs", None)


def test_trigger_function_from_an_import_path(user_module):
    spec = build_attack(f"{user_module}:stamp", SHAPE, target=1)
    assert isinstance(spec.trigger, FunctionTrigger) and spec.name == "kdg_user_trigs:stamp"
    x = _images()
    before = x.clone()
    y = spec.trigger(x)
    assert torch.equal(x, before) and y.dtype == torch.uint8
    assert (y[:, :, :2, :2] == 255).all() and torch.equal(y[:, :, 2:], x[:, :, 2:])
    assert sys.modules[user_module].CALLS == [(4, 3, 8, 8)]  # one batched call, float N×C×H×W
    assert spec.params()["trigger"] == {"name": "kdg_user_trigs:stamp", "image_shape": [3, 8, 8], "seed": 0}


def test_trigger_function_as_a_callable_and_for_poisoning(user_module):
    import importlib

    from helpers import make_blobs

    fn = importlib.import_module(user_module).stamp
    spec = build_attack(fn, (1, 12, 12), target=0, poison_rate=0.25)
    assert spec.trigger.name == "kdg_user_trigs:stamp"
    poisoned = poison_dataset(make_blobs(32), spec, seed=0)
    assert poisoned.num_poisoned == 8
    assert (poisoned.dataset.images[poisoned.poison_indices][:, :, :2, :2] == 255).all()


def test_a_recorded_function_trigger_is_never_rebuilt_from_its_record(user_module):
    spec = build_attack(f"{user_module}:stamp", SHAPE)
    sys.modules.pop(user_module)
    record = json.loads(json.dumps(spec.params()))
    for rebuild in (lambda: build_trigger(**record["trigger"]), lambda: AttackSpec.from_params(record)):
        with pytest.raises(KDGuardError, match="never imports code named by a file"):
            rebuild()
    assert user_module not in sys.modules


@pytest.mark.parametrize("fn, fragment", [
    ("too_bright", ", 255], not [0, 1]"),
    ("wrong_shape", "returned shape (2, 3, 7, 8)"),
    ("not_tensor", "returned a list"),
    ("with_nan", "without NaN"),
    ("broken", "raised RuntimeError: no GPU in the trigger"),
])
def test_bad_trigger_function_outputs_are_refused_not_clamped(user_module, fn, fragment):
    trigger = build_attack(f"{user_module}:{fn}", SHAPE).trigger
    with pytest.raises(KDGuardError) as err:
        trigger(torch.rand(2, *SHAPE))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_trigger_function_cannot_edit_the_callers_images(user_module):
    x = torch.rand(2, *SHAPE)
    before = x.clone()
    assert build_attack(f"{user_module}:in_place", SHAPE).trigger(x).abs().sum() == 0
    assert torch.equal(x, before)


@pytest.mark.parametrize("name, kwargs, fragment", [
    ("kdg_no_such_module:fn", {}, "cannot import module 'kdg_no_such_module'"),
    ("kdg_user_trigs:absent", {}, "has no attribute 'absent'"),
    ("kdg_user_trigs:NOT_A_FUNCTION", {}, "is of type int, not a function"),
    ("kdg_user_trigs:stamp", {"alpha": 0.5}, "takes no parameters"),
])
def test_bad_trigger_function_names(user_module, name, kwargs, fragment):
    with pytest.raises(KDGuardError, match=fragment):
        build_attack(name, SHAPE, **kwargs)


def test_trigger_function_from_the_command_line(user_module, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-teacher", *CLI_FAST, f"attack.name={user_module}:stamp", f"out={out}"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attack"]["trigger"]["name"] == "kdg_user_trigs:stamp"
    assert manifest["attack"]["poison_rate"] == 0.1  # this run poisoned its data at the preset rate
    calls = len(sys.modules[user_module].CALLS)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--attack", f"{user_module}:stamp", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_backdoor"] > 0 and len(sys.modules[user_module].CALLS) > calls
    # read back from the run's own manifest, the same name is refused
    err = cli_error(["evaluate", str(out)], capsys)
    assert "names the trigger function 'kdg_user_trigs:stamp'" in err
    assert "--attack kdg_user_trigs:stamp" in err
