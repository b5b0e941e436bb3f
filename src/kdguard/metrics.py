"""Clean accuracy, attack success rate and robust accuracy from one pass over the test set.

Definitions (all-to-one attack with target class ``t``; all images of the *clean* test split):

- **CA**  = mean over all test images of ``[f(x) = y]``.
- **ASR** = mean over test images with ``y ≠ t`` of ``[f(T(x)) = t]`` (the default; the target
  class is excluded because a correct prediction there is not an attack success — as in
  BackdoorBench and ABD).
- **ASR-all** = the same over *all* test images, target class included (the convention of
  BadEncoder, RobustKD and paper 1 of the brief), reported so numbers can be compared.
- **RA**  = mean over test images with ``y ≠ t`` of ``[f(T(x)) = y]`` (robust accuracy: triggered
  images still classified as their true class; BackdoorBench).
- **Target-class CA** (``target_ca``) = mean over test images with ``y = t`` of ``[f(x) = t]``:
  the clean accuracy on the target class itself (None for all-to-all attacks, where no image is
  excluded from ASR). A model that never predicts the target class scores ASR 0 without having
  unlearned the trigger; this column shows it (kdguard's addition: ABD's self-retrospection
  can remove a backdoor that way, ``docs/abd-results.md``).
- **ASR without trigger** (``asr_no_trigger``) = mean over test images with ``y ≠ t`` of
  ``[f(x) = t]``: the ASR the model scores on the clean images. A model biased towards the
  target class scores it with or without the trigger, so ``ASR − asr_no_trigger`` is the part
  of the ASR the trigger causes (kdguard's addition; a data-free student can learn such a bias
  from its synthetic data, ``docs/datafree-results.md`` §3).

For all-to-all attacks the backdoor target is ``(y + 1) mod K``, which never equals ``y``, so
the non-target set is every image and ASR = ASR-all.

``n_clean`` is the number of clean test images, ``n_backdoor`` the size of the non-target set
(the ASR/RA denominator) and ``n_backdoor_all`` that of ASR-all. Hit counts are reported too so
numbers can be pooled exactly across runs.

**Collapsed** (``collapsed``): CA at chance level for ``K = num_classes`` (the model's output
width), by :func:`at_chance`: ``CA < min(1.5/K, 1/K + 0.1·(1 − 1/K))``, i.e. less than half again
the chance rate and less than a tenth of the way from chance to perfect (the second bound only
binds for K < 6; for K = 10 the bar is 15 %). A collapsed model's ASR and RA say nothing about a
backdoor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data.batches import to_float
from .runtime import autocast, eval_mode


@dataclass(frozen=True)
class BackdoorMetrics:
    """Metric values (fractions in [0, 1]) and the counts behind them."""

    ca: float
    asr: float | None
    asr_all: float | None
    ra: float | None
    n_clean: int
    n_backdoor: int
    n_backdoor_all: int
    clean_correct: int
    backdoor_hits: int
    backdoor_hits_all: int
    robust_correct: int
    asr_no_trigger: float | None = None
    no_trigger_hits: int = 0
    num_classes: int | None = None
    collapsed: bool | None = None   # CA at chance (at_chance); None when num_classes is unknown
    target_ca: float | None = None  # clean accuracy on the target class's own test images
    n_target: int = 0
    target_correct: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def at_chance(accuracy: float | None, num_classes: int | None) -> bool | None:
    """Whether ``accuracy`` (in [0, 1]) is at chance level for ``num_classes`` classes:
    ``accuracy < min(1.5/K, 1/K + 0.1·(1 − 1/K))`` (module docstring). ``None`` when either is
    unknown or ``K < 2``."""
    if accuracy is None or not num_classes or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    bound = min(1.5 * chance, chance + 0.1 * (1.0 - chance))
    return bool(accuracy < bound - 1e-9)  # 1.5 · 0.1 is 0.15000000000000002 in floats


def _frac(num: int, den: int) -> float | None:
    return num / den if den else None


def backdoor_metrics(labels: torch.Tensor, clean_pred: torch.Tensor,
                     backdoor_pred: torch.Tensor | None = None,
                     backdoor_target: torch.Tensor | None = None,
                     non_target: torch.Tensor | None = None, *,
                     num_classes: int | None = None) -> BackdoorMetrics:
    """Compute CA/ASR/ASR-all/RA from predictions.

    Args:
        labels: ``N`` int64 true labels of the clean test images.
        clean_pred: ``N`` predictions on the clean images.
        backdoor_pred: ``N`` predictions on the triggered images (``None``: no attack; ASR/RA
            are then ``None``).
        backdoor_target: ``N`` attack target label of each image (all-to-one: the constant
            target; all-to-all: ``(y+1) mod K``).
        non_target: ``N`` bool, the images that count for ASR and RA (``y ≠ target``).
        num_classes: the model's number of classes, for ``collapsed`` (None: not judged).
    """
    clean_correct = int((clean_pred == labels).sum())
    n = int(labels.numel())
    ca = _frac(clean_correct, n) or 0.0
    chance = dict(num_classes=num_classes, collapsed=at_chance(ca, num_classes) if n else None)
    if backdoor_pred is None:
        return BackdoorMetrics(ca, None, None, None, n, 0, 0, clean_correct, 0, 0, 0, **chance)
    assert backdoor_target is not None and non_target is not None
    hits = backdoor_pred == backdoor_target
    hits_nt = int((hits & non_target).sum())
    hits_all = int(hits.sum())
    robust = int(((backdoor_pred == labels) & non_target).sum())
    no_trigger = int(((clean_pred == backdoor_target) & non_target).sum())
    n_nt = int(non_target.sum())
    target = ~non_target
    n_target = int(target.sum())
    target_correct = int(((clean_pred == labels) & target).sum())
    return BackdoorMetrics(
        ca=ca, asr=_frac(hits_nt, n_nt), asr_all=_frac(hits_all, n),
        ra=_frac(robust, n_nt), n_clean=n, n_backdoor=n_nt, n_backdoor_all=n,
        clean_correct=clean_correct, backdoor_hits=hits_nt, backdoor_hits_all=hits_all,
        robust_correct=robust, asr_no_trigger=_frac(no_trigger, n_nt), no_trigger_hits=no_trigger, **chance,
        target_ca=_frac(target_correct, n_target), n_target=n_target, target_correct=target_correct)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512,
            device: torch.device | str = "cpu", bf16: bool = False, channels_last: bool = False,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Argmax predictions for uint8 ``N×C×H×W`` images (``transform`` applied to each uint8 batch)."""
    return _predict(model, images, batch_size=batch_size, device=device, bf16=bf16,
                    channels_last=channels_last, transform=transform)[0]


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device | str,
             bf16: bool, channels_last: bool,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, int | None]:
    """:func:`predict` and the width of the model's output (its number of classes; None for no images)."""
    device = torch.device(device)
    preds = []
    width = None
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if transform is not None:
                batch = transform(batch)
            x = to_float(batch, device, channels_last=channels_last)
            with autocast(device, bf16):
                logits = model(x)
            width = int(logits.shape[-1])
            preds.append(logits.argmax(1).cpu())
    return (torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)), width


def evaluate_backdoor(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                      trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      backdoor_target: torch.Tensor | None = None,
                      non_target: torch.Tensor | None = None, batch_size: int = 512,
                      device: torch.device | str = "cpu", bf16: bool = False,
                      channels_last: bool = False) -> BackdoorMetrics:
    """One pass over the clean test images and their triggered copies.

    ``images`` are uint8 ``N×C×H×W``; ``trigger`` maps a uint8 batch to its triggered copy.
    Without a trigger only CA is computed.
    """
    kw = dict(batch_size=batch_size, device=device, bf16=bf16, channels_last=channels_last)
    clean_pred, num_classes = _predict(model, images, **kw)
    if trigger is None:
        return backdoor_metrics(labels, clean_pred, num_classes=num_classes)
    bd_pred = predict(model, images, transform=trigger, **kw)
    return backdoor_metrics(labels, clean_pred, bd_pred, backdoor_target, non_target, num_classes=num_classes)
