"""The training loop shared by teacher training, fine-tuning and distillation.

The trainer drives either a plain classifier (loss = cross-entropy) or a
:class:`kdguard.distill.Distiller` (loss = sum of the named losses its forward returns; each
term is logged). Data are in-memory uint8 tensors; every epoch is shuffled and augmented batch
by batch from one seeded ``torch.Generator``, so a run is reproducible and resumes exactly.

Optimiser, learning-rate scheduler, precision and resumption come from
:class:`~kdguard.train.engine.EpochEngine`: after every epoch the trainer writes ``train_state.pt``
atomically (trainable weights, optimiser, generator state, history, planned length, schedule
extensions, scheduler state), then appends the epoch's line to ``metrics.jsonl``. A run started
again on the same directory continues from the last finished epoch, and its ``metrics.jsonl`` is
rewritten to hold exactly the restored epochs (a kill between the two writes leaves neither a
missing nor a duplicated line). A resumed run with more epochs than planned (``--resume`` with a
larger ``train.epochs``) stretches the rest of its schedule over the new length
(:func:`kdguard.optim.schedule_progress`): the learning rate continues from where it was and a
cosine never rises again.

Under torchrun (``torchrun --nproc_per_node N -m kdguard train-teacher|distill ...``) each process
trains on its ``batch_size / N`` images of every batch (the union of the shards is the batch one
process would take) through :class:`~torch.nn.parallel.DistributedDataParallel`, with BatchNorm
statistics over the whole batch; rank 0 alone evaluates and writes
(:mod:`kdguard.train.engine`). Distillers with a per-sample memory (``needs_index``: CRD) are
refused there: each process would update the memory with its shard only.

Chance level: an epoch from the third and a fifth of the training on (or the last) whose training accuracy is at chance
(:func:`kdguard.metrics.at_chance`) issues a :class:`ChanceAccuracyWarning` once per run; a loss
that becomes non-finite stops the run with a :class:`~kdguard.errors.KDGuardError`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.batches import to_float
from ..distill.base import Distiller
from ..distributed import active, from_main
from ..errors import KDGuardError
from ..log import bar_disabled
from ..metrics import at_chance
from ..optim import current_lr, schedule_factor
from .engine import HISTORY_FILE, STATE_FILE, EpochEngine, sync_history_file

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_FILE", "STATE_FILE", "ChanceAccuracyWarning", "EpochRecord", "Trainer", "sync_history_file"]


class ChanceAccuracyWarning(UserWarning):
    """Training accuracy at chance level: the run is not learning (often a learning rate too high)."""


@dataclass
class EpochRecord:
    """What one epoch did: mean loss terms, train accuracy, validation metrics, time."""

    epoch: int
    lr: float
    losses: dict[str, float]
    train_acc: float
    seconds: float
    val: dict[str, float | None] = field(default_factory=dict)


class Trainer(EpochEngine):
    """Trains ``module`` (a classifier or a :class:`Distiller`) on uint8 image tensors.

    Args:
        module: a classifier ``x → logits`` or a Distiller ``(x, y) → (logits, losses)``. If it
            has ``on_epoch_start(epoch)``, that is called before every epoch (0-based), also
            the first epoch of a resumed run.
        cfg: optimiser, schedule, epochs, batch size, precision.
        run_dir: where ``train_state.pt`` and ``metrics.jsonl`` go (``None``: no checkpoints).
        augment: callable on a uint8 batch (``N×C×H×W``) with a ``generator`` keyword, or None.
        evaluate: called after each epoch with the module's student/classifier; returns a dict
            of validation metrics for the curves (never the test split).
        seed: seeds the shuffling/augmentation generator.
        desc: label for progress bars.
    """

    record_type = EpochRecord

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, run_dir: str | Path | None = None,
                 augment: Callable | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float | None]] | None = None,
                 seed: int = 0, desc: str = "train") -> None:
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise KDGuardError(f"epochs={cfg.epochs}, batch_size={cfg.batch_size} must be ≥ 1",
                               "set train.epochs and train.batch_size to positive integers")
        self.augment = augment
        self.evaluate = evaluate
        self.net = module.student if isinstance(module, Distiller) else module
        if isinstance(module, Distiller):  # the frozen teacher is not part of the run's state
            self.frozen_prefixes = ("teacher.",)
        self._setup(module, cfg, net=self.net, run_dir=run_dir, desc=desc)
        params = module.trainable_parameters() if isinstance(module, Distiller) else \
            [p for p in module.parameters() if p.requires_grad]
        self._init_optimizer(params, seed)
        self._warned_chance = False

    # -- loop -------------------------------------------------------------------------------
    def _extended(self) -> None:
        if self.segments[-1]["progress"] >= 1.0 and schedule_factor(self.cfg.optim, 1.0) == 0.0:
            warnings.warn(f"[{self.desc}] the run's {self.cfg.optim.schedule} schedule had ended at epoch "
                          f"{self.start_epoch}: the added epochs train at learning rate 0; start a new run "
                          "with the longer train.epochs to train them at a real rate", UserWarning, stacklevel=4)

    def _check_chance(self, record: EpochRecord, num_classes: int | None) -> None:
        last = record.epoch == self.cfg.epochs
        # a slow start (a KD student at a high temperature) is not a failure: look from the third
        # epoch and a fifth of the training on
        first = max(3, math.ceil(0.2 * self.cfg.epochs))
        if self._warned_chance or (record.epoch < first and not last) or not at_chance(record.train_acc, num_classes):
            return
        val = record.val.get("val_ca")
        if val is not None and not at_chance(val, num_classes):
            return
        self._warned_chance = True
        warnings.warn(f"[{self.desc}] training accuracy {100 * record.train_acc:.1f} % in epoch {record.epoch} is "
                      f"at chance level (1/{num_classes} = {100 / num_classes:.1f} %): the model is not learning; "
                      f"a learning rate too high for it (train.optim.lr={self.cfg.optim.lr:g}) is the usual cause",
                      ChanceAccuracyWarning, stacklevel=3)

    def _step_losses(self, x: torch.Tensor, y: torch.Tensor,
                     index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.autocast():
            if isinstance(self.module, Distiller):
                # Methods with a per-sample memory (CRD) need each sample's position in the set.
                if getattr(self.module, "needs_index", False):
                    logits, losses = self.forward_module(x, y, index.to(self.device))
                else:
                    logits, losses = self.forward_module(x, y)
            else:
                logits = self.forward_module(x)
                losses = {"ce": F.cross_entropy(logits.float(), y)}
        return logits, losses

    def fit(self, images: torch.Tensor, labels: torch.Tensor, *, resume: bool = True) -> list[EpochRecord]:
        """Train for ``cfg.epochs`` epochs on uint8 ``images`` (``N×C×H×W``) and int64 ``labels``.

        Returns the per-epoch history (also appended to ``metrics.jsonl`` in ``run_dir``).

        Raises:
            KDGuardError: an empty training set; under torchrun, a batch that does not split
                evenly over the processes or a distiller with a per-sample memory.
        """
        if len(images) == 0:
            raise KDGuardError("the training set is empty", "check the data fraction / split settings")
        if active() and getattr(self.module, "needs_index", False):
            raise KDGuardError(f"[{self.desc}] this KD method keeps a memory of every training sample "
                               "and does not run under torchrun", "run it as one process")
        if resume:
            self.try_resume()
        n = len(images)
        bs = min(self.cfg.batch_size, n)
        steps_per_epoch = n // bs  # drop the last partial batch (BatchNorm on tiny batches is noisy)
        self.begin(steps_per_epoch, bs)
        num_classes: int | None = None
        epochs = tqdm(range(self.start_epoch, self.cfg.epochs), desc=self.desc, unit="epoch",
                      initial=self.start_epoch, total=self.cfg.epochs, disable=bar_disabled(self.cfg.progress),
                      dynamic_ncols=True)
        on_epoch_start = getattr(self.module, "on_epoch_start", None)
        for epoch in epochs:
            self.module.train()
            if callable(on_epoch_start):  # epoch-dependent loss schedules (DKD's warm-up)
                on_epoch_start(epoch)
            t0 = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            seen = 0
            order = torch.randperm(n, generator=self.generator)
            batches = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", leave=False,
                           disable=bar_disabled(self.cfg.progress), unit="batch", dynamic_ncols=True)
            lr = 0.0
            for b in batches:
                idx = order[b * bs:(b + 1) * bs]
                xb = images[idx]
                if self.augment is not None:
                    xb = self.augment(xb, generator=self.generator)
                xb, idx = self.shard(xb), self.shard(idx)  # under torchrun: this process's part
                x = to_float(xb, self.device, channels_last=self.channels_last)
                y = labels[idx].to(self.device, non_blocking=True)
                lr = current_lr(self.scheduler)
                logits, losses = self._step_losses(x, y, idx)
                self.step(losses)
                for k, v in losses.items():  # accumulate on device: no host sync per step
                    sums[k] = sums.get(k, 0) + v.detach().float()
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                num_classes = logits.shape[-1]
            sums, (correct, seen) = self.epoch_totals(sums, correct, seen)
            mean_losses = {k: float(v) / steps_per_epoch for k, v in sums.items()}
            if not all(math.isfinite(v) for v in mean_losses.values()):
                raise KDGuardError(f"loss became non-finite in epoch {epoch + 1}: {mean_losses}",
                                   f"lower the learning rate (train.optim.lr={self.cfg.optim.lr:g} now) "
                                   "or set train.grad_clip")
            record = EpochRecord(epoch=epoch + 1, lr=lr, losses=mean_losses,
                                 train_acc=float(correct) / max(seen, 1),
                                 seconds=time.perf_counter() - t0)
            if self.evaluate is not None:
                record.val = from_main(lambda: self.evaluate(self.net))  # rank 0 evaluates
            self.finish_epoch(record)
            self._check_chance(record, num_classes)
            summary = " ".join(f"{k}={v:.4f}" for k, v in mean_losses.items())
            val = " ".join(f"{k}={v:.4f}" for k, v in record.val.items() if v is not None)
            logger.info(f"[{self.desc}] epoch {epoch + 1}/{self.cfg.epochs} {summary} "
                        f"train_acc={record.train_acc:.4f} {val} ({record.seconds:.1f}s)")
            logger.debug(f"[{self.desc}] epoch {epoch + 1}: lr={lr:.6g} after {steps_per_epoch} steps of {bs}")
        self.end()
        return self.history
