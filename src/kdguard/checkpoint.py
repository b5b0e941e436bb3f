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
import hashlib
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
from .trust import refuse_code_from_file

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
    spec = {"arch": getattr(model, "arch", None), "options": dict(getattr(model, "arch_options", {}) or {}),
            "num_classes": num_classes, "in_channels": in_channels, "mean": list(mean), "std": list(std)}
    if getattr(model, "input_norm", None) is not None:
        spec["input_norm"] = dict(model.input_norm)
    return spec


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
    path = Path(path).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS
        if not weights.is_file():
            raise KDGuardError(f"no {WEIGHTS} in checkpoint directory {str(path)!r}",
                               "point to a kdguard run directory or a .safetensors/.pt weights file")
        return weights, path / MANIFEST if (path / MANIFEST).is_file() else None
    if not path.exists():
        raise KDGuardError(f"checkpoint {str(path)!r} does not exist", "check the path")
    if not path.is_file():
        raise KDGuardError(f"checkpoint {str(path)!r} is not a file or directory",
                           "point to a run directory or a weights file")
    # a bare weights file has no manifest of its own: a manifest.json beside it would describe
    # some other file, so only a file named like a run directory's weights takes its neighbour
    manifest = path.with_name(MANIFEST)
    return path, manifest if path.name == WEIGHTS and manifest.is_file() else None


def _read_manifest_file(manifest: Path) -> dict[str, Any]:
    try:
        data = read_json(manifest)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KDGuardError(f"manifest {str(manifest)!r} is not readable JSON ({type(e).__name__})",
                           "restore the run's manifest.json, or load the weights file alone with "
                           "--teacher-arch NAME --num-classes K") from None
    if not isinstance(data, dict):
        raise KDGuardError(f"manifest {str(manifest)!r} holds a {type(data).__name__}, not an object",
                           "restore the run's manifest.json, or load the weights file alone with "
                           "--teacher-arch NAME --num-classes K")
    return data


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory or weights file (``{}`` when there is none).

    Raises:
        KDGuardError: the path does not exist, or its manifest is not a JSON object.
    """
    _, manifest = _locate(path)
    return _read_manifest_file(manifest) if manifest else {}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 digest of a file's bytes (weights digests in manifests and records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | Path) -> str:
    """sha256 of the weights a checkpoint path (run directory or weights file) points to.

    Raises:
        KDGuardError: as :func:`read_manifest` for a missing path.
    """
    weights, _ = _locate(path)
    return sha256_file(weights)


#: Keys under which training scripts commonly nest a state dict (checked in this order).
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")

#: Prefixes that wrappers add to every key: DataParallel/DDP (``module.``), torch.compile
#: (``_orig_mod.``).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded weights object.

    Accepts a plain ``{name: tensor}`` dict, or one nested under a key of
    :data:`NESTED_STATE_KEYS` (``{"state_dict": {...}, "epoch": 3}``), and strips a prefix shared
    by every key from :data:`WRAPPER_PREFIXES` (weights saved from ``DataParallel``/DDP or a
    compiled model).

    Raises:
        KDGuardError: no tensor dict found.
    """
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in NESTED_STATE_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise KDGuardError(f"{source} does not hold a state dict of tensors",
                           "save model.state_dict() (or a dict with it under 'state_dict'), or use "
                           "safetensors")
    state: dict[str, torch.Tensor] = dict(obj)  # type: ignore[arg-type]
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or, as data only, from a ``.pt``/``.pth`` file.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers
    only, so a pickled payload cannot run code. See :func:`unwrap_state_dict` for the layouts
    accepted.

    Raises:
        KDGuardError: unreadable file, or a ``.pt`` file that needs unpickling of arbitrary
            objects (refused: teacher files are untrusted), or no tensor dict inside.
    """
    weights = Path(weights)
    if weights.suffix == ".safetensors":
        try:
            return unwrap_state_dict(load_file(str(weights)), f"{str(weights)!r}")
        except KDGuardError:
            raise
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise KDGuardError(f"cannot read {str(weights)!r} as safetensors ({type(e).__name__})",
                               "check that the file is a complete .safetensors checkpoint") from None
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KDGuardError(
            f"refusing to load {str(weights)!r}: not a plain tensor state dict ({type(e).__name__})",
            "convert it to safetensors in a trusted environment; kdguard never unpickles models",
        ) from None
    return unwrap_state_dict(obj, f"{str(weights)!r}")


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> nn.Module:
    """Strictly load ``state`` into ``model``; mismatches become one clear error.

    Every tensor must match the model's entry in shape and kind: floating-point entries must be
    floating point and finite (a NaN or integer weight is refused, not loaded).

    Raises:
        KDGuardError: missing, unexpected or reshaped keys; a non-float or non-finite weight.
    """
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
            "pass the architecture the weights were trained with (--teacher-arch NAME) and the right "
            "--num-classes K")
    for key in sorted(own):
        value = state[key]
        if own[key].is_floating_point() and not value.is_floating_point():
            raise KDGuardError(f"{source}: weight {key!r} has dtype {value.dtype}, not floating point",
                               "export the model's floating-point state_dict()")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise KDGuardError(f"{source}: weight {key!r} holds NaN or infinite values",
                               "use weights from a training run that did not diverge")
    model.load_state_dict(state)
    return model


#: Named input normalisations for ``--teacher-input-norm`` (per-channel mean/std, 0–1 scale).
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "half": ((0.5,), (0.5,)),  # [0, 1] → [-1, 1]
}


def parse_input_norm(text: str | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Parse ``--teacher-input-norm``: ``"MEAN/STD"`` (comma-separated per channel, 0–1 scale,
    e.g. ``"0.4914,0.4822,0.4465/0.247,0.2435,0.2616"``; one value is broadcast), a name of
    :data:`INPUT_NORMS`, or ``None``/``"none"`` (the model normalises its own ``[0, 1]`` input).

    Returns:
        ``(mean, std)`` with ``channels`` values each, or ``None``.

    Raises:
        KDGuardError: malformed text, a wrong value count, or a std ``<= 0``.
    """
    from .models.common import check_model_args

    if text is None or str(text).strip().lower() in ("", "none", "null"):
        return None
    key = str(text).strip().lower()
    fix = ("write MEAN/STD with one or C comma-separated values each, e.g. "
           f"--teacher-input-norm 0.4914,0.4822,0.4465/0.247,0.2435,0.2616, or one of: {', '.join(INPUT_NORMS)}")
    if key in INPUT_NORMS:
        mean, std = INPUT_NORMS[key]
    else:
        parts = key.split("/")
        if len(parts) != 2:
            raise KDGuardError(f"input normalisation {text!r} is not MEAN/STD", fix)
        try:
            mean, std = (tuple(float(v) for v in part.split(",")) for part in parts)
        except ValueError:
            raise KDGuardError(f"input normalisation {text!r} holds a value that is not a number", fix) from None
    try:
        return check_model_args(2, channels, mean, std)
    except KDGuardError as e:
        raise KDGuardError(f"input normalisation {text!r}: {e.problem}", fix) from None


