"""One training run over several processes: ``torchrun --nproc_per_node N -m kdguard ...``.

torchrun starts N copies of a command and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``).
A job that can run that way (``train-teacher``, ``distill``, ``ssl-pretrain``) calls :func:`init`
when it opens its run directory (:meth:`kdguard.runs.RunContext.open`); every other job refuses
to (:func:`refuse`). With ``WORLD_SIZE`` unset or 1 nothing here does anything: a single process
runs exactly the code it ran before.

* Backend: gloo on the CPU, NCCL on CUDA, each process on ``cuda:LOCAL_RANK``
  (:func:`local_device`).
* Rank 0 is the only process that touches the run directory and prints progress: what the others
  need from it (the opened directory, the restored state, evaluation results) is computed there
  and broadcast (:func:`from_main`), errors included.
* The batch of ``train.batch_size`` images is split into N equal shards of ``batch_size / N``
  (:func:`per_process_batch`); the training loops (:mod:`kdguard.train.parallel`) keep the
  union of the shards of one step equal to the batch a single process would take.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import KDGuardError

T = TypeVar("T")

#: the commands that run under torchrun (named in :func:`refuse`'s fix)
COMMANDS = ("train-teacher", "distill", "ssl-pretrain")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise KDGuardError(f"environment variable {name}={value!r} is not an integer",
                           "launch the command with torchrun, or unset the torchrun variables") from None


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 outside torchrun)."""
    return _env_int("LOCAL_RANK", 0)


def local_processes() -> int:
    """How many processes torchrun started on this machine (``LOCAL_WORLD_SIZE``; 1 outside it)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def active() -> bool:
    """Whether this process trains together with others (a process group of size > 1 is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the run (0 when it runs alone)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """How many processes share the run (1 when it runs alone)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and prints progress: rank 0 (or the only process).

    Before :func:`init`, the rank torchrun gave (``RANK``) decides."""
    return rank() == 0 if active() else _env_int("RANK", 0) == 0 or not launched()


def local_device(device: torch.device) -> torch.device:
    """``device`` for this process: under torchrun every CUDA device becomes ``cuda:LOCAL_RANK``
    (one GPU per process); other devices and single processes are unchanged."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", local_rank())
    return device


def refuse(what: str) -> None:
    """Raise :class:`KDGuardError` when ``what`` (a job or command) is started by torchrun with
    several processes: it runs as one process only."""
    if launched():
        raise KDGuardError(f"{what} runs as one process, but torchrun started it with "
                           f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}",
                           f"run it without torchrun; torchrun runs {', '.join(COMMANDS)}")


def init(device: torch.device) -> None:
    """Join the run's process group when torchrun started several processes (once per process):
    NCCL when ``device`` is CUDA (after selecting ``cuda:LOCAL_RANK``), else gloo."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():  # pragma: no cover - torch builds without distributed support
        raise KDGuardError("this torch build has no torch.distributed", "run the command as one process")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    """Leave the process group (nothing when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def per_process_batch(batch: int, setting: str = "train.batch_size") -> int:
    """The images each process takes per step: ``batch / world_size()`` (``batch`` alone).

    Raises:
        KDGuardError: ``batch`` is not a multiple of the number of processes.
    """
    n = world_size() if active() else _env_int("WORLD_SIZE", 1)
    if batch % n:
        raise KDGuardError(f"a batch of {batch} images does not split evenly over {n} processes "
                           f"({setting} is divided by --nproc_per_node)",
                           f"set {setting} to a multiple of {n}")
    return batch // n


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` computed by rank 0 and broadcast to every process (just ``fn()`` when alone).

    An exception on rank 0 is raised there as it was, and on the other ranks as a
    :class:`KDGuardError` with the same message (other exceptions: a :class:`RuntimeError`
    naming it), so no process waits for a result that never comes. The result travels pickled
    between the run's own processes (a run directory path, a training state, metrics).
    """
    if not active():
        return fn()
    box: list[Any] = [None]
    error: BaseException | None = None
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = e
            box[0] = ("error", type(e).__name__, str(e), getattr(e, "problem", None), getattr(e, "fix", None))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        _, name, text, problem, fix = box[0]
        if problem is not None:
            raise KDGuardError(problem, fix)
        raise RuntimeError(f"on rank 0: {name}: {text}")
    return box[0][1]


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes (``t`` itself when alone); every process gets the sum."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


__all__ = ["COMMANDS", "active", "from_main", "init", "is_main", "launched", "local_device", "local_processes",
           "local_rank", "per_process_batch", "rank", "refuse", "shutdown", "sum_across", "world_size"]
