"""Device, precision and reproducibility helpers shared by training and evaluation."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .distributed import local_device, local_processes
from .errors import KDGuardError

# Architectures too small for bf16/channels_last to pay off on CPU (platform notes: LeNet-size
# nets are faster in fp32 NCHW).
_SMALL_ARCHS = {"lenet5"}


def resolve_device(name: str = "auto", *, setting: str = "train.device") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``. Under
    torchrun a CUDA device is this process's own, ``cuda:LOCAL_RANK``
    (:func:`kdguard.distributed.local_device`).

    Args:
        setting: where the user gave ``name``, for the error's fix: a job key such as
            ``"train.device"``/``"device"``/``"probe.device"``, or a CLI option such as ``"--device"``.

    Raises:
        KDGuardError: an unknown device name, or a CUDA device on a machine without CUDA.
    """
    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    sep = " " if setting.startswith("-") else "="
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KDGuardError(f"unknown device {name!r}",
                           f"set {setting}{sep}auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDGuardError(f"device {name!r} requested but CUDA is not available",
                           f"set {setting}{sep}cpu (or auto)")
    return local_device(device)


@functools.cache
def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, e.g. ``"AMD EPYC 7B13"``.

    The first ``model name`` line of ``cpuinfo`` (Linux, where ``platform.processor()`` is
    empty), else ``platform.processor()``, else the architecture (``platform.machine()``).
    """
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label(device: torch.device | str = "auto") -> str:
    """What ran a measurement, for benchmark records: the CPU's name (:func:`cpu_name`), or
    ``"<GPU name> (<CPU> host)"`` when ``device`` is CUDA.

    Raises:
        KDGuardError: as :func:`resolve_device` for a device string it cannot resolve.
    """
    cpu = cpu_name()
    resolved = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return f"{torch.cuda.get_device_name(resolved)} ({cpu} host)" if resolved.type == "cuda" else cpu


def _switch(name: str, setting: object) -> str:
    # YAML reads a bare `off`/`on` as a boolean, which OmegaConf then stores as "False"/"True".
    value = str(setting).strip().lower()
    value = {"false": "off", "true": "on", "0": "off", "1": "on"}.get(value, value)
    if value not in ("auto", "on", "off"):
        raise KDGuardError(f"{name} setting {setting!r} is not valid", "use auto, on or off")
    return value


# CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix arithmetic. Without one of them
# oneDNN emulates bf16 and a training step gets many times slower than fp32 (measured by
# benchmarks/cpu_precision.py; docs/results.md "CPU precision").
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16).

    Reads the ``flags`` line of ``cpuinfo`` (Linux). Where that file is missing (macOS, Windows)
    the answer is ``False``: fp32 is never slow, emulated bf16 is.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return not _NATIVE_BF16_FLAGS.isdisjoint(line.split(":", 1)[-1].split())
    return False


def use_bf16(setting: str, device: torch.device, model: nn.Module) -> bool:
    """Decide bf16 autocast: ``"on"``/``"off"``, or ``"auto"``.

    ``"auto"`` is on for CUDA devices that support bf16, and on CPU only when the CPU computes bf16
    natively (:func:`cpu_has_native_bf16`) and the net is not tiny (LeNet-size nets run faster
    in fp32). ``"on"`` forces bf16 even on CPUs that emulate it.

    Raises:
        KDGuardError: ``setting`` is not auto, on or off.
    """
    setting = _switch("amp", setting)
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16() and getattr(model, "arch", None) not in _SMALL_ARCHS


def use_channels_last(setting: str, device: torch.device, model: nn.Module) -> bool:
    """Decide channels_last memory format: ``"on"``/``"off"``/``"auto"`` (off for tiny nets)."""
    setting = _switch("channels_last", setting)
    if setting != "auto":
        return setting == "on"
    return getattr(model, "arch", None) not in _SMALL_ARCHS


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA when ``enabled``; a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: ``n``, else ``$KDGUARD_NUM_THREADS``, else all usable cores
    (under torchrun: divided by the processes on the machine, ``LOCAL_WORLD_SIZE``, at least 1).

    On a machine shared with other jobs, fewer threads than cores is much faster: OpenMP threads
    busy-wait at every barrier for a descheduled sibling (measured here: 1 thread ran a SimCLR
    step >10× faster than 2 threads on 2 loaded cores). Returns the number set.
    """
    env = os.environ.get("KDGUARD_NUM_THREADS")
    if n is None and env:
        try:
            n = int(env)
        except ValueError:
            raise KDGuardError(f"KDGUARD_NUM_THREADS={env!r} is not an integer",
                               "set it to a thread count such as 1 or 2") from None
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n //= local_processes()  # torchrun: the cores are shared by the processes on this machine
    n = max(1, n)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for the block and restore their previous modes afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