class InputNormalization:
    """A forward pre-hook giving a model that expects normalised tensors kdguard's ``[0, 1]`` input.

    ``x ↦ (x − mean) / std`` per channel on the model's first positional input
    (``float N×C×H×W``). It adds no parameters, buffers or modules, so the model's state-dict
    keys stay those of the weights file. Deep copies of the model carry the hook.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return ((x - mean) / std, *rest)


def add_input_normalization(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    """Register :class:`InputNormalization` on ``model`` (in place) and record it as
    ``model.input_norm = {"mean": [...], "std": [...]}``; returns ``model``."""
    model.register_forward_pre_hook(InputNormalization(mean, std))
    model.input_norm = {"mean": list(mean), "std": list(std)}
    return model


def _spec_int(spec: dict[str, Any], key: str, default: int | None, source: str) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
            or int(value) < 1:
        raise KDGuardError(f"{source} gives {key} {value!r}, not a positive integer",
                           f"pass --{key.replace('_', '-')} explicitly")
    return int(value)


def _recorded_input_norm(record: object, channels: int, source: str
                         ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``input_norm`` a manifest's model entry records (``{"mean": [...], "std": [...]}``)."""
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("mean"), list) \
            or not isinstance(record.get("std"), list):
        raise KDGuardError(f"{source} has an input_norm entry that is not {{mean: [...], std: [...]}}",
                           "pass --teacher-input-norm MEAN/STD explicitly")
    text = ",".join(map(str, record["mean"])) + "/" + ",".join(map(str, record["std"]))
    return parse_input_norm(text, channels)


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None, input_norm: str | None = None,
               options: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model; returns ``(model in eval mode, manifest)``.

    The architecture and sizes come from the manifest of a kdguard run directory, unless given
    explicitly (needed for a bare ``.safetensors``/``.pt`` weights file). The manifest is data:
    an architecture it names by import path (``pkg.mod:factory``) is refused unless ``arch`` is
    passed here, by the caller (the user's command line or Python code), see :mod:`kdguard.trust`.

    Args:
        path: a run directory (``model.safetensors`` + ``manifest.json``) or a weights file.
        arch: registry name, ``wrn-D-K``, or ``package.module:factory`` (trusted: from the caller).
        num_classes, in_channels: the model's logits and input channels (1 or 3).
        mean, std: dataset statistics for a built-in model's own normalisation.
        input_norm: for a model that expects normalised tensors: ``"MEAN/STD"`` or a name of
            :data:`INPUT_NORMS` (:func:`parse_input_norm`); kdguard then feeds it
            ``(x − mean)/std`` of its ``[0, 1]`` input through a pre-hook, keys unchanged.
        options: architecture options (keyword arguments of the factory).

    Raises:
        KDGuardError: missing path, unreadable manifest, no architecture known, an import path
            read from a manifest, weights that do not match the architecture, or non-finite /
            non-float weights.
    """
    from .models import build_model  # local import: models import nothing from here

    weights, manifest_path = _locate(path)
    manifest = _read_manifest_file(manifest_path) if manifest_path else {}
    spec = manifest.get("model", {})
    if not isinstance(spec, dict):
        raise KDGuardError(f"manifest of {str(path)!r} has a 'model' entry that is not an object",
                           "load the weights file alone with --teacher-arch NAME --num-classes K")
    spec = dict(spec)
    source = f"manifest of {str(path)!r}"
    if arch is None:
        refuse_code_from_file(spec.get("arch"), what="architecture", source=source,
                              fix=f"pass --teacher-arch {spec.get('arch')}")
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            flag = key.replace("_", "-")
            raise KDGuardError(f"{key} {value!r} is not a positive integer",
                               f"pass --{flag} with the value the model was built with, e.g. --{flag} "
                               f"{10 if key == 'num_classes' else 3}")
    for key, value in (("arch", arch), ("num_classes", num_classes), ("in_channels", in_channels),
                       ("mean", mean), ("std", std), ("options", options)):
        if value is not None:
            spec[key] = value
    if not spec.get("arch"):
        raise KDGuardError(f"checkpoint {str(path)!r} has no manifest naming its architecture",
                           "pass --teacher-arch NAME and --num-classes K")
    if spec.get("num_classes") is None:
        raise KDGuardError(f"checkpoint {str(path)!r} has no manifest giving its number of classes",
                           "pass --num-classes K")
    n_classes = _spec_int(spec, "num_classes", None, source)
    channels = _spec_int(spec, "in_channels", 3, source)
    arch_options = spec.get("options") or {}
    if not isinstance(arch_options, dict):
        raise KDGuardError(f"{source} has architecture options that are not an object",
                           "pass --teacher-arch NAME to load the weights without them")
    norm = (parse_input_norm(input_norm, channels or 3) if input_norm is not None
            else _recorded_input_norm(spec.get("input_norm"), channels or 3, source))
    model = build_model(str(spec["arch"]), num_classes=n_classes, in_channels=channels,
                        mean=spec.get("mean"), std=spec.get("std"), **dict(arch_options))
    load_weights_into(model, load_state_dict(weights), source=f"checkpoint {str(weights)!r}")
    if norm is not None:
        add_input_normalization(model, *norm)
    # the manifest returned describes the model actually built (a bare weights file has none)
    loaded = {**spec, "arch": str(spec["arch"]), "num_classes": n_classes, "in_channels": channels}
    if norm is not None:
        loaded["input_norm"] = dict(model.input_norm)
    return model.eval(), {**manifest, "model": loaded}


def load_teacher(path: str | Path, spec: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_model` with the settings of a :class:`kdguard.config.TeacherSpec` (or ``None``).

    Raises:
        KDGuardError: as :func:`load_model`.
    """
    if spec is None:
        return load_model(path)
    return load_model(path, arch=spec.arch, num_classes=spec.num_classes, in_channels=spec.in_channels,
                      input_norm=spec.input_norm)
