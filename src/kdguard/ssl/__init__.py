"""The poisoned self-supervised encoder track (paper 1: Han et al., arXiv 2403.03846, 2024).

Pipeline: SimCLR pre-training of a clean encoder (:mod:`.simclr`) → BadEncoder attack
(:mod:`.badencoder`) → downstream probes with CA / ASR (:mod:`.probe`) → distillation defence with
4 teachers × 3 students × 6 losses (:mod:`.defense`, :mod:`.stage_losses`) → the study table
(:mod:`.grid`). Typed configs: :mod:`.config`; the jobs: :mod:`kdguard.jobs.ssl`; CLI commands in
:mod:`kdguard.commands.ssl`; guide in ``docs/ssl.md``.

==============  ===================================================================================
module          contents
==============  ===================================================================================
encoder         :class:`Encoder` (registry backbone → penultimate features, stage taps, channel
                mask), :class:`ProjectionHead`, :class:`SSLModel`, checkpoints
loop            :class:`SSLLoop`, the resumable training loop of every SSL job
simclr          :func:`nt_xent`, :func:`train_simclr`
badencoder      :func:`badencoder_terms`, :func:`run_badencoder`, :class:`BackdoorTarget`
probe           :func:`probe_encoder` (frozen features → MLP/linear → CA, ASR, ASR-all), kNN monitor
data            :func:`to_encoder_input` (resize / channel conversion), subsets
stage_losses    the six distillation losses per stage pair (:data:`LOSSES`, :class:`StageLoss`)
defense         teachers, students, :class:`EncoderDistiller`, :func:`distill_encoder`, fine-pruning
cache           models cached with the settings that built them
downstream      backdoor targets from configs, probes on several datasets, :func:`probe_table`
grid            the study's cells (:func:`grid_cells`), cached probes, rows and table
==============  ===================================================================================
"""

from __future__ import annotations

from ..augment import SimCLRAugment
from .badencoder import BackdoorTarget, badencoder_terms, run_badencoder, select_references
from .data import to_encoder_input
from .defense import STUDENTS, TEACHERS, EncoderDistiller, distill_encoder, prepare_student, prepare_teacher
from .encoder import Encoder, ProjectionHead, SSLModel, build_ssl_model, load_ssl_model, save_ssl_model
from .downstream import build_targets, evaluate_downstream, load_downstream, probe_table, summarize
from .grid import grid_cells
from .loop import SSLLoop
from .probe import knn_accuracy, probe_encoder
from .simclr import nt_xent, train_simclr
from .stage_losses import LOSSES, StageLoss, feature_kd_loss

__all__ = [
    "LOSSES", "STUDENTS", "TEACHERS", "BackdoorTarget", "Encoder", "EncoderDistiller", "ProjectionHead",
    "SSLLoop", "SSLModel", "SimCLRAugment", "StageLoss", "badencoder_terms", "build_ssl_model", "build_targets",
    "distill_encoder", "evaluate_downstream", "feature_kd_loss", "grid_cells", "knn_accuracy", "load_downstream",
    "load_ssl_model", "nt_xent", "probe_table",
    "prepare_student", "prepare_teacher", "probe_encoder", "run_badencoder", "save_ssl_model", "select_references", "summarize",
    "to_encoder_input", "train_simclr",
]
