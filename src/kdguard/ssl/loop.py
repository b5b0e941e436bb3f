"""The resumable epoch loop behind every SSL training job (SimCLR, BadEncoder, encoder distillation).

:class:`kdguard.train.Trainer` trains a classifier or a :class:`~kdguard.distill.Distiller` on
labelled batches. Self-supervised jobs need something else per step (two augmented views, triggered
copies, a frozen reference model), so here a job hands the loop a *step function*
``step(indices, loop) -> {name: scalar loss}``; the loop owns everything else, exactly like the
trainer: per-step learning-rate schedule (:func:`kdguard.train.trainer.lr_factor`, with linear
warm-up), optimiser (:func:`kdguard.train.trainer.build_optimizer`), bf16 autocast and
channels_last where they pay off, a shuffled order per epoch from one seeded generator, the
summed-loss backward pass, per-epoch ``metrics.jsonl`` lines, and an atomic ``train_state.pt`` after
every epoch from which a restarted run continues (tensors and plain containers only, loaded with
``weights_only=True``). On restart ``metrics.jsonl`` is rewritten to hold exactly the restored epochs,
and a run resumed with more epochs than planned stretches the rest of its schedule over the new
length (:func:`kdguard.train.trainer.schedule_progress`), as the trainer does.

Frozen models (the clean encoder of BadEncoder, the teacher of the defence) are passed as
``frozen``: they are moved to the device and kept in eval mode, never optimised and never saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import KDGuardError
from ..io import append_jsonl, atomic_write
from ..log import bar_disabled
from ..runtime import autocast, resolve_device, use_bf16, use_channels_last
from ..train.trainer import build_optimizer, extend_schedule, set_lr, sync_history_file

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "metrics.jsonl"

Step = Callable[[torch.Tensor, "SSLLoop"], dict[str, torch.Tensor]]


@dataclass
class EpochLog:
    """One epoch: mean of each loss term over its steps, learning rate, wall time."""

    epoch: int
    lr: float
    losses: dict[str, float]
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


class SSLLoop:
    """Run ``cfg.epochs`` epochs of ``step`` over ``n`` items (resumable from ``run_dir``).

    Args:
        module: what is trained and checkpointed (e.g. an :class:`~kdguard.ssl.encoder.SSLModel`,
            or a container with the student and auxiliary modules). Its parameters with
            ``requires_grad`` are optimised unless ``params`` is given.
        cfg: epochs, batch size, optimiser/schedule, precision, device, progress bars.
        run_dir: folder for ``train_state.pt`` and ``metrics.jsonl`` (``None``: no checkpoints).
        seed: seeds the generator used for shuffling and for the step's augmentations.
        desc: label for progress bars and history lines.
        frozen: models that steps use without training them (moved to the device, eval mode).
        params: the parameters to optimise (default: trainable parameters of ``module``).

    Attributes available to steps: ``device``, ``bf16``, ``channels_last``, ``generator``.

    Raises:
        KDGuardError: ``epochs``/``batch_size`` < 1, no trainable parameters, an unreadable or
            mismatched ``train_state.pt``, a non-finite loss, or fewer than 2 items.
    """

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, run_dir: str | Path | None = None,
                 seed: int = 0, desc: str = "ssl", frozen: Sequence[nn.Module] = (),
                 params: Sequence[nn.Parameter] | None = None) -> None:
        if cfg.epochs < 1 or cfg.batch_size < 2:
            raise KDGuardError(f"epochs={cfg.epochs}, batch_size={cfg.batch_size}: need epochs >= 1 "
                               "and batch_size >= 2", "set train.epochs and train.batch_size")
        self.module, self.cfg, self.desc = module, cfg, desc
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16(cfg.amp, self.device, module)
        self.channels_last = use_channels_last(cfg.channels_last, self.device, module)
        self.frozen = list(frozen)
        for m in [module, *self.frozen]:
            m.to(self.device)
            if self.channels_last:
                m.to(memory_format=torch.channels_last)
        for m in self.frozen:
            m.eval().requires_grad_(False)
        trainable = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise KDGuardError(f"{desc}: nothing to train (no parameter requires a gradient)",
                               "check which parts of the model are frozen")
        self.optimizer = build_optimizer(trainable, cfg.optim)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[EpochLog] = []
        self.planned_epochs = cfg.epochs   # the length the restored state was planned for
        self.segments: list[dict[str, float]] = []  # schedule extensions (schedule_progress)

    # -- state ------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.run_dir is None:
            return
        state = {"epoch": len(self.history),
                 "module": {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                 "history": [asdict(h) for h in self.history], "total_epochs": self.cfg.epochs,
                 "schedule": [dict(s) for s in self.segments]}
        atomic_write(self.run_dir / STATE_FILE, lambda p: torch.save(state, p))

    def _resume(self) -> None:
        path = self.run_dir / STATE_FILE if self.run_dir is not None else None
        if path is None or not path.exists():
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise KDGuardError(f"cannot read training state {str(path)!r} ({type(e).__name__})",
                               "delete it to restart this stage from scratch") from None
        own = self.module.state_dict()
        saved = state["module"]
        if set(own) != set(saved) or any(own[k].shape != saved[k].shape for k in own):
            raise KDGuardError(f"training state {str(path)!r} does not match this run's model",
                               "use a fresh output directory or delete train_state.pt")
        self.module.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = [EpochLog(**h) for h in state["history"]]
        self.planned_epochs = int(state.get("total_epochs", self.cfg.epochs))
        self.segments = [dict(s) for s in state.get("schedule", [])]

    # -- loop -------------------------------------------------------------------------------
    def _set_lr(self, step: int, steps_per_epoch: int) -> float:
        return set_lr(self.optimizer, self.cfg, step, steps_per_epoch, self.segments)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float images → float [0, 1] on the loop's device, in the model's layout."""
        x = images.to(self.device, non_blocking=True)
        return self.layout(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float())

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels_last memory format when the loop uses it (shape unchanged)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def autocast(self):
        return autocast(self.device, self.bf16)

    def fit(self, n: int, step: Step, *, resume: bool = True) -> list[EpochLog]:
        """Train for the remaining epochs over ``n`` items; ``step`` gets int64 index batches.

        Every epoch draws a permutation of ``range(n)`` and drops the last incomplete batch
        (batch-norm and the contrastive loss misbehave on tiny batches). Returns the history.
        """
        if n < 2:
            raise KDGuardError(f"{self.desc}: {n} training item(s) is too few", "give at least 2 images")
        if resume:
            self._resume()
        bs = min(self.cfg.batch_size, n)
        steps = n // bs
        start = len(self.history)
        if self.planned_epochs < self.cfg.epochs and start < self.cfg.epochs:
            self.segments = extend_schedule(self.segments, done_epochs=start, planned_epochs=self.planned_epochs,
                                            steps_per_epoch=steps)
            self.planned_epochs = self.cfg.epochs
        if self.run_dir is not None:  # the history file holds exactly the restored epochs
            sync_history_file(self.run_dir / HISTORY_FILE, self.desc, [asdict(h) for h in self.history])
        bar = tqdm(range(start, self.cfg.epochs), desc=self.desc, unit="epoch", initial=start,
                   total=self.cfg.epochs, disable=bar_disabled(self.cfg.progress), dynamic_ncols=True)
        for epoch in bar:
            self.module.train()
            for m in self.frozen:
                m.eval()
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=self.generator)
            sums: dict[str, torch.Tensor] = {}
            lr = 0.0
            for b in range(steps):
                lr = self._set_lr(epoch * steps + b, steps)
                with self.autocast():
                    losses = step(order[b * bs:(b + 1) * bs], self)
                loss = sum(losses.values())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip:
                    nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                             self.cfg.grad_clip)
                self.optimizer.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
            means = {k: float(v) / steps for k, v in sums.items()}
            if not all(math.isfinite(v) for v in means.values()):
                raise KDGuardError(f"{self.desc}: loss became non-finite in epoch {epoch + 1}: {means}",
                                   "lower the learning rate (optim.lr) or enable grad_clip")
            log = EpochLog(epoch=epoch + 1, lr=lr, losses=means, seconds=time.perf_counter() - t0)
            self.history.append(log)
            self._save()
            if self.run_dir is not None:
                append_jsonl(self.run_dir / HISTORY_FILE, {"stage": self.desc, **asdict(log)})
            summary = " ".join(f"{k}={v:.4f}" for k, v in means.items())
            logger.info(f"[{self.desc}] epoch {epoch + 1}/{self.cfg.epochs} {summary} ({log.seconds:.1f}s)")
            logger.debug(f"[{self.desc}] epoch {epoch + 1}: lr={lr:.6g} after {steps} steps of {bs}")
        return self.history
