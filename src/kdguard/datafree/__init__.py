"""Data-free knowledge distillation: distil a (possibly backdoored) teacher without its data.

The ABD paper's central finding (Hong et al., ICML 2023) is that data-free KD transfers a
teacher's backdoor although no trigger is in the synthetic data; this package runs the data-free
methods faithfully, measures that transfer (CA/ASR/RA at intervals) and is the host that ABD's
defences plug into.

* :mod:`.config`: :class:`DataFreeJob`, :func:`build_datafree_job`, :func:`preset_values` (cpu/paper
  recipes in ``kdguard/configs/datafree/``).
* :mod:`.synthesizers`: ``synthesize()`` / ``sample(n)`` for ZSKT, DFAD, DAFL, DeepInversion, CMI
  and OOD proxy data; :mod:`.generators`, :mod:`.hooks`, :mod:`.losses`, :mod:`.augment`,
  :mod:`.pool` are their parts.
* :mod:`.student`: the student's loss and the replaceable update step.
* :mod:`.loop`: :class:`DataFreeLoop` (schedule, monitoring, resumable checkpoints) and
  :class:`DataFreeExtensions` (the hooks for defences); :mod:`.collapse`:
  :class:`ClassShareMonitor`, the label-free check that synthesis has not collapsed onto one class.
* :mod:`.methods`: :data:`DATAFREE_METHODS`; :mod:`.run`: :func:`run_datafree`, :func:`prepare_datafree`,
  :func:`fork_datafree_run` (continue a copy of a checkpointed run with other settings).

See ``docs/datafree.md``.
"""

from .collapse import ClassShareMonitor, SynthesisCollapseWarning
from .config import METHOD_NAMES, PRESET_SCALES, DataFreeJob, build_datafree_job, preset_values, validate_job
from .generators import ConvGenerator, build_generator, reinitialize
from .hooks import BNStatistics
from .loop import DataFreeExtensions, DataFreeLoop, RoundRecord
from .methods import DATAFREE_METHODS, MethodContext, MethodParts, build_method
from .run import (DataFreeSetup, fork_datafree_run, prepare_datafree, run_datafree, stopped_run_config,
                  synthesis_summary)
from .student import (DistillObjective, StudentStepContext, TeacherOutputs, default_student_step,
                      mean_weighting)
from .synthesizers import (CMISynthesizer, DeepInversionSynthesizer, GeneratorRegularizer,
                           GeneratorSynthesizer, ProxySynthesizer, Synthesizer)

__all__ = [
    "BNStatistics", "ClassShareMonitor", "CMISynthesizer", "ConvGenerator", "DATAFREE_METHODS", "DataFreeExtensions", "DataFreeSetup",
    "DataFreeJob", "DataFreeLoop", "DeepInversionSynthesizer", "DistillObjective",
    "GeneratorRegularizer", "GeneratorSynthesizer", "METHOD_NAMES", "MethodContext", "MethodParts",
    "PRESET_SCALES", "ProxySynthesizer", "RoundRecord", "StudentStepContext", "Synthesizer",
    "TeacherOutputs", "build_datafree_job", "build_generator", "build_method", "default_student_step",
    "fork_datafree_run", "mean_weighting", "prepare_datafree", "preset_values", "reinitialize", "run_datafree",
    "stopped_run_config", "SynthesisCollapseWarning", "synthesis_summary", "validate_job",
]
