"""Data-free knowledge distillation: distil a (possibly backdoored) teacher without its data.

The ABD paper's central finding (Hong et al., ICML 2023) is that data-free KD transfers a
teacher's backdoor although no trigger is in the synthetic data; this package runs the data-free
methods faithfully, measures that transfer (CA/ASR/RA at intervals) and is the host that ABD's
defences plug into.

* :mod:`.config`: :class:`DataFreeJob`, :func:`build_datafree_job`, :func:`preset_values` (cpu/paper
  recipes in ``kdguard/configs/datafree/``).
* :mod:`.synthesizers`: ``synthesize()`` / ``sample(n)`` for ZSKT, DFAD, DAFL, DeepInversion, CMI
  and OOD proxy data; :mod:`.generators`, :mod:`.hooks`, :mod:`.losses`, :mod:`.pool`
  are their parts (their image transforms live in :mod:`kdguard.augment`).
* :mod:`.student`: the student's loss and the replaceable update step.
* :mod:`.loop`: :class:`DataFreeLoop` (schedule, monitoring, resumable checkpoints) and
  :class:`DataFreeExtensions` (the hooks for defences); :mod:`.collapse`:
  :class:`ClassShareMonitor`, the label-free check that synthesis has not collapsed onto one class.
* :mod:`.methods`: :data:`DATAFREE_METHODS`; :mod:`.summary`: :func:`synthesis_summary`,
  :func:`plot_datafree_curves` (what a run's history says).

The job that runs a method (and composes ABD into it) is :mod:`kdguard.jobs.datafree`.

See ``docs/datafree.md``.
"""

from .collapse import ClassShareMonitor, SynthesisCollapseWarning
from .config import METHOD_NAMES, PRESET_SCALES, DataFreeJob, build_datafree_job, preset_values, validate_job
from .generators import ConvGenerator, build_generator, reinitialize
from .hooks import BNStatistics
from .loop import DataFreeExtensions, DataFreeLoop, RoundRecord
from .methods import DATAFREE_METHODS, MethodContext, MethodParts, build_method
from .summary import plot_datafree_curves, synthesis_summary
from .student import (DistillObjective, StudentStepContext, TeacherOutputs, default_student_step,
                      mean_weighting)
from .synthesizers import (CMISynthesizer, DeepInversionSynthesizer, GeneratorRegularizer,
                           GeneratorSynthesizer, ProxySynthesizer, Synthesizer)

__all__ = [
    "BNStatistics", "ClassShareMonitor", "CMISynthesizer", "ConvGenerator", "DATAFREE_METHODS", "DataFreeExtensions",
    "DataFreeJob", "DataFreeLoop", "DeepInversionSynthesizer", "DistillObjective",
    "GeneratorRegularizer", "GeneratorSynthesizer", "METHOD_NAMES", "MethodContext", "MethodParts",
    "PRESET_SCALES", "ProxySynthesizer", "RoundRecord", "StudentStepContext", "Synthesizer",
    "TeacherOutputs", "build_datafree_job", "build_generator", "build_method", "default_student_step",
    "mean_weighting", "plot_datafree_curves", "preset_values", "reinitialize",
    "SynthesisCollapseWarning", "synthesis_summary", "validate_job",
]
