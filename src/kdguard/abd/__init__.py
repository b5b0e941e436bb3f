"""ABD (Hong et al., ICML 2023): Shuffling Vaccine and Self-Retrospection, plug-ins for every
data-free method of :mod:`kdguard.datafree`. See ``docs/abd.md``.

* :mod:`.shuffle`: :class:`ShuffledTeacher` (layers chosen by type and execution order).
* :mod:`.vaccine`: :class:`ShufflingVaccine` (suspicion mask, generator regulariser, OOD
  weighting, verification).
* :mod:`.hypergrad`: :func:`fixed_point_hypergradient` (implicit differentiation, I-BAU style).
* :mod:`.retrospection`: :class:`SelfRetrospection` (universal perturbation + unlearning).
* :mod:`.config`: :class:`ABDConfig`, the job's ``abd`` section; :mod:`.plugin`: :func:`build_abd` from it.
"""

from .config import ABDConfig, SelfRetrospectionConfig, ShufflingVaccineConfig, validate_abd
from .hypergrad import fixed_point_hypergradient
from .plugin import ABDPlugin, build_abd
from .retrospection import (
    SelfRetrospection,
    frozen_bn_statistics,
    target_directed_perturbation,
    universal_perturbation,
)
from .shuffle import (
    ShuffledTeacher,
    execution_order,
    permute_input_channels,
    select_shuffle_layers,
)
from .vaccine import (
    ShufflingVaccine,
    VaccineWeighting,
    divergence_per_sample,
    tail_ratio,
)

__all__ = [
    "ABDConfig", "ABDPlugin", "SelfRetrospection", "SelfRetrospectionConfig", "ShuffledTeacher", "ShufflingVaccine", "ShufflingVaccineConfig", "VaccineWeighting",
    "build_abd", "divergence_per_sample", "execution_order", "fixed_point_hypergradient",
    "frozen_bn_statistics", "permute_input_channels", "select_shuffle_layers", "tail_ratio",
    "target_directed_perturbation", "universal_perturbation", "validate_abd",
]
