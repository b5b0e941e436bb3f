"""BadEncoder: backdoor a pre-trained image encoder (Jia, Liu & Gong, IEEE S&P 2022).

From a clean encoder ``f``, a shadow dataset ``D_s`` (unlabelled images), and for each target
downstream task ``k`` a trigger ``e_k`` and reference inputs ``x_ref^{k,j}`` of its target class,
the attacker fine-tunes a copy ``f′`` of ``f`` to minimise ``L₀ + λ₁·L₁ + λ₂·L₂`` (paper Eq. 1–4)
with ``s`` the cosine similarity:

* effectiveness: triggered shadow inputs embed near the references,
  ``L₀ = −mean_k mean_{x∈D_s} mean_j s(f′(x ⊕ e_k), f′(x_ref^{k,j}))``;
* effectiveness: the references themselves keep their clean embeddings,
  ``L₁ = −mean_k mean_j s(f′(x_ref^{k,j}), f(x_ref^{k,j}))``;
* utility: clean shadow inputs keep their clean embeddings,
  ``L₂ = −mean_{x∈D_s} s(f′(x), f(x))``.

The paper writes sums normalised by the set sizes; the code (``badencoder.py``) averages over the
batch, which is what is done here (:func:`badencoder_terms`). Two details follow the code, each
with the paper's alternative as an option:

* in ``L₁`` the backdoored encoder sees an *augmented* reference (flip, colour jitter, grayscale,
  no crop: ``finetune_transform``) while the clean encoder sees the plain one
  (``augment_references=False`` gives the paper's ``f′(x_ref)``);
* BatchNorm layers are frozen (eval mode, affine parameters not trained) and only the encoder
  (not the projection head) is optimised (``freeze_bn=False`` trains BatchNorm too).

Shadow images are not augmented (the code's ``bd_transform`` is only ``ToTensor + Normalize``).
The code's "multiple references" are one reference per trigger; here every target task has its
own trigger and any number of references, so one encoder can carry backdoors for several
downstream tasks (the paper's multi-target setting).

The trigger default is BadEncoder's 32×32 trigger ``trigger_pt_white_21_10_ap_replace``: a 10×10
white square replacing the pixels at rows/cols 21–30 (``badnets_square`` with ``size=10,
position=(21, 21)``); any registered trigger can be used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.triggers import Trigger, build_trigger
from ..config import TrainConfig
from ..data import ImageDataset
from ..errors import KDGuardError
from ..augment import SimCLRAugment
from .encoder import SSLModel
from .loop import EpochLog, SSLLoop


@dataclass(frozen=True)
class BackdoorTarget:
    """One attacked downstream task.

    Attributes:
        dataset: registry name of the downstream dataset (e.g. ``"gtsrb"``).
        target: the target class index in that dataset.
        trigger: the trigger stamped on inputs at the encoder's input shape.
        references: uint8 ``r×C×H×W`` reference inputs of the target class (at the encoder's
            input shape), or ``None`` when the target was read back from a manifest (evaluation
            needs only the trigger and the class).
    """

    dataset: str
    target: int
    trigger: Trigger
    references: torch.Tensor | None = None

    def record(self) -> dict[str, Any]:
        """JSON entry stored in the poisoned encoder's manifest (``"targets"`` list)."""
        return {"dataset": self.dataset, "target": self.target, "trigger": self.trigger.params(),
                "n_references": None if self.references is None else len(self.references)}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "BackdoorTarget":
        """Rebuild (without references) from :meth:`record`'s output.

        Raises:
            KDGuardError: the record lacks a field or names an unknown trigger.
        """
        try:
            return cls(str(rec["dataset"]), int(rec["target"]), build_trigger(**rec["trigger"]))
        except (KeyError, TypeError) as e:
            raise KDGuardError(f"backdoor target record {rec!r} is incomplete ({e})",
                               "re-create the poisoned encoder with `kdguard badencoder`") from None


def targets_from_manifest(manifest: dict[str, Any]) -> list[BackdoorTarget]:
    """The targets recorded by :func:`run_badencoder` in a poisoned encoder's manifest (``[]`` if clean)."""
    return [BackdoorTarget.from_record(r) for r in manifest.get("targets") or []]


