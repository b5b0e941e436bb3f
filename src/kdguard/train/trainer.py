"""The training loop shared by teacher training, fine-tuning and distillation.

The trainer drives either a plain classifier (loss = cross-entropy) or a
:class:`kdguard.distill.Distiller` (loss = sum of the named losses its forward returns; each
term is logged). Data are in-memory uint8 tensors; every epoch is shuffled and augmented batch
by batch from one seeded ``torch.Generator``, so a run is reproducible and resumes exactly.

Resumption: after every epoch the trainer writes ``train_state.pt`` atomically (trainable
weights, optimiser, generator state, history, planned length, schedule extensions), then appends
the epoch's line to ``metrics.jsonl``. The file holds tensors and plain containers only and is
read back with ``torch.load(weights_only=True)``. A run started again on the same directory
continues from the last finished epoch, and its ``metrics.jsonl`` is rewritten to hold exactly the
restored epochs (a kill between the two writes leaves neither a missing nor a duplicated line).

A resumed run with more epochs than planned (``--resume`` with a larger ``train.epochs``)
stretches the rest of its schedule over the new length (:func:`schedule_progress`): the
learning rate continues from where it was and a cosine never rises again.

Chance level: an epoch from the third on (or the last) whose training accuracy is at chance
(:func:`kdguard.metrics.at_chance`) issues a :class:`ChanceAccuracyWarning` once per run; a loss
that becomes non-finite stops the run with a :class:`~kdguard.errors.KDGuardError`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import OptimConfig, TrainConfig
from ..data.batches import to_float
from ..distill.base import Distiller
from ..errors import KDGuardError, check_range
from ..io import append_jsonl, atomic_write, write_text
from ..log import bar_disabled
from ..metrics import at_chance
from ..runtime import autocast, resolve_device, use_bf16, use_channels_last

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "metrics.jsonl"


def lr_factor(cfg: OptimConfig, progress: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1] of training (per-step schedule).

    ``cosine``: ½(1 + cos πp) (Loshchilov & Hutter 2017, no restarts); ``multistep``: γ^k after
    the k-th milestone (fractions of training); ``constant``: 1. A linear warm-up over the first
    ``warmup_epochs`` is applied by the trainer on top.
    """
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return 1.0
    raise KDGuardError(f"unknown schedule {cfg.schedule!r}", "use cosine, multistep or constant")


class ChanceAccuracyWarning(UserWarning):
    """Training accuracy at chance level: the run is not learning (often a learning rate too high)."""


def schedule_progress(step: int, total: int, segments: Sequence[Mapping[str, float]] = (),
                      steps_per_epoch: int = 1) -> float:
    """Where global ``step`` lies on the learning-rate schedule of a run of ``total`` steps, in [0, 1].

    Without extensions this is ``step / total``. A run lengthened on resume carries one segment
    per extension, ``{"epoch": e, "progress": p_e}`` (``p_e``: the position the schedule had
    reached at the first step of epoch ``e``, under the length planned before). From that step
    ``s = e · steps_per_epoch`` on, the rest of the schedule is stretched over the new remaining
    steps: ``p = p_e + (1 − p_e)(step − s)/(total − s)``. The learning rate so continues from where
    it was and reaches the schedule's end at the new total: a cosine never rises again, and a run
    extended after its cosine had ended (``p_e = 1``) trains the added epochs at factor 0.
    """
    progress = step / max(total, 1)
    for seg in segments:
        start = int(seg["epoch"]) * steps_per_epoch
        if step >= start:
            p0 = float(seg["progress"])
            progress = p0 + (1.0 - p0) * (step - start) / max(total - start, 1)
    return progress


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, steps_per_epoch: int,
           segments: Sequence[Mapping[str, float]] = ()) -> float:
    """Set every group's lr for global ``step`` (schedule of :func:`lr_factor` at
    :func:`schedule_progress` + linear warm-up over ``optim.warmup_epochs``); returns it."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.optim.warmup_epochs * steps_per_epoch
    progress = schedule_progress(step, total, segments, steps_per_epoch) if segments else step / max(total, 1)
    factor = lr_factor(cfg.optim, progress)
    if warm > 0 and step < warm:
        factor *= (step + 1) / warm
    lr = cfg.optim.lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    check_range("learning rate", cfg.lr, 0.0, 10.0, low_open=True)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise KDGuardError(f"unknown optimizer {cfg.name!r}", "use sgd or adam")


def extend_schedule(segments: list[dict[str, float]], *, done_epochs: int, planned_epochs: int,
                    steps_per_epoch: int = 1) -> list[dict[str, float]]:
    """``segments`` plus the extension of a run planned for ``planned_epochs`` that resumes, after
    ``done_epochs``, with a longer length (see :func:`schedule_progress`)."""
    p = schedule_progress(done_epochs * steps_per_epoch, planned_epochs * steps_per_epoch, segments,
                          steps_per_epoch)
    return [*segments, {"epoch": int(done_epochs), "progress": min(max(p, 0.0), 1.0)}]


def sync_history_file(path: Path, stage: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Make the ``stage`` lines of JSON-lines file ``path`` exactly ``records`` (one line each,
    ``{"stage": stage, **record}``); lines of other stages are kept, unreadable lines (a write
    cut by a kill) dropped. Written atomically, and only when something changes."""
    own = [json.dumps({"stage": stage, **r}, default=_plain) for r in records]
    old = path.read_text().splitlines() if path.exists() else []
    kept = []
    for line in old:
        try:
            if json.loads(line).get("stage") != stage:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    lines = kept + own
    if lines != old:
        write_text(path, "".join(line + "\n" for line in lines))


