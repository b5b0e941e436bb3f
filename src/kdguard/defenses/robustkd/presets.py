"""Teacher → student pairs for RobustKD: the paper's settings and CPU-scale ones.

The pairs are the shipped file ``kdguard/configs/robustkd/pairs.yaml``. The paper settings are
``--paper_setting`` of the reference's ``load_settings.py`` (the CIFAR-100 pairs of the
overhaul-distillation code, Heo et al. 2019). PyramidNet-200/110 (settings e, f)
are not built into kdguard and are listed as unavailable; ResNet-50 → ResNet-18 ("test-c") needs
an ImageNet-style ResNet-50 that kdguard does not ship either.

The CPU pairs are kdguard's: small enough to train teachers and distil students on a 2-core
machine in minutes per epoch (platform notes: ResNet-20 ≈ 1 min, WRN-16-2 ≈ 2 min per CIFAR-10
epoch with bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import TrainConfig
from ...errors import KDGuardError, unknown_name
from ...presets import load_table


@dataclass(frozen=True)
class PairPreset:
    """A teacher/student pair.

    Attributes:
        teacher, student: model names for :func:`kdguard.models.build_model`.
        source: where the pair comes from.
        available: False when an architecture is not built into kdguard.
    """

    teacher: str
    student: str
    source: str
    available: bool = True


#: Pair name → pair, from the shipped file ``kdguard/configs/robustkd/pairs.yaml``.
PAIRS: dict[str, PairPreset] = {
    name: PairPreset(**values)
    for name, values in load_table("robustkd/pairs.yaml", PairPreset, complete=True).items()}

#: distillation settings of the reference ``train_with_distillation.py`` (300 epochs, batch 64,
#: SGD nesterov lr 0.1, momentum 0.9, wd 5e-4, lr ÷10 at 1/2 and ÷100 at 3/4 of training): the
#: entry ``paper`` of the shipped file ``kdguard/configs/robustkd/training.yaml``
PAPER_TRAINING: dict[str, Any] = load_table("robustkd/training.yaml", TrainConfig)["paper"]


def get_pair(name: str) -> PairPreset:
    """The pair named ``name`` (``-``/``_`` and case are ignored).

    Raises:
        KDGuardError: unknown name, or a pair whose architectures kdguard does not build.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in PAIRS:
        raise unknown_name("RobustKD pair", str(name), PAIRS)
    pair = PAIRS[key]
    if not pair.available:
        raise KDGuardError(f"RobustKD pair {name!r} needs {pair.teacher}/{pair.student}, which kdguard "
                           "does not build", "use paper_a..paper_d, paper_test_b, cpu_resnet or cpu_wrn")
    return pair