def select_references(ds: ImageDataset, target: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random images (seeded) of class ``target`` of ``ds``: uint8 ``count×C×H×W``.

    Raises:
        KDGuardError: ``target`` is not a class of ``ds``, ``count`` < 1, or the class has fewer
            than ``count`` images.
    """
    if not 0 <= target < ds.num_classes:
        raise KDGuardError(f"target class {target} is not a class of dataset {ds.name!r} "
                           f"({ds.num_classes} classes)", f"give a class index below {ds.num_classes}")
    if count < 1:
        raise KDGuardError(f"number of reference inputs {count!r} is below 1", "give references >= 1")
    members = (ds.labels == target).nonzero().squeeze(1)
    if len(members) < count:
        raise KDGuardError(f"dataset {ds.name!r} has {len(members)} images of class {target}, fewer than "
                           f"the {count} references asked for", "lower `references`")
    pick = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(seed))[:count]]
    return ds.images[pick.sort().values].clone()


def freeze_batchnorm(model: nn.Module) -> list[nn.Module]:
    """Put every BatchNorm layer of ``model`` in eval mode and stop training its affine parameters.

    Returns the BatchNorm modules (the loop keeps them in eval mode at every epoch start).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return norms


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairwise cosine similarities ``len(a)×len(b)``, in float32 even under autocast."""
    with torch.autocast(a.device.type, enabled=False):
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t()


def badencoder_terms(feat: torch.Tensor, feat_clean: torch.Tensor, feat_bd: Sequence[torch.Tensor],
                     feat_ref: Sequence[torch.Tensor], feat_ref_seen: Sequence[torch.Tensor],
                     feat_ref_clean: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three BadEncoder loss terms (Jia et al. 2022, Eq. 2–4, batch means as in the code).

    Args:
        feat: ``f′(x)`` of the clean shadow batch, ``N×D``.
        feat_clean: ``f(x)``, ``N×D`` (clean encoder, no gradient).
        feat_bd: per target ``k``, ``f′(x ⊕ e_k)``, ``N×D``.
        feat_ref: per target, ``f′(x_ref)`` of its ``r_k`` references, ``r_k×D``.
        feat_ref_seen: per target, what ``L₁`` compares: ``f′(aug(x_ref))`` (code) or
            ``f′(x_ref)`` (paper), ``r_k×D``.
        feat_ref_clean: per target, ``f(x_ref)``, ``r_k×D``.

    Returns:
        ``{"l0", "l1", "l2"}`` float32 scalars in ``[−1, 1]`` (unweighted): ``l0`` = −mean over
        targets of the mean cosine between every triggered input and every reference; ``l1`` =
        −mean over targets and references of ``cos(feat_ref_seen, feat_ref_clean)`` (paired);
        ``l2`` = −mean over the batch of ``cos(feat, feat_clean)`` (paired).

    Raises:
        KDGuardError: mismatched list lengths or shapes.
    """
    k = len(feat_bd)
    if k == 0 or not (len(feat_ref) == len(feat_ref_seen) == len(feat_ref_clean) == k):
        raise KDGuardError(f"BadEncoder terms got {len(feat_bd)} triggered batches and "
                           f"{len(feat_ref)}/{len(feat_ref_seen)}/{len(feat_ref_clean)} reference sets",
                           "give one triggered batch and one reference set per target")
    if feat.shape != feat_clean.shape or any(b.shape != feat.shape for b in feat_bd):
        raise KDGuardError("BadEncoder clean, clean-encoder and triggered features differ in shape",
                           "compute all of them on the same shadow batch")
    if any(a.shape != b.shape or a.shape != c.shape for a, b, c in zip(feat_ref, feat_ref_seen, feat_ref_clean)):
        raise KDGuardError("BadEncoder reference features differ in shape between the encoders",
                           "feed the same references to both encoders")
    l0 = -torch.stack([_cos(b, r).mean() for b, r in zip(feat_bd, feat_ref)]).mean()
    l1 = -torch.stack([_cos(s, c).diagonal().mean() for s, c in zip(feat_ref_seen, feat_ref_clean)]).mean()
    l2 = -_cos(feat, feat_clean).diagonal().mean()
    return {"l0": l0, "l1": l1, "l2": l2}


def run_badencoder(model: SSLModel, clean: SSLModel, shadow: torch.Tensor, targets: Sequence[BackdoorTarget],
                   cfg: TrainConfig, *, lambda1: float = 1.0, lambda2: float = 1.0,
                   augment_references: bool = True, freeze_bn: bool = True,
                   reference_augment: SimCLRAugment | None = None, run_dir: str | Path | None = None,
                   seed: int = 0) -> list[EpochLog]:
    """Inject the backdoors of ``targets`` into ``model`` (in place; start it as a copy of ``clean``).

    Each step takes a batch ``x`` of shadow images, runs ``f′`` on ``x``, on ``x ⊕ e_k`` for every
    target, on the references (and their augmented copies) in one forward pass (BatchNorm is in
    eval mode, so batching them changes nothing), ``f`` on ``x`` without gradient, and minimises
    ``L₀ + λ₁L₁ + λ₂L₂`` (:func:`badencoder_terms`). The logged terms are ``l0``, ``l1·λ₁``,
    ``l2·λ₂``; their sum is the loss.

    Args:
        model: the encoder being poisoned (:class:`SSLModel`; only ``model.encoder`` is trained).
        clean: the clean reference encoder ``f`` (frozen).
        shadow: uint8 ``N×C×H×W`` shadow images at the encoder's input shape.
        targets: the attacked tasks, each with references.
        cfg: schedule (BadEncoder: SGD lr 1e-3, momentum 0.9, wd 5e-4, batch 256, 200 epochs).
        lambda1, lambda2: weights of ``L₁`` and ``L₂`` (1, 1).
        augment_references, freeze_bn: see the module docstring.
        reference_augment: augmentation of the references for ``L₁`` (default: BadEncoder's
            ``finetune_transform``: flip, colour jitter p = 0.8, grayscale p = 0.2, no crop).
        run_dir, seed: checkpointing and randomness (see :class:`SSLLoop`).

    Raises:
        KDGuardError: no targets, a target without references, images of the wrong shape,
            negative λ, or a loop error.
    """
    shape = tuple(model.encoder.input_shape)
    if not targets:
        raise KDGuardError("BadEncoder needs at least one target task", "give targets=[...]")
    if lambda1 < 0 or lambda2 < 0:
        raise KDGuardError(f"lambda1={lambda1}, lambda2={lambda2} must be >= 0", "use the default 1.0")
    for t in targets:
        if t.references is None or t.references.dtype != torch.uint8 or tuple(t.references.shape[1:]) != shape:
            raise KDGuardError(f"target {t.dataset}:{t.target} has no uint8 references of shape {shape}",
                               "select them with select_references on the converted dataset")
    if shadow.dtype != torch.uint8 or shadow.dim() != 4 or tuple(shadow.shape[1:]) != shape:
        raise KDGuardError(f"shadow images have dtype {shadow.dtype} and shape {tuple(shadow.shape)}, "
                           f"expected uint8 N×{shape[0]}×{shape[1]}×{shape[2]}",
                           "convert them with kdguard.ssl.data.to_encoder_input")
    ref_aug = reference_augment or SimCLRAugment(crop=False)
    frozen_norms = freeze_batchnorm(model.encoder) if freeze_bn else []
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    loop = SSLLoop(model, cfg, run_dir=run_dir, seed=seed, desc="badencoder", frozen=[clean], params=params)
    refs = [t.references.to(loop.device) for t in targets]
    with torch.no_grad(), loop.autocast():
        ref_clean = [clean.encoder(loop.to_input(r)).float() for r in refs]
    sizes = [len(r) for r in refs]

    def step(idx: torch.Tensor, lp: SSLLoop) -> dict[str, torch.Tensor]:
        for m in frozen_norms:
            m.eval()
        x = shadow[idx].to(lp.device)
        parts = [x] + [t.trigger(x) for t in targets]
        batch = [lp.to_input(p) for p in parts] + [lp.to_input(r) for r in refs]
        if augment_references:
            batch += [lp.layout(ref_aug(r, lp.generator)) for r in refs]
        feats = model.encoder(torch.cat(batch)).float()
        n = len(x)
        pieces = list(feats.split([n] * len(parts) + sizes + (sizes if augment_references else [])))
        feat, feat_bd = pieces[0], pieces[1:len(parts)]
        feat_ref = pieces[len(parts):len(parts) + len(refs)]
        feat_seen = pieces[len(parts) + len(refs):] if augment_references else feat_ref
        with torch.no_grad():
            feat_clean = clean.encoder(lp.to_input(x)).float()
        terms = badencoder_terms(feat, feat_clean, feat_bd, feat_ref, feat_seen, ref_clean)
        return {"l0": terms["l0"], "l1": lambda1 * terms["l1"], "l2": lambda2 * terms["l2"]}

    return loop.fit(len(shadow), step)