def _plain(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class EpochRecord:
    """What one epoch did: mean loss terms, train accuracy, validation metrics, time."""

    epoch: int
    lr: float
    losses: dict[str, float]
    train_acc: float
    seconds: float
    val: dict[str, float | None] = field(default_factory=dict)


class Trainer:
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

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, run_dir: str | Path | None = None,
                 augment: Callable | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float | None]] | None = None,
                 seed: int = 0, desc: str = "train") -> None:
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise KDGuardError(f"epochs={cfg.epochs}, batch_size={cfg.batch_size} must be ≥ 1",
                               "set train.epochs and train.batch_size to positive integers")
        self.module = module
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.augment = augment
        self.evaluate = evaluate
        self.desc = desc
        self.device = resolve_device(cfg.device)
        self.net = module.student if isinstance(module, Distiller) else module
        self.bf16 = use_bf16(cfg.amp, self.device, self.net)
        self.channels_last = use_channels_last(cfg.channels_last, self.device, self.net)
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        params = module.trainable_parameters() if isinstance(module, Distiller) else \
            [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.optim)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[EpochRecord] = []
        self.start_epoch = 0
        # the length the restored state was planned for, and the schedule's extensions
        self.planned_epochs = cfg.epochs
        self.segments: list[dict[str, float]] = []
        self._warned_chance = False

    # -- state ------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = self.module.state_dict()
        if isinstance(self.module, Distiller):  # the frozen teacher is not part of the run's state
            state = {k: v for k, v in state.items() if not k.startswith("teacher.")}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def save_state(self) -> None:
        if self.run_dir is None:
            return
        state = {
            "epoch": len(self.history),
            "module": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "total_epochs": self.cfg.epochs,
            "schedule": [dict(s) for s in self.segments],
        }
        atomic_write(self.run_dir / STATE_FILE, lambda p: torch.save(state, p))

    def try_resume(self) -> bool:
        """Load ``train_state.pt`` from ``run_dir`` if present; return whether it resumed."""
        path = self.run_dir / STATE_FILE if self.run_dir else None
        if path is None or not path.exists():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise KDGuardError(f"cannot read training state {str(path)!r} ({type(e).__name__})",
                               "delete it to restart the run from scratch") from None
        own = self.module.state_dict()
        saved = state["module"]
        missing = [k for k in own if k not in saved and not k.startswith("teacher.")]
        unexpected = [k for k in saved if k not in own]
        reshaped = [k for k in saved if k in own and own[k].shape != saved[k].shape]
        if missing or unexpected or reshaped:
            raise KDGuardError(f"training state {str(path)!r} does not match this run's model",
                               "use a fresh output directory or delete train_state.pt")
        self.module.load_state_dict(saved, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.start_epoch = int(state["epoch"])
        self.planned_epochs = int(state.get("total_epochs", self.cfg.epochs))
        self.segments = [dict(s) for s in state.get("schedule", [])]
        return True

    # -- loop -------------------------------------------------------------------------------
    def _set_lr(self, step: int, steps_per_epoch: int) -> float:
        return set_lr(self.optimizer, self.cfg, step, steps_per_epoch, self.segments)

    def _extend_if_longer(self, steps_per_epoch: int) -> None:
        if self.cfg.epochs <= self.planned_epochs or self.start_epoch >= self.cfg.epochs:
            return
        self.segments = extend_schedule(self.segments, done_epochs=self.start_epoch,
                                        planned_epochs=self.planned_epochs, steps_per_epoch=steps_per_epoch)
        self.planned_epochs = self.cfg.epochs
        if self.segments[-1]["progress"] >= 1.0 and lr_factor(self.cfg.optim, 1.0) == 0.0:
            warnings.warn(f"[{self.desc}] the run's {self.cfg.optim.schedule} schedule had ended at epoch "
                          f"{self.start_epoch}: the added epochs train at learning rate 0; start a new run "
                          "with the longer train.epochs to train them at a real rate", UserWarning, stacklevel=3)

    def _check_chance(self, record: EpochRecord, num_classes: int | None) -> None:
        last = record.epoch == self.cfg.epochs
        if self._warned_chance or (record.epoch < 3 and not last) or not at_chance(record.train_acc, num_classes):
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
        with autocast(self.device, self.bf16):
            if isinstance(self.module, Distiller):
                # Methods with a per-sample memory (CRD) need each sample's position in the set.
                if getattr(self.module, "needs_index", False):
                    logits, losses = self.module(x, y, index.to(self.device))
                else:
                    logits, losses = self.module(x, y)
            else:
                logits = self.module(x)
                losses = {"ce": F.cross_entropy(logits.float(), y)}
        return logits, losses

    def fit(self, images: torch.Tensor, labels: torch.Tensor, *, resume: bool = True) -> list[EpochRecord]:
        """Train for ``cfg.epochs`` epochs on uint8 ``images`` (``N×C×H×W``) and int64 ``labels``.

        Returns the per-epoch history (also appended to ``metrics.jsonl`` in ``run_dir``).
        """
        if len(images) == 0:
            raise KDGuardError("the training set is empty", "check the data fraction / split settings")
        if resume:
            self.try_resume()
        n = len(images)
        bs = min(self.cfg.batch_size, n)
        steps_per_epoch = n // bs  # drop the last partial batch (BatchNorm on tiny batches is noisy)
        self._extend_if_longer(steps_per_epoch)
        if self.run_dir is not None:  # the history file holds exactly the restored epochs
            sync_history_file(self.run_dir / HISTORY_FILE, self.desc, [asdict(r) for r in self.history])
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
                x = to_float(xb, self.device, channels_last=self.channels_last)
                y = labels[idx].to(self.device, non_blocking=True)
                lr = self._set_lr(epoch * steps_per_epoch + b, steps_per_epoch)
                logits, losses = self._step_losses(x, y, idx)
                loss = sum(losses.values())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip:
                    nn.utils.clip_grad_norm_(
                        [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip)
                self.optimizer.step()
                for k, v in losses.items():  # accumulate on device: no host sync per step
                    sums[k] = sums.get(k, 0) + v.detach().float()
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                num_classes = logits.shape[-1]
            mean_losses = {k: float(v) / steps_per_epoch for k, v in sums.items()}
            if not all(math.isfinite(v) for v in mean_losses.values()):
                raise KDGuardError(f"loss became non-finite in epoch {epoch + 1}: {mean_losses}",
                                   f"lower the learning rate (train.optim.lr={self.cfg.optim.lr:g} now) "
                                   "or set train.grad_clip")
            record = EpochRecord(epoch=epoch + 1, lr=lr, losses=mean_losses,
                                 train_acc=float(correct) / max(seen, 1),
                                 seconds=time.perf_counter() - t0)
            if self.evaluate is not None:
                record.val = self.evaluate(self.net)
            self.history.append(record)
            self.save_state()
            if self.run_dir is not None:
                append_jsonl(self.run_dir / HISTORY_FILE, {"stage": self.desc, **asdict(record)})
            self._check_chance(record, num_classes)
            summary = " ".join(f"{k}={v:.4f}" for k, v in mean_losses.items())
            val = " ".join(f"{k}={v:.4f}" for k, v in record.val.items() if v is not None)
            logger.info(f"[{self.desc}] epoch {epoch + 1}/{self.cfg.epochs} {summary} "
                        f"train_acc={record.train_acc:.4f} {val} ({record.seconds:.1f}s)")
            logger.debug(f"[{self.desc}] epoch {epoch + 1}: lr={lr:.6g} after {steps_per_epoch} steps of {bs}")
        return self.history
