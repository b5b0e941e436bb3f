"""Optimising the detoxification masks ``M`` and replacements ``P`` on clean labelled data.

The released RobustKD code ships only the optimised tensors; this loop is kdguard's own
(``docs/robustkd.md``). Steps:

1. one clean pass collects per-stage statistics (:func:`~.stats.clean_feature_stats`): the mean
   map initialises ``P``, the variances feed the objective;
2. Adam on ``(Z, P)`` (``M = sigmoid(Z)``) minimises :class:`~.objective.DetoxObjective` over
   shuffled clean mini-batches for ``epochs`` epochs. The teacher stays in **eval mode** with
   frozen weights throughout (the reference leaves its teacher in train mode, so its BN
   statistics drift: a bug kdguard does not reproduce); gradients reach only ``Z`` and ``P``;
3. optionally the masks are binarised (``M > threshold`` → 1, else 0).

With the objective's adversarial term on (``adversarial_weight > 0``), each mini-batch also
runs the detoxified teacher on ``clip(x + δ)``; after the shared backward pass the masks take
their Adam descent step and the universal perturbation ``δ`` (``1×C×H×W``, started uniform in
``[−ε, ε]``) one signed ascent step ``δ ← clip_ε(δ + α·sign(∇_δ))``, so δ keeps attacking the
current detoxified teacher for about twice the cost of a plain epoch. With
``adversarial_against="teacher"``, ``δ`` instead takes ``perturbation_epochs`` passes of the
same signed ascent on the *original* teacher before step 2 and then stays fixed, so the masks
defuse one perturbation instead of chasing each new one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ...data.batches import to_float
from ...errors import KDGuardError, check_range
from ...log import bar_disabled
from ...losses.logit import kd_loss
from ...runtime import autocast
from .detox import FeatureDetox
from .objective import DetoxObjective
from .stats import StageStats, clean_feature_stats


@dataclass
class DetoxResult:
    """What :func:`detoxify` produced.

    Attributes:
        detox: the optimised :class:`FeatureDetox` (frozen).
        stats: the clean statistics it started from.
        history: one dict per epoch: mean weighted loss terms, ``clean_acc`` of the detoxified
            teacher on the training batches, ``agreement`` with the original teacher's
            predictions, ``masked`` (fraction of units with ``M > 0.5``), ``seconds``.
        seconds: wall time of the whole detoxification (statistics + optimisation).
        perturbation: the final universal perturbation ``δ`` (``1×C×H×W``, values in
            ``[−ε, ε]``) when the objective's adversarial term is on, else None.
        perturbation_history: with ``adversarial_against="teacher"``, the mean
            ``τ²·KL(T(x) ‖ T(x + δ))`` of each search pass on the original teacher; else empty.
    """

    detox: FeatureDetox
    stats: dict[str, StageStats]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    perturbation: torch.Tensor | None = None
    perturbation_history: list[float] = field(default_factory=list)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KDGuardError(f"detox {name} {value!r} is not a positive integer", f"set {name} to e.g. 10")
    return value


def _shuffled_batches(images: torch.Tensor, batch_size: int, *, generator: torch.Generator,
                      augment: Callable | None, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass in a fresh random order: ``(indices, float batch on device)`` per full batch
    (at least one), augmented when ``augment`` is given. Draws from ``generator`` only."""
    n = len(images)
    bs = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    for b in range(max(1, n // bs)):
        idx = order[b * bs:(b + 1) * bs]
        xb = images[idx]
        if augment is not None:
            xb = augment(xb, generator=generator)
        yield idx, to_float(xb, device)


def _ascend(delta: torch.Tensor, grad: torch.Tensor, objective: DetoxObjective) -> torch.Tensor:
    """One signed ascent step of ``δ``, projected back into the ε-ball: ``clip_ε(δ + α·sign(g))``."""
    eps = objective.epsilon
    return (delta + objective.adversarial_step * grad.sign()).clamp(-eps, eps)


def _search_perturbation(teacher: nn.Module, images: torch.Tensor, delta: torch.Tensor,
                         objective: DetoxObjective, *, batch_size: int, augment: Callable | None,
                         generator: torch.Generator, device: torch.device, bf16: bool) -> tuple[torch.Tensor, list[float]]:
    """Signed ascent of ``δ`` on ``τ²·KL(T(x) ‖ T(clip(x + δ)))`` of the original teacher,
    ``objective.perturbation_epochs`` passes; returns ``δ*`` and each pass's mean KL."""
    passes = []
    for _ in range(objective.perturbation_epochs):
        kls = []
        for _, x in _shuffled_batches(images, batch_size, generator=generator, augment=augment, device=device):
            with torch.no_grad(), autocast(device, bf16):
                t_logits = teacher(x).float()
            delta.requires_grad_(True)
            with autocast(device, bf16):
                a_logits = teacher((x + delta).clamp(0, 1)).float()
            kl = kd_loss(a_logits, t_logits, temperature=objective.temperature)
            (grad,) = torch.autograd.grad(kl, delta)
            with torch.no_grad():
                delta = _ascend(delta, grad, objective)
            kls.append(float(kl.detach()))
        passes.append(sum(kls) / len(kls))
    return delta, passes


def detoxify(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, paths: Sequence[str],
             objective: DetoxObjective | None = None, granularity: str = "element",
             combine: str = "replace", init_mask: float = 0.05, activation: str = "relu",
             epochs: int = 20, batch_size: int = 128, lr: float = 0.1,
             replacement_lr: float | None = None, learn_replacement: bool = True,
             binarize: float | None = None, augment: Callable | None = None,
             device: torch.device | str = "cpu", bf16: bool = False, seed: int = 0,
             progress: bool = False) -> DetoxResult:
    """Optimise a :class:`FeatureDetox` for ``teacher`` on clean ``(images, labels)``.

    Args:
        teacher: the possibly backdoored model (``N×C×H×W`` floats in [0, 1] → ``N×K``); its
            weights are not changed and get no gradient; its train/eval mode is restored after.
        images: ``N×C×H×W`` uint8 (0–255) clean images; labels: ``N`` int64.
        paths: module paths of the stages to detoxify (forward order).
        objective: the loss (default :class:`DetoxObjective` ``()``: form "dormant").
        granularity, combine, init_mask: mask options (:class:`~.detox.StageDetox`).
        activation: ``a`` of the variance statistics (``"relu"`` or ``"none"``).
        epochs, batch_size: passes over the clean data and mini-batch size.
        lr: Adam learning rate of the mask logits ``Z``; ``replacement_lr`` that of ``P``
            (default ``lr``); ``learn_replacement=False`` keeps ``P`` at the clean mean.
        binarize: threshold in (0, 1) to binarise the final masks, or None.
        augment: optional batched augmentation ``f(uint8 batch, generator=g)``.
        device: where to run; bf16: autocast the teacher's forward.
        seed: seeds the batch order and augmentation.
        progress: show a progress bar.

    Returns:
        :class:`DetoxResult`.

    Raises:
        KDGuardError: bad settings, empty or mismatched data, a path that is not a 4-D stage,
            or a loss that becomes non-finite.
    """
    t0 = time.perf_counter()
    objective = objective if objective is not None else DetoxObjective()
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    check_range("detox learning rate", float(lr), 0.0, 10.0, low_open=True)
    if labels.dim() != 1 or len(labels) != len(images):
        raise KDGuardError(f"{len(images)} clean images but labels of shape {tuple(labels.shape)}",
                           "give one int64 label per image")
    if binarize is not None:
        check_range("detox binarize threshold", float(binarize), 0.0, 1.0, low_open=True, high_open=True)
    device = torch.device(device)
    teacher.to(device)
    stats = clean_feature_stats(teacher, paths, images, device=device, activation=activation)
    detox = FeatureDetox.from_stats(stats, granularity=granularity, combine=combine,
                                    init_mask=init_mask).to(device)
    groups = [{"params": [s.mask_logits for s in detox.stages], "lr": lr}]
    if learn_replacement:
        groups.append({"params": [s.replacement for s in detox.stages],
                       "lr": lr if replacement_lr is None else replacement_lr})
    else:
        for s in detox.stages:
            s.replacement.requires_grad_(False)
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    was_training = teacher.training
    grad_flags = [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    history: list[dict[str, float]] = []
    delta = None
    if objective.adversarial:
        delta = ((torch.rand((1, *images.shape[1:]), generator=generator) * 2 - 1) * objective.epsilon).to(device)
    searched: list[float] = []
    try:
        if objective.fixed_perturbation:  # δ* on the original teacher, before any mask exists
            delta, searched = _search_perturbation(teacher, images, delta, objective, batch_size=batch_size,
                                                   augment=augment, generator=generator, device=device, bf16=bf16)
        with detox.attach(teacher, record=objective.needs_features) as hooks:
            bar = tqdm(range(epochs), desc="detox", unit="epoch", disable=bar_disabled(progress), dynamic_ncols=True)
            for epoch in bar:
                e0 = time.perf_counter()
                sums: dict[str, float] = {}
                correct = agree = seen = steps = 0
                for idx, x in _shuffled_batches(images, batch_size, generator=generator, augment=augment,
                                                device=device):
                    y = labels[idx].to(device)
                    steps += 1
                    with torch.no_grad(), autocast(device, bf16):
                        hooks.enabled = False
                        t_logits = teacher(x).float()
                        hooks.enabled = True
                    with autocast(device, bf16):
                        d_logits = teacher(x).float()
                    features = dict(hooks.outputs) if objective.needs_features else None
                    a_logits = None
                    if delta is not None:
                        delta.requires_grad_(not objective.fixed_perturbation)
                        with autocast(device, bf16):
                            a_logits = teacher((x + delta).clamp(0, 1)).float()
                    masks = {p: s.mask() for p, s in zip(detox.paths, detox.stages)}
                    losses = objective(d_logits, t_logits, y, masks, stats, granularity=granularity,
                                       features=features, adversarial_logits=a_logits)
                    loss = sum(losses.values())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if delta is not None and not objective.fixed_perturbation:
                        # ascent on the same loss: δ attacks what the masks defend
                        with torch.no_grad():
                            delta = _ascend(delta, delta.grad, objective)
                    hooks.outputs = {}
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    pred = d_logits.argmax(1)
                    correct += int((pred == y).sum())
                    agree += int((pred == t_logits.argmax(1)).sum())
                    seen += len(y)
                record = {k: v / steps for k, v in sums.items()}
                if not all(math.isfinite(v) for v in record.values()):
                    raise KDGuardError(f"detox loss became non-finite in epoch {epoch + 1}: {record}",
                                       "lower detox.lr")
                masks_now = detox.masks().values()
                units = sum(m.numel() for m in masks_now)
                record.update(epoch=epoch + 1, clean_acc=correct / seen, agreement=agree / seen,
                              masked=sum(float((m > 0.5).sum()) for m in masks_now) / units,
                              seconds=time.perf_counter() - e0)
                history.append(record)
                bar.set_postfix(acc=f"{record['clean_acc']:.3f}", masked=f"{record['masked']:.3f}")
    finally:
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)
    if binarize is not None:
        detox.binarize(binarize)
    detox.freeze()
    return DetoxResult(detox=detox, stats=stats, history=history, seconds=time.perf_counter() - t0,
                       perturbation=None if delta is None else delta.detach().cpu(),
                       perturbation_history=searched)
