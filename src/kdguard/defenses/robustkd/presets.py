"""Teacher → student pairs for RobustKD: the paper's settings and CPU-scale ones.

The paper settings are ``--paper_setting`` of the reference's ``load_settings.py`` (the CIFAR-100
pairs of the overhaul-distillation code, Heo et al. 2019). PyramidNet-200/110 (settings e, f)
are not built into kdguard and are listed as unavailable; ResNet-50 → ResNet-18 ("test-c") needs
an ImageNet-style ResNet-50 that kdguard does not ship either.

The CPU pairs are kdguard's: small enough to train teachers and distil students on a 2-core
machine in minutes per epoch (platform notes: ResNet-20 ≈ 1 min, WRN-16-2 ≈ 2 min per CIFAR-10
epoch with bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import KDGuardError, unknown_name


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


_REF = "Xming-Z/RobustKD load_settings.py --paper_setting"

PAIRS: dict[str, PairPreset] = {
    "paper_a": PairPreset("wrn28_4", "wrn16_4", f"{_REF} a"),
    "paper_b": PairPreset("wrn28_4", "wrn28_2", f"{_REF} b"),
    "paper_c": PairPreset("wrn28_4", "wrn16_2", f"{_REF} c"),
    "paper_d": PairPreset("wrn28_4", "resnet56", f"{_REF} d"),
    "paper_test_b": PairPreset("wrn28_4", "resnet18", f"{_REF} test-b"),
    "paper_e": PairPreset("pyramidnet200", "wrn28_4", f"{_REF} e (PyramidNet-200, α 240)", available=False),
    "paper_f": PairPreset("pyramidnet200", "pyramidnet110", f"{_REF} f (α 240 → α 84)", available=False),
    "cpu_resnet": PairPreset("resnet20", "resnet8", "kdguard CPU scale"),
    "cpu_wrn": PairPreset("wrn16_2", "wrn16_1", "kdguard CPU scale"),
}

#: distillation settings of the reference ``train_with_distillation.py`` (300 epochs, batch 64,
#: SGD nesterov lr 0.1, momentum 0.9, wd 5e-4, lr ÷10 at 1/2 and ÷100 at 3/4 of training)
PAPER_TRAINING = {"epochs": 300, "batch_size": 64, "optim": {
    "name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True,
    "schedule": "multistep", "milestones": [0.5, 0.75], "gamma": 0.1}}


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
