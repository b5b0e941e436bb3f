"""The jobs: each composes the feature packages into one run directory through
:class:`kdguard.runs.RunContext`. The CLI (:mod:`kdguard.cli`, :mod:`kdguard.commands`) is a thin
front over them; feature packages never import this layer.

==============  ===================================================================================
module          jobs
==============  ===================================================================================
supervised      :func:`train_teacher`, :func:`distill`, :func:`evaluate_checkpoint`
datafree        :func:`run_datafree` (data-free KD, with the ABD extensions composed in from the
                job's ``abd`` section: :class:`DataFreeABDJob`), :func:`fork_datafree_run`
defend          :func:`run_defense` (fine-tuning, fine-pruning, NAD, unlearning)
audit           :func:`run_audit` (is this teacher backdoored; reconstructed triggers)
robustkd        :func:`run_robustkd`, :func:`run_trigger_job`
ssl             :func:`run_pretrain`, :func:`run_badencoder_job`, :func:`run_probe_job`,
                :func:`run_grid`, :func:`run_defend`
import_teacher  :func:`import_teacher` (a foreign weights file as a kdguard run directory)
demo            :func:`run_demo` (``kdguard demo``)
==============  ===================================================================================

Every job takes ``threads=`` (torch's intra-op threads; None: ``$KDGUARD_NUM_THREADS``, else all
usable cores).
"""

from __future__ import annotations

from ..runs import RunResult
from .datafree import (DataFreeABDJob, DataFreeForkJob, DataFreeSetup, ExtensionFactory, abd_extensions, build_datafree_job, fork_datafree_run, prepare_datafree,
                       run_datafree, run_datafree_fork, stopped_run_config, validate_datafree_job)
from .audit import AuditJob, run_audit
from .defend import run_defense
from .import_teacher import ImportJob, ImportResult, import_teacher
from .robustkd import run_robustkd, run_trigger_job
from .ssl import GridResult, SSLResult, run_badencoder_job, run_defend, run_grid, run_pretrain, run_probe_job
from .supervised import build_distiller, distill, evaluate_checkpoint, train_teacher

__all__ = [
    "AuditJob", "DataFreeABDJob", "DataFreeForkJob", "DataFreeSetup", "ExtensionFactory", "GridResult", "ImportJob", "ImportResult", "RunResult", "SSLResult",
    "abd_extensions", "build_datafree_job", "build_distiller", "distill", "evaluate_checkpoint", "fork_datafree_run",
    "import_teacher", "prepare_datafree", "run_audit", "run_badencoder_job", "run_datafree", "run_datafree_fork", "run_defend", "run_defense",
    "run_grid", "run_pretrain", "run_probe_job", "run_robustkd", "run_trigger_job", "stopped_run_config",
    "train_teacher", "validate_datafree_job",
]
