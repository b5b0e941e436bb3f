"""The training loop shared by teacher training, fine-tuning and distillation.

The trainer drives either a plain classifier (loss = cross-entropy) or a
:class:`kdguard.distill.Distiller` (loss = sum of the named losses its forward returns; each
term is logged). Data are in-memory uint8 tensors; every epoch is shuffled and augmented batch
by batch from one seeded ``torch.Generator``, so a run is reproducible and resumes exactly.

Resumption: after every epoch the trainer writes ``train_state.pt`` atomically (trainable
weights, optimiser, generator state, history). The file holds tensors and plain containers
only and is read back with ``torch.load(weights_only=True)``. A run started again on the same
directory continues from the last finished epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import OptimConfig, TrainConfig
from ..data.batches import to_float
from ..distill.base import Distiller
from ..errors import KDGuardError, check_range
from ..io import append_jsonl, atomic_write
from ..runtime import autocast, resolve_device, use_bf16, use_channels_last

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


def set_lr(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Set every group's lr for global ``step`` (schedule of :func:`lr_factor` + linear warm-up)."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.optim.warmup_epochs * steps_per_epoch
    factor = lr_factor(cfg.optim, step / max(total, 1))
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
        return True

    # -- loop -------------------------------------------------------------------------------
    def _set_lr(self, step: int, steps_per_epoch: int) -> float:
        return set_lr(self.optimizer, self.cfg, step, steps_per_epoch)

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
        epochs = tqdm(range(self.start_epoch, self.cfg.epochs), desc=self.desc, unit="epoch",
                      initial=self.start_epoch, total=self.cfg.epochs, disable=not self.cfg.progress,
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
                           disable=not self.cfg.progress, unit="batch", dynamic_ncols=True)
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
            mean_losses = {k: float(v) / steps_per_epoch for k, v in sums.items()}
            if not all(math.isfinite(v) for v in mean_losses.values()):
                raise KDGuardError(f"loss became non-finite in epoch {epoch + 1}: {mean_losses}",
                                   "lower the learning rate (optim.lr) or enable grad_clip")
            record = EpochRecord(epoch=epoch + 1, lr=lr, losses=mean_losses,
                                 train_acc=float(correct) / max(seen, 1),
                                 seconds=time.perf_counter() - t0)
            if self.evaluate is not None:
                record.val = self.evaluate(self.net)
            self.history.append(record)
            self.save_state()
            if self.run_dir is not None:
                append_jsonl(self.run_dir / HISTORY_FILE, {"stage": self.desc, **asdict(record)})
            summary = " ".join(f"{k}={v:.4f}" for k, v in mean_losses.items())
            val = " ".join(f"{k}={v:.4f}" for k, v in record.val.items() if v is not None)
            tqdm.write(f"[{self.desc}] epoch {epoch + 1}/{self.cfg.epochs} {summary} "
                       f"train_acc={record.train_acc:.4f} {val} ({record.seconds:.1f}s)")
        return self.history
