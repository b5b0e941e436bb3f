"""Self-supervised image encoders: a registry backbone without its classifier, plus a projection head.

An :class:`Encoder` is any :func:`kdguard.models.build_model` architecture whose classifier module
(the ``classifier`` stage preset, e.g. ``fc``) is replaced by ``nn.Identity``, so its forward returns
the pooled ``penultimate`` feature vector ``h = f(x)`` (``N×D``; D = 512 for ResNet-18, 64 for the
CIFAR ResNets). Its stage outputs (the ``stages`` preset: ``layer1..4`` for ResNet-18,
``layer1..3`` for ResNet-8/20) are read with :class:`kdguard.taps.FeatureTaps` at the paths
:attr:`Encoder.stage_paths`.

An :class:`SSLModel` adds SimCLR's projection head ``g`` (Chen et al., "A Simple Framework for
Contrastive Learning of Visual Representations", ICML 2020, §2.1): ``z = g(h)``, an MLP
``Linear(D, hidden, bias=False) → BatchNorm1d → ReLU → Linear(hidden, out)``, the head of the
BadEncoder (Jia et al., S&P 2022) and paper-1 (Han et al. 2024) SimCLR models (512 → 128 there).
Downstream tasks and the defence use ``h``; only the contrastive loss uses ``z``.

Fine-pruning (Liu et al., RAID 2018) needs channels of the last stage switched off. Every encoder
carries a ``channel_mask`` buffer (ones by default) multiplied into the last stage's output by a
forward hook, so a pruned encoder is still the plain architecture plus one buffer, and saves and
loads like any other.

Checkpoints are a run directory with ``model.safetensors`` and a ``manifest.json`` whose
``"ssl_model"`` entry rebuilds the architecture (:func:`save_ssl_model`, :func:`load_ssl_model`);
nothing is unpickled.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_state_dict, load_weights_into, read_manifest, save_model
from ..errors import KDGuardError
from ..io import read_json
from ..models import build_model, stage_paths
from ..runtime import eval_mode
from ..taps import FeatureTaps
from ..trust import refuse_code_from_file

#: ``manifest.json`` key that marks (and describes) an SSL checkpoint.
SPEC_KEY = "ssl_model"

#: Name of the channel-mask buffer registered on the last stage module.
MASK_BUFFER = "channel_mask"


def _apply_channel_mask(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    mask = getattr(module, MASK_BUFFER).to(output.dtype)
    return output * mask.view(1, -1, *([1] * (output.dim() - 2)))


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 8:
        raise KDGuardError(f"encoder input shape {tuple(input_shape)!r} is not (C, H, W) with C in "
                           "{1, 3} and H, W >= 8", "give e.g. (3, 32, 32)")
    return shape  # type: ignore[return-value]


class Encoder(nn.Module):
    """A registry backbone used as a feature extractor ``f``: images → penultimate features.

    Args:
        arch: registry name (``"resnet18"`` paper scale, ``"resnet20"``/``"resnet8"`` CPU scale,
            any name :func:`kdguard.models.build_model` accepts whose family has stage presets).
        input_shape: ``(C, H, W)`` of the images the encoder reads (C ∈ {1, 3}, H, W ≥ 8).
        mean, std: per-channel input normalisation in the 0–1 scale (the pre-training dataset's
            statistics; applied inside, as for every kdguard model).
        **options: architecture options forwarded to ``build_model``.

    Input ``float N×C×H×W`` in ``[0, 1]`` → output ``float N×D`` (D = :attr:`feature_dim`).

    Attributes:
        backbone: the registry model with its classifier replaced by ``nn.Identity``.
        stage_paths: module paths of the stage outputs relative to this encoder
            (``"backbone.layer1"``, ...), shallow to deep.
        stage_shapes: per-sample shapes ``(C_l, H_l, W_l)`` of those outputs.
        channel_mask: ``float`` buffer of length ``C_last`` on the last stage module (state key
            ``backbone.<last stage>.channel_mask``); 0 switches a last-stage channel off.

    Raises:
        KDGuardError: unknown architecture or option, a bad input shape, or an architecture
            without ``stages``/``classifier`` presets.
    """

    def __init__(self, arch: str, input_shape: Sequence[int], *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, **options: Any) -> None:
        super().__init__()
        self.input_shape = _check_input_shape(input_shape)
        backbone = build_model(arch, num_classes=2, in_channels=self.input_shape[0], mean=mean,
                               std=std, **options)
        classifier = stage_paths(backbone, "classifier")[0]
        backbone.set_submodule(classifier, nn.Identity())
        self.backbone = backbone
        self.arch = backbone.arch
        self.arch_options = dict(options)
        norm = getattr(backbone, "normalize", None)  # built-ins normalise inside; user models may not
        self.mean = tuple(float(v) for v in norm.mean.flatten()) if norm is not None else mean
        self.std = tuple(float(v) for v in norm.std.flatten()) if norm is not None else std
        self.stage_paths = [f"backbone.{p}" for p in stage_paths(backbone, "stages")]
        feature_dim, shapes = self._dry_run()
        self.feature_dim = feature_dim
        self.stage_shapes = shapes
        last = self.get_submodule(self.stage_paths[-1])
        last.register_buffer(MASK_BUFFER, torch.ones(shapes[-1][0]))
        # a module-level function reading the buffer of the module it runs on: deep copies of
        # the encoder carry a working hook bound to their own buffer
        last.register_forward_hook(_apply_channel_mask)

    def _dry_run(self) -> tuple[int, list[tuple[int, ...]]]:
        """Feature dimension and stage shapes from one forward pass of a zero image."""
        with torch.no_grad(), eval_mode(self), FeatureTaps(self, self.stage_paths) as taps:
            out, feats = taps(torch.zeros(1, *self.input_shape))
        if out.dim() != 2:
            raise KDGuardError(f"architecture {self.arch!r} without its classifier returns shape "
                               f"{tuple(out.shape)}, not N×D", "use an architecture whose classifier "
                               "input is the pooled feature vector (e.g. resnet18, resnet20)")
        return int(out.shape[1]), [tuple(int(d) for d in f.shape[1:]) for f in feats.values()]

    @property
    def channel_mask(self) -> torch.Tensor:
        """The last stage's channel mask buffer (``C_last`` floats, 1 = kept, 0 = pruned)."""
        return getattr(self.get_submodule(self.stage_paths[-1]), MASK_BUFFER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @property
    def num_stages(self) -> int:
        return len(self.stage_paths)

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description (with the head sizes, :meth:`SSLModel.spec`) that
        :func:`build_from_spec` rebuilds."""
        return {"arch": self.arch, "input_shape": list(self.input_shape),
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "options": dict(self.arch_options)}


class ProjectionHead(nn.Module):
    """SimCLR projection MLP ``g``: ``Linear(D, hidden, bias=False) → BN1d → ReLU → Linear(hidden, out)``.

    Input ``N×D`` features → ``N×out`` projections (not normalised; :func:`nt_xent` normalises).
    Sizes of BadEncoder's and paper 1's CIFAR models: 512 → 512 → 128.

    Raises:
        KDGuardError: a size below 1.
    """

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        if min(in_dim, hidden, out_dim) < 1:
            raise KDGuardError(f"projection head sizes {in_dim}→{hidden}→{out_dim} must be >= 1",
                               "give positive proj_hidden and proj_dim, e.g. 512 and 128")
        self.net = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(), nn.Linear(hidden, out_dim))
        self.hidden, self.out_dim = hidden, out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SSLModel(nn.Module):
    """Encoder ``f`` plus projection head ``g``: ``x → (h, z)`` with ``h = f(x)``, ``z = g(h)``.

    Input ``float N×C×H×W`` in ``[0, 1]``; outputs ``h`` ``N×D`` and ``z`` ``N×out`` (both float,
    unnormalised). ``arch`` mirrors the encoder's (used by the bf16/channels_last heuristics).
    """

    def __init__(self, encoder: Encoder, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.arch = encoder.arch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.head(h)

    def spec(self) -> dict[str, Any]:
        return {**self.encoder.spec(), "proj_hidden": self.head.hidden, "proj_dim": self.head.out_dim}


def build_ssl_model(arch: str, input_shape: Sequence[int], *, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, proj_hidden: int = 512, proj_dim: int = 128,
                    options: dict[str, Any] | None = None, seed: int | None = None) -> SSLModel:
    """A freshly initialised :class:`SSLModel` (encoder + projection head).

    Args:
        arch, input_shape, mean, std, options: see :class:`Encoder`.
        proj_hidden, proj_dim: projection head sizes (BadEncoder / paper 1: 512, 128).
        seed: if given, the initialisation is drawn from ``torch.manual_seed(seed)`` (global RNG).

    Raises:
        KDGuardError: see :class:`Encoder` and :class:`ProjectionHead`.
    """
    if seed is not None:
        torch.manual_seed(seed)
    encoder = Encoder(arch, input_shape, mean=mean, std=std, **(options or {}))
    return SSLModel(encoder, ProjectionHead(encoder.feature_dim, proj_hidden, proj_dim))


def build_from_spec(spec: dict[str, Any], seed: int | None = None) -> SSLModel:
    """Rebuild the (freshly initialised) architecture described by :meth:`SSLModel.spec`."""
    try:
        return build_ssl_model(spec["arch"], spec["input_shape"], mean=spec.get("mean"),
                               std=spec.get("std"), proj_hidden=int(spec.get("proj_hidden", 512)),
                               proj_dim=int(spec.get("proj_dim", 128)),
                               options=dict(spec.get("options") or {}), seed=seed)
    except KeyError as e:
        raise KDGuardError(f"SSL model description lacks {e.args[0]!r}",
                           "point to a checkpoint written by kdguard's SSL commands") from None


def save_ssl_model(directory: str | Path, model: SSLModel, manifest: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` (with the ``"ssl_model"`` spec) atomically."""
    return save_model(directory, model, {**manifest, SPEC_KEY: model.spec()})


def is_ssl_checkpoint(directory: str | Path) -> bool:
    """True if ``directory`` holds a complete SSL checkpoint (weights and a manifest with the spec)."""
    d = Path(directory)
    if not (d / "model.safetensors").exists() or not (d / "manifest.json").exists():
        return False
    try:
        return SPEC_KEY in read_json(d / "manifest.json")
    except (OSError, ValueError):
        return False


def ssl_model_from_weights(path: str | Path, spec: Any, *, input_size: int = 32,
                           seed: int = 0) -> tuple[SSLModel, dict[str, Any]]:
    """An :class:`SSLModel` whose encoder holds the backbone weights of a bare weights file.

    The file (``.safetensors``, or ``.pt``/``.pth`` read as data, see
    :func:`kdguard.checkpoint.load_state_dict`) holds either a kdguard SSL state dict
    (``encoder.*``/``head.*`` keys) or a plain backbone state dict as an SSL code base saves it
    (``conv1.weight``, ``layer1.0...``); the backbone's classifier keys, if any, are dropped
    (the encoder's classifier is ``nn.Identity``). Without head weights the projection head is
    freshly initialised from ``seed``: downstream probes and the distillation defence use the
    encoder features ``h``, which the head does not change.

    Args:
        path: the weights file.
        spec: a :class:`kdguard.config.TeacherSpec` (``arch`` required; ``in_channels`` default 3;
            ``input_norm`` for a backbone that expects normalised tensors).
        input_size: H = W of the images the encoder reads (32 for CIFAR-10/GTSRB).
        seed: initialisation seed of a missing projection head.

    Returns:
        ``(model in eval mode, manifest)`` where the manifest's ``"ssl_model"`` entry describes the
        architecture built and ``"imported"`` the source file and its sha256.

    Raises:
        KDGuardError: no architecture given, keys or shapes that do not match it, non-finite
            weights, or a file that needs unpickling.
    """
    from ..checkpoint import add_input_normalization, parse_input_norm, sha256_file

    if not spec.arch:
        raise KDGuardError(f"{str(path)!r} is a bare weights file, not an SSL checkpoint directory",
                           "pass --teacher-arch NAME (the encoder's backbone architecture)")
    channels = int(spec.in_channels or 3)
    model = build_ssl_model(spec.arch, (channels, input_size, input_size), seed=seed)
    norm = parse_input_norm(spec.input_norm, channels)
    if norm is not None:
        add_input_normalization(model.encoder.backbone, *norm)
    state = load_state_dict(path)
    own = model.state_dict()
    if not any(k.startswith("encoder.") for k in state):
        classifier = stage_paths(build_model(spec.arch, num_classes=2, in_channels=channels), "classifier")[0]
        state = {f"encoder.backbone.{k}": v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    fresh_head = not any(k.startswith("head.") for k in state)
    for key, value in own.items():  # kdguard's own additions: the pruning mask and a fresh head
        if key.endswith(MASK_BUFFER) or (fresh_head and key.startswith("head.")):
            state.setdefault(key, value)
    load_weights_into(model, state, source=f"encoder weights {str(path)!r}")
    manifest = {SPEC_KEY: model.spec(), "imported": {"source": str(Path(path).resolve()),
                                                     "sha256": sha256_file(path),
                                                     "fresh_head": fresh_head}}
    return model.eval(), manifest


def load_ssl_model(path: str | Path, spec: Any = None) -> tuple[SSLModel, dict[str, Any]]:
    """Load an SSL checkpoint directory, or a bare encoder weights file described by ``spec``
    (:func:`ssl_model_from_weights`); returns ``(model in eval mode, manifest)``.

    Raises:
        KDGuardError: the path does not exist, a directory has no manifest with an
            ``"ssl_model"`` entry (e.g. a supervised kdguard checkpoint), an architecture read from
            the manifest is an import path, or the weights do not match.
    """
    d = Path(path).expanduser()
    if d.is_file() or (spec is not None and getattr(spec, "arch", None)):
        if not d.exists():
            raise KDGuardError(f"encoder weights {str(d)!r} do not exist", "check the path")
        weights = d if d.is_file() else d / "model.safetensors"
        return ssl_model_from_weights(weights, spec or _NO_SPEC)
    if not d.is_dir():
        raise KDGuardError(f"SSL encoder checkpoint {str(d)!r} is not a directory",
                           "pass the run directory written by `kdguard ssl-pretrain` or `kdguard badencoder`")
    manifest_path = d / "manifest.json"
    manifest = read_manifest(d) if manifest_path.exists() else {}
    if SPEC_KEY not in manifest:
        raise KDGuardError(f"{str(d)!r} is not an SSL encoder checkpoint (no {SPEC_KEY!r} in its manifest)",
                           "pass a directory written by `kdguard ssl-pretrain`, `badencoder` or `ssl-defend`")
    spec = manifest[SPEC_KEY]
    if not isinstance(spec, dict):
        raise KDGuardError(f"{str(d)!r} has an {SPEC_KEY!r} entry that is not an object",
                           "pass a directory written by `kdguard ssl-pretrain`, `badencoder` or `ssl-defend`")
    # the manifest is data: an architecture it names by import path would run that module's code
    refuse_code_from_file(spec.get("arch"), what="encoder architecture", source=f"manifest of {str(d)!r}",
                          fix="register the architecture in kdguard.models.MODELS from your own code, or "
                              "rebuild the encoder in Python with build_ssl_model(...)")
    model = build_from_spec(spec)
    load_weights_into(model, load_state_dict(d / "model.safetensors"), source=f"SSL checkpoint {str(d)!r}")
    return model.eval(), manifest


class _NoSpec:
    arch = None
    in_channels = None
    input_norm = None


_NO_SPEC = _NoSpec()


def clone_model(model: SSLModel) -> SSLModel:
    """An independent deep copy (weights, buffers and the channel-mask hook)."""
    return copy.deepcopy(model)
