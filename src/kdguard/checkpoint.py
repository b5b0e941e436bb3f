"""Checkpoints: safetensors weights plus a JSON manifest; untrusted files are never unpickled.

A saved model is a directory (or a file pair) holding:

- ``model.safetensors``: the state dict (tensors only; loading it cannot run code);
- ``manifest.json``: how to rebuild the model (architecture, classes, input normalisation),
  the attack the model was trained with (trigger parameters, target), the run's config, seed,
  package versions, git commit and metrics.

Both files are written atomically. Weights from other tools can be loaded from ``.pt``/``.pth``
state dicts with ``torch.load(weights_only=True)`` (tensors and plain containers only), given
the architecture.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import KDGuardError
from .io import atomic_write, read_json, write_json

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def environment_info() -> dict[str, Any]:
    """Versions and git commit recorded in every manifest."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "kdguard": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def model_spec(model: nn.Module, *, num_classes: int, in_channels: int,
               mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The manifest entry that lets :func:`load_model` rebuild ``model`` from the registry."""
    return {"arch": getattr(model, "arch", None), "options": dict(getattr(model, "arch_options", {}) or {}),
            "num_classes": num_classes, "in_channels": in_channels, "mean": list(mean), "std": list(std)}


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage (channels_last weights are views).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(directory: str | Path, model: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` then ``manifest.json`` (both atomically) into ``directory``."""
    directory = Path(directory)
    state = _contiguous_state(model)
    atomic_write(directory / WEIGHTS, lambda p: save_file(state, str(p)))
    write_json(directory / MANIFEST, {**environment_info(), **manifest})
    return directory


def _locate(path: str | Path) -> tuple[Path, Path | None]:
    path = Path(path)
    if path.is_dir():
        weights = path / WEIGHTS
        if not weights.exists():
            raise KDGuardError(f"no {WEIGHTS} in checkpoint directory {str(path)!r}",
                               "point to a kdguard run directory or a .safetensors file")
        return weights, path / MANIFEST if (path / MANIFEST).exists() else None
    if not path.exists():
        raise KDGuardError(f"checkpoint {str(path)!r} does not exist", "check the path")
    manifest = path.with_name(MANIFEST)
    return path, manifest if manifest.exists() else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory or weights file (``{}`` when there is none)."""
    _, manifest = _locate(path)
    return read_json(manifest) if manifest else {}


def load_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or, as data only, from a ``.pt``/``.pth`` state dict.

    Raises:
        KDGuardError: unreadable file, or a ``.pt`` file that needs unpickling of arbitrary
            objects (refused: teacher files are untrusted).
    """
    weights = Path(weights)
    if weights.suffix == ".safetensors":
        try:
            return load_file(str(weights))
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise KDGuardError(f"cannot read {str(weights)!r} as safetensors ({e})",
                               "check that the file is a complete .safetensors checkpoint") from None
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDGuardError(
            f"refusing to load {str(weights)!r}: not a plain tensor state dict ({type(e).__name__})",
            "convert it to safetensors in a trusted environment; kdguard never unpickles models",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KDGuardError(f"{str(weights)!r} does not hold a state dict of tensors",
                           "save model.state_dict() (or use safetensors)")
    return obj


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Strictly load ``state`` into ``model``; mismatches become one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys)
        raise KDGuardError(
            f"{source} does not match architecture {getattr(model, 'arch', type(model).__name__)!r} ({detail})",
            "pass the architecture the checkpoint was trained with (--arch) and the right number of classes")
    model.load_state_dict(state)
    return model


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model; returns ``(model in eval mode, manifest)``.

    The architecture and sizes come from the manifest, unless given explicitly (needed for
    foreign ``.pt``/``.safetensors`` files without a manifest).
    """
    from .models import build_model  # local import: models import nothing from here

    weights, manifest_path = _locate(path)
    manifest = read_json(manifest_path) if manifest_path else {}
    spec = dict(manifest.get("model", {}))
    for key, value in (("arch", arch), ("num_classes", num_classes), ("in_channels", in_channels),
                       ("mean", mean), ("std", std)):
        if value is not None:
            spec[key] = value
    if not spec.get("arch") or not spec.get("num_classes"):
        raise KDGuardError(f"checkpoint {str(path)!r} has no manifest naming its architecture",
                           "pass --arch NAME and --num-classes K")
    model = build_model(spec["arch"], num_classes=int(spec["num_classes"]),
                        in_channels=int(spec.get("in_channels", 3)),
                        mean=spec.get("mean"), std=spec.get("std"), **dict(spec.get("options") or {}))
    load_weights_into(model, load_state_dict(weights), source=f"checkpoint {str(weights)!r}")
    return model.eval(), manifest
