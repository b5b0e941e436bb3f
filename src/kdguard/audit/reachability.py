"""Per-class reachability: the smallest universal trigger that sends other classes' images to k.

Neural Cleanse (Wang et al., S&P 2019, §IV-B/C). For each class ``k`` a mask ``m ∈ [0, 1]^{1×H×W}``
(shared by the channels) and a pattern ``p ∈ [0, 1]^{C×H×W}`` are optimised so that the stamped
image (the paper's trigger-injection function ``A(x, m, Δ)``)::

    x' = (1 − m) ⊙ x + m ⊙ p

is classified as ``k``, while the mask stays small (the paper's optimisation objective)::

    min_{m,p}  CE(f(x'), k) + λ · |m|₁          over clean images x whose label is not k

with ``|m|₁ = Σ_{h,w} m_{hw}`` (in pixels). Both are box-constrained through ``tanh``:
``m = (tanh(a) + 1) / 2``, ``p = (tanh(b) + 1) / 2``, and ``a, b`` are optimised with Adam.

λ schedule (the paper adjusts λ during the optimisation so that more than 99 % of the stamped
clean images reach ``k``; the constants are the defaults of the authors' public release, its
visualizer with λ reset to zero at the start; :class:`TriggerSearch` documents each). λ starts at
0, so the first epochs only look for *a* trigger. Once the epoch's attack success has been
≥ ``success_threshold`` for ``patience`` epochs, λ becomes ``init_cost``. From then on, after
``patience`` epochs in a row at or above the threshold λ is multiplied by ``cost_up``, after
``patience`` epochs in a row below it λ is divided by ``cost_down``. The trigger kept is the one
with the smallest ``|m|₁`` among the epochs whose success reached the threshold.

Stopping: after ``epochs`` epochs, or earlier once λ is set and the best ``|m|₁`` has not
improved by more than ``early_stop_rel`` (relative) for ``early_stop_patience`` epochs in a row
while the success is at the threshold.

Where kdguard differs from the paper / release:

* Only images of the other classes are stamped (the release uses all clean images, class ``k``'s
  own included), since the success rate is defined on them.
* The model takes ``[0, 1]`` images (kdguard's convention), so the pattern lives in that scale;
  the L1 norm of the mask is in pixels.
* The clean images of the other classes are split once (by a fixed :class:`torch.Generator`)
  into an optimisation share and a held-out share; the reported success rate is measured on
  the held-out share, so it is not the optimisation's own success.
* An epoch is one pass over the optimisation share in a freshly shuffled order (generator-driven).
* The success in the schedule is the fraction of the epoch's stamped images classified as ``k``
  before each step, as in the release.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..datafree.student import frozen
from ..errors import KDGuardError


@dataclass(frozen=True)
class TriggerSearch:
    """Settings of the mask/pattern search (defaults: the Neural Cleanse release, 32×32 inputs).

    Attributes:
        epochs: upper bound on passes over the optimisation share per class.
        batch_size: stamped images per Adam step.
        lr: Adam learning rate on the ``tanh`` parameters (release: 0.1, betas (0.5, 0.9)).
        init_cost: the first non-zero λ (release: 1e-3).
        success_threshold: attack success that counts as reached (paper: 0.99).
        patience: epochs in a row above/below the threshold before λ changes (release: 5).
        cost_up: factor on λ after ``patience`` successful epochs (release: 1.5).
        cost_down: divisor of λ after ``patience`` failed epochs (release: 1.5 ** 1.5).
        early_stop_patience: epochs without improvement before stopping (release: 10).
        early_stop_rel: relative improvement of the best ``|m|₁`` that resets that count
            (release: 1 %, ``0.01``).
        holdout: share of the other classes' images kept out of the optimisation to measure
            the reported success rate (kdguard's choice; not in the paper).
    """

    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.1
    init_cost: float = 1e-3
    success_threshold: float = 0.99
    patience: int = 5
    cost_up: float = 1.5
    cost_down: float = 1.5 ** 1.5
    early_stop_patience: int = 10
    early_stop_rel: float = 0.01
    holdout: float = 0.2

    def __post_init__(self) -> None:
        _check_settings(self, ("epochs", "batch_size", "patience", "early_stop_patience"), "0.99")
        for name in ("lr", "init_cost"):
            if not getattr(self, name) > 0:
                raise KDGuardError(f"trigger search {name} {getattr(self, name)!r} must be > 0",
                                   f"give a positive {name}")
        if not (self.cost_up > 1 and self.cost_down > 1):
            raise KDGuardError("cost_up and cost_down must both be > 1",
                               "use the defaults 1.5 and 1.5 ** 1.5")


def _check_settings(settings, counts: tuple[str, ...], share: str) -> None:
    """The checks both searches share: positive integer ``counts``, a success threshold in
    (0, 1] and a holdout share in (0, 1)."""
    for name in counts:
        if int(getattr(settings, name)) < 1:
            raise KDGuardError(f"{name} {getattr(settings, name)!r} must be >= 1",
                               f"give a positive integer {name}")
    if not (0 < settings.success_threshold <= 1):
        raise KDGuardError(f"success threshold {settings.success_threshold!r} is outside (0, 1]",
                           f"give a share such as {share}")
    if not (0 < settings.holdout < 1):
        raise KDGuardError(f"holdout share {settings.holdout!r} is outside (0, 1)",
                           "give a share such as 0.2")


@dataclass
class ClassTrigger:
    """The reverse-engineered trigger of one class.

    Attributes:
        target: the class ``k``.
        mask: ``1×H×W`` float in ``[0, 1]`` (CPU).
        pattern: ``C×H×W`` float in ``[0, 1]`` (CPU).
        l1: ``|mask|₁``, in pixels (the size fed to the anomaly index).
        success: share of the held-out clean images of other classes that the stamped
            trigger sends to ``k`` (in ``[0, 1]``).
        reached: whether some epoch reached ``success_threshold`` on the optimisation share;
            if not, ``mask``/``pattern`` are those of the last epoch and ``l1`` is their size.
        epochs: epochs run.
        final_cost: λ at the end.
    """

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    l1: float
    success: float
    reached: bool
    epochs: int
    final_cost: float


def check_clean_set(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Validate clean images and labels; returns the images as float ``N×C×H×W`` in ``[0, 1]``.

    Args:
        images: ``N×C×H×W`` uint8 (0–255) or float (must lie in ``[0, 1]``).
        labels: ``N`` integer class labels.

    Raises:
        KDGuardError: wrong shape or dtype, float values outside ``[0, 1]``, mismatched lengths,
            or fewer than two distinct classes among the labels.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise KDGuardError(f"clean images must be a non-empty N×C×H×W tensor, got {shape}",
                           "pass the clean share's images (uint8 0-255 or float 0-1)")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        lo, hi = float(images.min()), float(images.max())
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise KDGuardError(f"float clean images must lie in [0, 1], got values in [{lo:g}, {hi:g}]",
                               "divide 0-255 images by 255 or pass them as uint8")
        x = images.float()
    else:
        raise KDGuardError(f"cannot use a {images.dtype} tensor as clean images",
                           "pass uint8 images (0-255) or float images in [0, 1]")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or len(labels) != len(images) \
            or labels.is_floating_point():
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise KDGuardError(f"clean labels must be {len(images)} integer class labels, got {got}",
                           "pass one integer label per image")
    if labels.unique().numel() < 2:
        raise KDGuardError(f"the clean images hold one class only ({int(labels[0])}); a trigger for "
                           "a class is searched on images of the other classes",
                           "pass clean images of at least 2 classes")
    return x


def _check_target(net: nn.Module, x: torch.Tensor, others: torch.Tensor, target: int,
                  device: torch.device) -> None:
    k_count = _num_classes(net, x.to(device))
    if not (0 <= int(target) < k_count):
        raise KDGuardError(f"target class {target!r} is outside [0, {k_count})",
                           f"pick a class of the model's {k_count}")
    if len(others) < 2:
        raise KDGuardError(f"only {len(others)} clean image(s) of classes other than {target}; "
                           "the search needs images to optimise on and held-out ones to measure "
                           "success", "pass at least 2 clean images of other classes")


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _split(n: int, holdout: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    n_hold = min(n - 1, max(1, round(holdout * n)))
    return order[n_hold:], order[:n_hold]


@torch.no_grad()
def stamped_success(model: nn.Module, images: torch.Tensor, mask: torch.Tensor,
                    pattern: torch.Tensor, target: int, *, batch_size: int = 256) -> float:
    """Share of ``images`` (float ``N×C×H×W`` in ``[0, 1]``) classified as ``target`` once
    stamped with ``mask`` (``1×H×W``) and ``pattern`` (``C×H×W``): ``(1 − m)·x + m·p``."""
    device = mask.device
    hits = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        hits += int((model((1 - mask) * x + mask * pattern).argmax(1) == target).sum())
    return hits / len(images)


def reverse_trigger(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, *,
                    search: TriggerSearch = TriggerSearch(), generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> ClassTrigger:
    """Neural Cleanse's trigger for one class ``target`` (see the module docstring).

    Args:
        model: classifier taking float ``N×C×H×W`` in ``[0, 1]``, returning ``N×K`` logits. It is
            used in eval mode with frozen parameters; its mode and ``requires_grad`` flags are
            restored afterwards.
        images: clean ``N×C×H×W`` images, uint8 (0–255) or float (0–1).
        labels: ``N`` integer labels.
        target: the class ``k`` to reach, in ``[0, K)``.
        search: optimisation settings.
        generator: CPU generator for the split, the initialisation and the batch order
            (default: seeded with 0).
        device: where to optimise (default: the device of the model's parameters; the model
            is not moved).

    Raises:
        KDGuardError: bad images/labels (see :func:`check_clean_set`), ``target`` out of range,
            or fewer than 2 clean images of classes other than ``target``.
    """
    x = check_clean_set(images, labels)
    dev = _device(model, device)
    others = x[labels != int(target)]
    with _Frozen(model) as net:
        _check_target(net, x, others, target, dev)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return _search(net, others, int(target), search, gen, dev)


def reverse_all(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                classes: list[int] | None = None, search: TriggerSearch = TriggerSearch(),
                seed: int = 0, device: torch.device | str | None = None) -> list[ClassTrigger]:
    """:func:`reverse_trigger` for every class (or ``classes``), each from its own generator
    seeded with ``seed + k`` so that one class's result does not depend on which others run.

    Returns:
        One :class:`ClassTrigger` per class, in class order; feed ``[t.l1 for t in ...]`` to
        :func:`kdguard.audit.anomaly.anomaly_index`.

    Raises:
        KDGuardError: as :func:`reverse_trigger`.
    """
    x = check_clean_set(images, labels)
    if classes is None:
        with _Frozen(model) as net:
            classes = list(range(_num_classes(net, x.to(_device(model, device)))))
    return [reverse_trigger(model, x, labels, k, search=search, device=device,
                            generator=torch.Generator().manual_seed(seed + k)) for k in classes]


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def _Frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Context: ``model`` in eval mode without parameter gradients (:func:`kdguard.datafree.student.frozen`),
    its mode restored on exit."""
    training = model.training
    model.eval()
    try:
        with frozen(model):
            yield model
    finally:
        model.train(training)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``(tanh(t) + 1) / 2``: an unconstrained parameter mapped into ``[0, 1]``."""
    return (torch.tanh(t) + 1) / 2


def _search(net: nn.Module, others: torch.Tensor, target: int, s: TriggerSearch,
            gen: torch.Generator, device: torch.device) -> ClassTrigger:
    fit_idx, hold_idx = _split(len(others), s.holdout, gen)
    fit, held = others[fit_idx], others[hold_idx]
    _, c, h, w = others.shape
    # initial mask/pattern uniform in [0, 1] (as the release), mapped through atanh; the clamp
    # keeps atanh finite
    m0 = torch.rand(1, h, w, generator=gen).clamp(0.01, 0.99)
    p0 = torch.rand(c, h, w, generator=gen).clamp(0.01, 0.99)
    a = torch.atanh(2 * m0 - 1).to(device).requires_grad_(True)
    b = torch.atanh(2 * p0 - 1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=s.lr, betas=(0.5, 0.9))
    cost, cost_set = 0.0, False
    up = down = 0
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    stall, best_ref = 0, math.inf
    epoch = 0
    for epoch in range(1, s.epochs + 1):
        order = torch.randperm(len(fit), generator=gen)
        hits = 0
        for start in range(0, len(fit), s.batch_size):
            xb = fit[order[start:start + s.batch_size]].to(device)
            mask = _unit(a)
            pattern = _unit(b)
            logits = net((1 - mask) * xb + mask * pattern)
            tgt = torch.full((len(xb),), target, dtype=torch.long, device=device)
            loss = F.cross_entropy(logits, tgt) + cost * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += int((logits.detach().argmax(1) == target).sum())
        success = hits / len(fit)
        with torch.no_grad():
            mask = _unit(a)
            l1 = float(mask.sum())
            if success >= s.success_threshold and (best is None or l1 < best[0]):
                best = (l1, mask.detach().cpu().clone(), _unit(b).cpu().clone())
        # λ schedule
        if not cost_set:
            up = up + 1 if success >= s.success_threshold else 0
            if up >= s.patience:
                cost, cost_set, up, down = s.init_cost, True, 0, 0
        else:
            if success >= s.success_threshold:
                up, down = up + 1, 0
            else:
                up, down = 0, down + 1
            if up >= s.patience:
                cost, up = cost * s.cost_up, 0
            elif down >= s.patience:
                cost, down = cost / s.cost_down, 0
        # early stop once λ is live and the best size has settled
        if cost_set and best is not None:
            if best[0] < best_ref * (1 - s.early_stop_rel):
                best_ref, stall = best[0], 0
            else:
                stall += 1
            if stall >= s.early_stop_patience and success >= s.success_threshold:
                break
    if best is None:
        with torch.no_grad():
            mask = _unit(a).cpu()
            pattern = _unit(b).cpu()
        l1, reached = float(mask.sum()), False
    else:
        l1, mask, pattern = best
        reached = True
    success = stamped_success(net, held, mask.to(device), pattern.to(device), target)
    return ClassTrigger(target=target, mask=mask, pattern=pattern, l1=l1, success=success,
                        reached=reached, epochs=epoch, final_cost=cost)


@dataclass(frozen=True)
class AdditiveSearch:
    """Settings of the additive (L∞) form; all constants are kdguard's own choices.

    Attributes:
        eps_max: largest L∞ budget tried, in ``[0, 1]`` pixel units (0.25 ≈ 64/255).
        success_threshold: share of other classes' images sent to the class that counts as
            reached (the audit's 90 %).
        steps: signed-gradient steps per budget, one mini-batch each.
        step_frac: step size as a share of the budget ε (each step moves δ by ``step_frac·ε``).
        bisections: halvings of the budget interval after ``eps_max`` reached the threshold
            (resolution ``eps_max / 2**bisections``).
        batch_size: images per step.
        holdout: share of the other classes' images kept to measure the reported success.
        grid: 0 (default) searches a dense δ, one value per pixel and channel; ``g > 0`` a smooth
            one: ``C×g×g`` control values in ``[−ε, ε]`` upsampled bilinearly (corners aligned)
            to ``H×W``, so ``‖δ‖∞ ≤ ε`` still and δ holds no detail finer than ``H/(g−1)``
            pixels (``g`` above ``min(H, W)`` is capped there). Universal adversarial
            perturbations of natural classes lean on fine texture; full-image triggers such as
            SIG's sinusoid or a low-frequency pattern do not, so the smooth form separates
            them better (``docs/audit.md``).
    """

    eps_max: float = 0.25
    success_threshold: float = 0.9
    steps: int = 30
    step_frac: float = 0.125
    bisections: int = 5
    batch_size: int = 64
    holdout: float = 0.2
    grid: int = 0

    @property
    def resolution(self) -> float:
        """The budget grid's step, ``eps_max / 2**bisections``: budgets found differ by multiples
        of it, so it is the least spread between classes that means anything."""
        return self.eps_max / 2 ** self.bisections

    def __post_init__(self) -> None:
        if int(self.grid) != self.grid or self.grid < 0 or self.grid == 1:
            raise KDGuardError(f"additive grid {self.grid!r} must be 0 (dense) or an integer >= 2",
                               "use 0, or a grid of 16 for a smooth perturbation (audit.smooth_grid)")
        if not (0 < self.eps_max <= 1):
            raise KDGuardError(f"eps_max {self.eps_max!r} is outside (0, 1]",
                               "give an L-inf budget in [0, 1] pixel units such as 0.25")
        _check_settings(self, ("steps", "batch_size"), "0.9")
        if int(self.bisections) < 0 or not (0 < self.step_frac <= 1):
            raise KDGuardError("bisections must be >= 0 and step_frac in (0, 1]",
                               "use the defaults 5 and 0.125")


@dataclass
class AdditiveTrigger:
    """The smallest universal additive perturbation found for one class.

    Attributes:
        target: the class ``k``.
        delta: ``C×H×W`` float with ``|δ| ≤ eps`` (CPU); images become ``clamp(x + δ, 0, 1)``.
        eps: the smallest budget (L∞, ``[0, 1]`` pixel units) whose δ reached
            ``success_threshold`` on the optimisation share; ``eps_max`` when none did.
        success: held-out share of other classes' images sent to ``k`` by ``delta``.
        reached: whether some budget reached the threshold.
    """

    target: int
    delta: torch.Tensor
    eps: float
    success: float
    reached: bool


def smooth_grid(grid: int, height: int, width: int) -> tuple[int, int]:
    """The control grid ``(g_h, g_w)`` of a smooth δ: ``grid`` capped at the image size."""
    return min(int(grid), height), min(int(grid), width)


def upsample_perturbation(control: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``C×g_h×g_w`` control values → the ``C×H×W`` perturbation (bilinear, corners aligned: every
    value is a convex combination of control values, so the L∞ bound carries over)."""
    if tuple(control.shape[1:]) == tuple(size):
        return control
    return F.interpolate(control[None], size=size, mode="bilinear", align_corners=True)[0]


def _additive_at(net: nn.Module, fit: torch.Tensor, target: int, eps: float, s: AdditiveSearch,
                 seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Projected signed-gradient descent (Madry et al., ICLR 2018; here targeted and universal)
    on ``CE(f(clamp(x + δ, 0, 1)), k)`` with ``‖δ‖∞ ≤ eps`` (on δ's control values when
    ``s.grid`` is set); returns δ (``C×H×W``) and its success on ``fit``."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = fit.shape[1:]
    shape = (c, *smooth_grid(s.grid, h, w)) if s.grid else (c, h, w)
    control = ((torch.rand(shape, generator=gen) * 2 - 1) * eps).to(device).requires_grad_(True)
    step = s.step_frac * eps
    for _ in range(s.steps):
        idx = torch.randint(len(fit), (min(s.batch_size, len(fit)),), generator=gen)
        xb = fit[idx].to(device)
        logits = net((xb + upsample_perturbation(control, (h, w))).clamp(0, 1))
        tgt = torch.full((len(xb),), target, dtype=torch.long, device=device)
        grad, = torch.autograd.grad(F.cross_entropy(logits, tgt), control)
        with torch.no_grad():
            control.sub_(step * grad.sign()).clamp_(-eps, eps)
    with torch.no_grad():
        delta = upsample_perturbation(control.detach(), (h, w))
    return delta.cpu(), _additive_success(net, fit, delta, target)


@torch.no_grad()
def _additive_success(net: nn.Module, images: torch.Tensor, delta: torch.Tensor, target: int,
                      batch_size: int = 256) -> float:
    hits = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(delta.device)
        hits += int((net((x + delta).clamp(0, 1)).argmax(1) == target).sum())
    return hits / len(images)


def additive_trigger(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, *,
                     search: AdditiveSearch = AdditiveSearch(), seed: int = 0,
                     device: torch.device | str | None = None) -> AdditiveTrigger:
    """The smallest L∞ budget ε whose universal δ sends ``success_threshold`` of the other
    classes' images to ``target``, by bisection on ε (an additive counterpart of the mask form;
    not in Neural Cleanse).

    Each budget is optimised from its own seed, so the result does not depend on the order of
    the bisection; success is assumed monotone in ε (bisection's premise; it need not hold
    exactly). The reported ``success`` is measured on a held-out share.

    Args:
        model, images, labels, target, device: as :func:`reverse_trigger`.
        search: the budget, steps and threshold.
        seed: seed of the split and of every budget's initialisation and batches.

    Raises:
        KDGuardError: as :func:`reverse_trigger`.
    """
    x = check_clean_set(images, labels)
    dev = _device(model, device)
    others = x[labels != int(target)]
    with _Frozen(model) as net:
        _check_target(net, x, others, target, dev)
        fit_idx, hold_idx = _split(len(others), search.holdout, torch.Generator().manual_seed(seed))
        fit, held = others[fit_idx], others[hold_idx]
        delta, ok = _additive_at(net, fit, int(target), search.eps_max, search, seed, dev)
        reached = ok >= search.success_threshold
        eps = search.eps_max
        if reached:
            lo, hi = 0.0, search.eps_max
            for _ in range(search.bisections):
                mid = (lo + hi) / 2
                d_mid, ok = _additive_at(net, fit, int(target), mid, search, seed, dev)
                if ok >= search.success_threshold:
                    hi, delta = mid, d_mid
                else:
                    lo = mid
            eps = hi
        success = _additive_success(net, held, delta.to(dev), int(target))
    return AdditiveTrigger(target=int(target), delta=delta, eps=eps, success=success, reached=reached)
