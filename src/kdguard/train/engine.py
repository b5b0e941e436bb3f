"""The epoch engine under :class:`~kdguard.train.Trainer` and :class:`~kdguard.ssl.loop.SSLLoop`.

Both loops train a module for ``train.epochs`` epochs over a shuffled order of their items; they
differ only in what one step computes (cross-entropy or a distiller's terms on labelled batches;
an SSL step function on index batches) and in what an epoch records. The engine owns the rest:

* device, bf16 autocast and channels_last (:mod:`kdguard.runtime`), decided for ``net``;
* the optimiser (:func:`kdguard.optim.build_optimizer`) and its learning-rate scheduler
  (:func:`kdguard.optim.epoch_scheduler`: warm-up, schedule, extensions), one update per step
  (:meth:`StepEngine.step`: summed loss, backward, ``train.grad_clip``, step, scheduler step);
* the seeded :class:`torch.Generator` that shuffles and augments;
* resumption: ``train_state.pt`` (weights without frozen parts, optimiser, generator, history,
  planned length, schedule extensions, scheduler state; tensors and plain containers only, read
  with ``weights_only=True``) written atomically after every epoch, then the epoch's line in
  ``metrics.jsonl``; a restarted run continues from the last finished epoch and rewrites
  ``metrics.jsonl`` to the restored epochs; a longer ``train.epochs`` on resume stretches the rest
  of the schedule (:func:`kdguard.optim.schedule_progress`).

The mechanics that do not depend on epochs live in :class:`StepEngine` and the functions beside
it, which the round-based :class:`~kdguard.datafree.loop.DataFreeLoop` shares: placing modules
(:func:`place_modules`), one optimiser update over an explicit parameter list
(:func:`optimizer_step`, :func:`clip_and_step`), the atomically written state file and the
reconciliation of ``metrics.jsonl`` with the restored history (:func:`sync_history_file`).

Under torchrun (:mod:`kdguard.distributed`) the epoch loops train data-parallel: every process
draws the same shuffled order and augments the whole batch with the same generator, then keeps
its shard (:meth:`EpochEngine.shard`), so the shards of one step are the batch a single process
would take; :class:`~torch.nn.parallel.DistributedDataParallel` (:attr:`EpochEngine.forward_module`)
averages the gradients and BatchNorm uses the whole batch's statistics
(:mod:`kdguard.train.parallel`). Only rank 0 writes the state file and ``metrics.jsonl`` and
evaluates; the others read the restored state and the evaluation results from it
(:func:`kdguard.distributed.from_main`). The epoch's loss means and counts are summed over the
processes (:meth:`EpochEngine.epoch_totals`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..distributed import active, from_main, is_main, per_process_batch, rank, sum_across, world_size
from ..errors import KDGuardError
from ..io import append_jsonl, atomic_write, write_text
from ..optim import build_optimizer, epoch_scheduler, extend_schedule
from ..runtime import autocast, resolve_device, use_bf16, use_channels_last
from .parallel import data_parallel, gather_batch, sync_batch_norms

STATE_FILE = "train_state.pt"
HISTORY_FILE = "metrics.jsonl"


def sync_history_file(path: Path, stage: str, records: Sequence[Mapping[str, Any]], *,
                      keep_other_stages: bool = True) -> None:
    """Make the ``stage`` lines of JSON-lines file ``path`` exactly ``records`` (one line each,
    ``{"stage": stage, **record}``); lines of other stages are kept (dropped with
    ``keep_other_stages=False``: the file is the stage's own), unreadable lines (a write cut by a
    kill) dropped. Written atomically, and only when something changes."""
    own = [json.dumps({"stage": stage, **r}, default=_plain) for r in records]
    old = path.read_text().splitlines() if path.exists() else []
    kept = []
    for line in old if keep_other_stages else ():
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


def place_modules(modules: Sequence[nn.Module], device: torch.device, *, amp: str, channels_last: str,
                  net: nn.Module) -> tuple[bool, bool]:
    """Move ``modules`` to ``device`` (and to channels_last memory format where it pays off for
    ``net``, :func:`kdguard.runtime.use_channels_last`); return ``(bf16, channels_last)``, bf16
    autocast decided by :func:`kdguard.runtime.use_bf16` for ``net``.

    Raises:
        KDGuardError: ``amp`` or ``channels_last`` is not auto, on or off.
    """
    bf16 = use_bf16(amp, device, net)
    cl = use_channels_last(channels_last, device, net)
    for m in modules:
        m.to(device)
        if cl:
            m.to(memory_format=torch.channels_last)
    return bf16, cl


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors ``optimizer`` updates, in param-group order (the order gradient clipping sums
    their norms in)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def clip_and_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                  grad_clip: float | None) -> None:
    """Clip the global gradient norm of ``params`` to ``grad_clip`` (``None``/0: no clipping;
    tensors without a gradient are skipped) and take ``optimizer``'s step."""
    if grad_clip:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Sequence[torch.Tensor],
                   grad_clip: float | None, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """One update: zero the gradients, back-propagate the scalar ``loss``, clip ``params``
    (:func:`clip_and_step`), step, then ``scheduler``'s step when given."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(optimizer, params, grad_clip)
    if scheduler is not None:
        scheduler.step()


def read_state_file(path: Path) -> dict[str, Any]:
    """A state file written by :meth:`StepEngine.write_state`, loaded as data onto the CPU
    (``weights_only=True``: tensors and plain containers only).

    Raises:
        Exception: whatever :func:`torch.load` raises on an unreadable file (callers name the fix).
    """
    return torch.load(path, map_location="cpu", weights_only=True)


class StepEngine:
    """What every kdguard training loop shares, epochs or rounds: the device and precision
    (``device``, ``bf16``, :meth:`autocast`), the optimiser with its explicit parameter list
    (``optimizer``, ``params``, :meth:`step`), the state file in ``run_dir`` (:meth:`write_state`,
    :meth:`read_state`) and the ``desc`` lines of ``metrics.jsonl`` (:meth:`sync_history`).

    Subclasses set ``device``, ``bf16``, ``run_dir`` and ``desc``, then call
    :meth:`_init_step_engine` with the optimiser they built; ``own_history_file`` true means
    ``metrics.jsonl`` holds this loop's lines only (lines of other stages are dropped). Under
    torchrun only rank 0 writes (``writer``); every process reads the state rank 0 read.
    """

    device: torch.device
    bf16: bool = False
    run_dir: Path | None = None
    desc: str = ""
    own_history_file = False

    def _init_step_engine(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        self.optimizer = optimizer
        self.params = trained_parameters(optimizer)
        self.grad_clip = grad_clip
        self.scheduler: Any = None  # the learning-rate scheduler, built when the loop starts
        self.writer = is_main()  # under torchrun, rank 0 alone writes the run's files

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the loop's device when it pays off (else a no-op context)."""
        return autocast(self.device, self.bf16)

    def step(self, losses: Mapping[str, torch.Tensor], *, scheduler_step: bool = True) -> None:
        """One optimiser update on the sum of ``losses`` (:func:`optimizer_step`), with the
        scheduler's step to the next learning rate unless ``scheduler_step`` is false."""
        optimizer_step(self.optimizer, sum(losses.values()), self.params, self.grad_clip,
                       self.scheduler if scheduler_step else None)

    def write_state(self, name: str, state: Mapping[str, Any]) -> None:
        """Write ``state`` to ``run_dir/name`` atomically (nothing without a run directory, or on
        a process other than rank 0)."""
        if self.run_dir is not None and self.writer:
            atomic_write(self.run_dir / name, lambda p: torch.save(state, p))

    def read_state(self, name: str) -> dict[str, Any] | None:
        """``run_dir/name`` loaded by :func:`read_state_file`, or None without one (under
        torchrun: read by rank 0 and sent to every process).

        Raises:
            Exception: as :func:`read_state_file` (callers name the fix).
        """
        path = self.run_dir / name if self.run_dir else None
        if path is None:
            return None
        return from_main(lambda: read_state_file(path) if path.exists() else None)

    def sync_history(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Make the ``desc`` lines of ``run_dir/metrics.jsonl`` exactly ``records``
        (:func:`sync_history_file`; nothing without a run directory or off rank 0)."""
        if self.run_dir is not None and self.writer:
            sync_history_file(self.run_dir / HISTORY_FILE, self.desc, records,
                              keep_other_stages=not self.own_history_file)


class EpochEngine(StepEngine):
    """Shared state and mechanics of an epoch loop (see the module docstring).

    Subclasses call :meth:`_setup` (device, precision, moving the modules) and then
    :meth:`_init_optimizer` with the parameters to train, and set ``record_type`` (the dataclass of
    one history entry, built from its ``asdict``).

    Attributes:
        frozen_prefixes: state-dict key prefixes that are not part of the run's state (a
            distiller's ``teacher.``): neither saved nor required on resume.
        restart_fix: the fix named when ``train_state.pt`` cannot be read.
    """

    record_type: type = dict
    frozen_prefixes: tuple[str, ...] = ()
    restart_fix = "delete it to restart the run from scratch"

    def _setup(self, module: nn.Module, cfg: TrainConfig, *, net: nn.Module, run_dir: str | Path | None,
               desc: str, movable: Sequence[nn.Module] = ()) -> None:
        self.module, self.cfg, self.desc = module, cfg, desc
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = resolve_device(cfg.device)
        self.bf16, self.channels_last = place_modules([module, *movable], self.device, amp=cfg.amp,
                                                      channels_last=cfg.channels_last, net=net)
        #: what a step calls to run ``module`` forward: the data-parallel wrapper under torchrun
        self.forward_module: nn.Module = module
        self._shard = slice(None)
        self._parallel = contextlib.ExitStack()

    def _init_optimizer(self, params: Iterable[nn.Parameter], seed: int) -> None:
        self._init_step_engine(build_optimizer(list(params), self.cfg.optim), self.cfg.grad_clip)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[Any] = []
        self.start_epoch = 0
        # the length the restored state was planned for, and the schedule's extensions
        self.planned_epochs = self.cfg.epochs
        self.segments: list[dict[str, float]] = []
        self._saved_scheduler: dict[str, Any] = {}  # the restored scheduler's state

    # -- state ------------------------------------------------------------------------------
    def _frozen(self, key: str) -> bool:
        return key.startswith(self.frozen_prefixes) if self.frozen_prefixes else False

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()
                if not self._frozen(k)}

    def save_state(self) -> None:
        """Write ``train_state.pt`` atomically (nothing without a run directory, or off rank 0)."""
        if self.run_dir is None or not self.writer:
            return
        self.write_state(STATE_FILE, {
            "epoch": len(self.history),
            "module": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "history": [asdict(r) for r in self.history],
            "total_epochs": self.cfg.epochs,
            "schedule": [dict(s) for s in self.segments],
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
        })

    def try_resume(self) -> bool:
        """Load ``train_state.pt`` from ``run_dir`` if present; return whether it resumed.

        Raises:
            KDGuardError: the file is unreadable or holds another model's weights.
        """
        path = self.run_dir / STATE_FILE if self.run_dir else None
        try:
            state = self.read_state(STATE_FILE)
        except Exception as e:
            raise KDGuardError(f"cannot read training state {str(path)!r} ({type(e).__name__})",
                               self.restart_fix) from None
        if state is None:
            return False
        own = self.module.state_dict()
        saved = state["module"]
        missing = [k for k in own if k not in saved and not self._frozen(k)]
        unexpected = [k for k in saved if k not in own]
        reshaped = [k for k in saved if k in own and own[k].shape != saved[k].shape]
        if missing or unexpected or reshaped:
            raise KDGuardError(f"training state {str(path)!r} does not match this run's model",
                               "use a fresh output directory or delete train_state.pt")
        self.module.load_state_dict(saved, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.history = [self.record_type(**r) for r in state["history"]]
        self.start_epoch = int(state["epoch"])
        self.planned_epochs = int(state.get("total_epochs", self.cfg.epochs))
        self.segments = [dict(s) for s in state.get("schedule", [])]
        self._saved_scheduler = dict(state.get("lr_scheduler", {}))
        return True

    # -- loop -------------------------------------------------------------------------------
    def _extended(self) -> None:
        """Called after :meth:`begin` lengthened the schedule (a hook for warnings)."""

    def begin(self, steps_per_epoch: int, batch: int | None = None) -> None:
        """Before the first epoch to run: stretch the schedule if ``train.epochs`` grew, build the
        scheduler at the start step, and make ``metrics.jsonl`` hold exactly the restored epochs.

        Under torchrun also: this process's shard of a ``batch`` (the per-step batch; the
        processes take ``batch / N`` images each, in rank order), the data-parallel wrapper and
        whole-batch BatchNorm statistics until :meth:`end`.

        Raises:
            KDGuardError: ``batch`` does not split evenly over the processes.
        """
        if active() and batch is not None:
            per = per_process_batch(batch)
            self._shard = slice(rank() * per, (rank() + 1) * per)
        if self.planned_epochs < self.cfg.epochs and self.start_epoch < self.cfg.epochs:
            self.segments = extend_schedule(self.segments, done_epochs=self.start_epoch,
                                            planned_epochs=self.planned_epochs, steps_per_epoch=steps_per_epoch)
            self.planned_epochs = self.cfg.epochs
            self._extended()
        self.scheduler = epoch_scheduler(self.optimizer, self.cfg.optim, epochs=self.cfg.epochs,
                                         steps_per_epoch=steps_per_epoch, start_epoch=self.start_epoch,
                                         segments=self.segments, saved=self._saved_scheduler,
                                         what=repr(self.desc))
        self.sync_history([asdict(r) for r in self.history])
        if active():
            self._parallel.enter_context(sync_batch_norms(self.module))
            self.forward_module = data_parallel(self.module, self.device)

    def end(self) -> None:
        """After the last epoch: BatchNorm layers back to their own forward (see :meth:`begin`)."""
        self._parallel.close()
        self.forward_module = self.module

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole ``batch`` (dim 0; ``batch`` itself when alone)."""
        return batch[self._shard] if active() else batch

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        """All processes' shards of ``x`` as the whole batch, differentiable
        (:func:`kdguard.train.parallel.gather_batch`; ``x`` itself when alone)."""
        return gather_batch(x)

    def epoch_totals(self, sums: dict[str, torch.Tensor], *counts: torch.Tensor | int
                     ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | int]]:
        """An epoch's summed loss terms (each process's mean over its shard) averaged over the
        processes, and ``counts`` summed over them; unchanged when alone."""
        if not active():
            return sums, list(counts)
        values = [torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(())
                  for v in (*sums.values(), *counts)]
        total = sum_across(torch.stack(values))
        n = world_size()
        means = {k: total[i] / n for i, k in enumerate(sums)}
        return means, [int(math.floor(float(c) + 0.5)) for c in total[len(sums):]]

    def finish_epoch(self, record: Any) -> None:
        """Append ``record`` to the history, then write the state, then its ``metrics.jsonl`` line
        (in this order, so a kill between the two leaves a state that :meth:`begin` reconciles)."""
        self.history.append(record)
        self.save_state()
        if self.run_dir is not None and self.writer:
            append_jsonl(self.run_dir / HISTORY_FILE, {"stage": self.desc, **asdict(record)})
