"""The resumable epoch loop behind every SSL training job (SimCLR, BadEncoder, encoder distillation).

:class:`kdguard.train.Trainer` trains a classifier or a :class:`~kdguard.distill.Distiller` on
labelled batches. Self-supervised jobs need something else per step (two augmented views, triggered
copies, a frozen reference model), so here a job hands the loop a *step function*
``step(indices, loop) -> {name: scalar loss}``; everything else comes from the epoch engine the
trainer stands on (:class:`kdguard.train.engine.EpochEngine`): per-step learning-rate schedule with
warm-up, optimiser, bf16 autocast and channels_last where they pay off, a shuffled order per epoch
from one seeded generator, the summed-loss update, per-epoch ``metrics.jsonl`` lines, and an atomic
``train_state.pt`` after every epoch from which a restarted run continues; on restart
``metrics.jsonl`` is rewritten to hold exactly the restored epochs, and a run resumed with more
epochs than planned stretches the rest of its schedule over the new length.

Under torchrun the step still gets the whole batch's indices (every process draws the same
order and the same augmentations from the shared generator); a step that supports it
(:func:`kdguard.ssl.simclr.simclr_step`) keeps its shard (``loop.shard``), runs
``loop.forward(model)`` (the data-parallel wrapper) and gathers what its loss needs from the whole
batch (``loop.gather``); see :mod:`kdguard.train.engine`.

Frozen models (the clean encoder of BadEncoder, the teacher of the defence) are passed as
``frozen``: they are moved to the device and kept in eval mode, never optimised and never saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import KDGuardError
from ..log import bar_disabled
from ..optim import current_lr
from ..train.engine import HISTORY_FILE, STATE_FILE, EpochEngine

logger = logging.getLogger(__name__)

__all__ = ["HISTORY_FILE", "STATE_FILE", "EpochLog", "SSLLoop", "Step"]

Step = Callable[[torch.Tensor, "SSLLoop"], dict[str, torch.Tensor]]


@dataclass
class EpochLog:
    """One epoch: mean of each loss term over its steps, learning rate, wall time."""

    epoch: int
    lr: float
    losses: dict[str, float]
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


class SSLLoop(EpochEngine):
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

    record_type = EpochLog
    restart_fix = "delete it to restart this stage from scratch"

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, run_dir: str | Path | None = None,
                 seed: int = 0, desc: str = "ssl", frozen: Sequence[nn.Module] = (),
                 params: Sequence[nn.Parameter] | None = None) -> None:
        if cfg.epochs < 1 or cfg.batch_size < 2:
            raise KDGuardError(f"epochs={cfg.epochs}, batch_size={cfg.batch_size}: need epochs >= 1 "
                               "and batch_size >= 2", "set train.epochs and train.batch_size")
        self.frozen = list(frozen)
        self._setup(module, cfg, net=module, run_dir=run_dir, desc=desc, movable=self.frozen)
        for m in self.frozen:
            m.eval().requires_grad_(False)
        trainable = list(params) if params is not None else [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise KDGuardError(f"{desc}: nothing to train (no parameter requires a gradient)",
                               "check which parts of the model are frozen")
        self._init_optimizer(trainable, seed)

    # -- loop -------------------------------------------------------------------------------
    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float images → float [0, 1] on the loop's device, in the model's layout."""
        x = images.to(self.device, non_blocking=True)
        return self.layout(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float())

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels_last memory format when the loop uses it (shape unchanged)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, model: nn.Module) -> nn.Module:
        """What a step calls to run ``model``: the loop's data-parallel wrapper when ``model`` is
        the trained module and the loop runs under torchrun, else ``model``."""
        return self.forward_module if model is self.module else model

    def fit(self, n: int, step: Step, *, resume: bool = True) -> list[EpochLog]:
        """Train for the remaining epochs over ``n`` items; ``step`` gets int64 index batches.

        Every epoch draws a permutation of ``range(n)`` and drops the last incomplete batch
        (batch-norm and the contrastive loss misbehave on tiny batches). Returns the history.
        """
        if n < 2:
            raise KDGuardError(f"{self.desc}: {n} training item(s) is too few", "give at least 2 images")
        if resume:
            self.try_resume()
        bs = min(self.cfg.batch_size, n)
        steps = n // bs
        start = self.start_epoch = len(self.history)
        self.begin(steps, bs)
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
                lr = current_lr(self.scheduler)
                with self.autocast():
                    losses = step(order[b * bs:(b + 1) * bs], self)
                self.step(losses)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
            sums, _ = self.epoch_totals(sums)
            means = {k: float(v) / steps for k, v in sums.items()}
            if not all(math.isfinite(v) for v in means.values()):
                raise KDGuardError(f"{self.desc}: loss became non-finite in epoch {epoch + 1}: {means}",
                                   "lower the learning rate (optim.lr) or enable grad_clip")
            log = EpochLog(epoch=epoch + 1, lr=lr, losses=means, seconds=time.perf_counter() - t0)
            self.finish_epoch(log)
            summary = " ".join(f"{k}={v:.4f}" for k, v in means.items())
            logger.info(f"[{self.desc}] epoch {epoch + 1}/{self.cfg.epochs} {summary} ({log.seconds:.1f}s)")
            logger.debug(f"[{self.desc}] epoch {epoch + 1}: lr={lr:.6g} after {steps} steps of {bs}")
        self.end()
        return self.history
