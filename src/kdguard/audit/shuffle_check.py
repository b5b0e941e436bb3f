"""Shuffle disagreement: does a class's universal trigger survive ABD's channel shuffling?

The Shuffling Vaccine's premise (Hong et al., ICML 2023, §4.1): a backdoor rides on a few
channels, clean evidence on many, so permuting the input channels of a model's last convolutions
(:class:`kdguard.abd.shuffle.ShuffledTeacher`) wrecks the clean function but tends to leave the
trigger → target shortcut standing. The audit turns that premise into a per-class statistic:

* ``collapse share`` of class ``k``: the share of the clean images of the other classes that the
  shuffled ensemble ``T̃`` sends to ``k``. A backdoored teacher, shuffled, sends almost all of
  them to its target (the intact shortcut is all that is left); a clean one spreads its errors
  over a few natural classes. This share is the audit's shuffle signal (above ``collapse``);
* ``agreement`` of a set of images: the share on which ``T̃`` predicts the same class as the
  teacher ``T``; ``divergence``: the median of ABD's per-sample ``KL(p_T ‖ p_T̃) / K``
  (:func:`kdguard.abd.vaccine.divergence_per_sample`);
* for every class ``k``, the images of the other classes stamped with ``k``'s reconstructed trigger:
  the share ``T̃`` sends to ``k`` and its *lift* over the collapse share (recorded for analysis).

Several independent shuffles (``rounds``) are averaged, since one draw of permutations can hit or
miss the backdoor's channels (ABD re-shuffles on a failed verification for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..abd.shuffle import ShuffledTeacher
from ..abd.vaccine import divergence_per_sample
from ..errors import KDGuardError


@dataclass(frozen=True)
class ShuffleCheck:
    """Settings of the shuffle test (ABD's vaccine defaults for the layers and the ensemble).

    Attributes:
        layers: channel-mixing layers shuffled, counted from the output side (ABD: 5).
        ensemble: shuffled copies averaged into ``T̃`` (ABD: 3).
        rounds: independent shuffles averaged (kdguard's choice).
        batch_size: images per forward pass.
        collapse: the share of the other classes' clean images the shuffled ensembles must send
            to one class for the shuffle signal on it (kdguard's choice: most of them).
    """

    layers: int = 5
    ensemble: int = 3
    rounds: int = 3
    batch_size: int = 256
    collapse: float = 0.5

    def __post_init__(self) -> None:
        for name in ("ensemble", "rounds", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise KDGuardError(f"shuffle check {name} {getattr(self, name)!r} must be >= 1",
                                   f"give a positive integer {name}")
        if int(self.layers) == 0:
            raise KDGuardError("shuffle check layers must not be 0", "use ABD's default 5")
        if not 0 < self.collapse < 1:
            raise KDGuardError(f"shuffle collapse share {self.collapse!r} is outside (0, 1)", "give a share such as 0.5")


@dataclass
class ShuffleStats:
    """What the shuffled ensembles do on one image set (averaged over the rounds).

    Attributes:
        agreement: share in ``[0, 1]`` of images on which ``argmax T̃ = argmax T``.
        divergence: median per-sample ``KL(p_T ‖ p_T̃) / K`` (nats per class, ≥ 0).
        n: images measured.
        target_rate: for a class's stamped images, the share ``T̃`` sends to that class.
        lift: :attr:`target_rate` minus the share of the clean images of the other classes that
            ``T̃`` sends to the class anyway (its base rate: a shuffled model often collapses
            onto a few classes, which then "agree" on anything).
    """

    agreement: float
    divergence: float
    n: int
    target_rate: float | None = None
    lift: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return {"agreement": self.agreement, "divergence": self.divergence, "n": self.n,
                "target_rate": self.target_rate, "lift": self.lift}


class ShuffleProbe:
    """``rounds`` shuffled ensembles of one teacher, built once and applied to many image sets.

    Args:
        teacher: the frozen classifier (float ``N×C×H×W`` in ``[0, 1]`` → ``N×K`` logits), in
            eval mode.
        example: one valid input batch (float ``N×C×H×W``), to find the shuffled layers.
        check: the settings.
        seed: seeds the permutations of round ``r`` with ``seed + r``.

    Raises:
        KDGuardError: as :class:`~kdguard.abd.shuffle.ShuffledTeacher` (a model without layers
            that mix channels or features, a forward pass failing on ``example``).
    """

    def __init__(self, teacher: nn.Module, example: torch.Tensor, check: ShuffleCheck = ShuffleCheck(),
                 seed: int = 0) -> None:
        self.teacher = teacher
        self.check = check
        self.shuffled = [ShuffledTeacher(teacher, example, layers=check.layers, ensemble=check.ensemble,
                                         generator=torch.Generator().manual_seed(seed + r)).eval()
                         for r in range(check.rounds)]

    @property
    def paths(self) -> list[str]:
        """Module paths of the shuffled layers."""
        return list(self.shuffled[0].paths)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions on float ``N×C×H×W`` images in ``[0, 1]`` (``N ≥ 1``).

        Returns:
            ``(teacher, shuffled, divergence)``: the teacher's classes (int64 ``N``), each round's
            ensemble classes (int64 ``R×N``) and per-sample divergences (float32 ``R×N``), on CPU.
        """
        if len(images) == 0:
            raise KDGuardError("the shuffle check got no images", "pass at least one image")
        device = next(self.teacher.parameters()).device
        t_pred, s_pred, divs = [], [], []
        for start in range(0, len(images), self.check.batch_size):
            x = images[start:start + self.check.batch_size].to(device)
            t = self.teacher(x).float()
            outs = [shuffled(x).float() for shuffled in self.shuffled]
            t_pred.append(t.argmax(1).cpu())
            s_pred.append(torch.stack([s.argmax(1) for s in outs]).cpu())
            divs.append(torch.stack([divergence_per_sample(t, s) for s in outs]).cpu())
        return torch.cat(t_pred), torch.cat(s_pred, 1), torch.cat(divs, 1)

    def measure(self, images: torch.Tensor, target: int | None = None,
                base_rate: float | None = None) -> ShuffleStats:
        """Agreement and median divergence on ``images``; with ``target`` also the share sent to
        it and, with ``base_rate`` (the share of clean other-class images sent to it), the lift."""
        t_pred, s_pred, divs = self.predict(images)
        agreement = float((s_pred == t_pred).float().mean())
        divergence = float(divs.median(dim=1).values.mean())
        rate = float((s_pred == target).float().mean()) if target is not None else None
        lift = rate - base_rate if rate is not None and base_rate is not None else None
        return ShuffleStats(agreement, divergence, len(images), rate, lift)

    def base_rates(self, images: torch.Tensor, labels: torch.Tensor, classes: int) -> list[float]:
        """Per class ``k``: the share of ``images`` of other classes that the shuffled ensembles
        send to ``k`` (averaged over the rounds); ``labels``: int64 ``N``."""
        _, s_pred, _ = self.predict(images)
        rates = []
        for k in range(classes):
            others = labels != k
            rates.append(float((s_pred[:, others] == k).float().mean()) if others.any() else 0.0)
        return rates
