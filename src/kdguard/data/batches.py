"""Mini-batches straight from in-memory tensors, and the uint8 → float conversion for models.

Whole datasets already sit in memory as tensors (:class:`~kdguard.data.dataset.ImageDataset`),
so batching is indexing: no DataLoader, no worker processes, no per-sample Python work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import torch

from ..errors import KDGuardError
from .dataset import ImageDataset

Batchable = Union[ImageDataset, Sequence[torch.Tensor], int]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`iterate_batches` yields for ``n`` items."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(data: Batchable, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator:
    """Yield mini-batches of ``data`` in order or in a random permutation.

    Args:
        data: an :class:`ImageDataset` (yields ``(images uint8 B×C×H×W, labels int64 B)``),
            a sequence of tensors sharing their first dimension (yields a tuple of their
            ``B``-row slices), or an int ``n`` (yields int64 index tensors into ``range(n)``).
        batch_size: rows per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: draw one random permutation (``torch.randperm`` with ``generator``) per call;
            otherwise batches are contiguous views in order.
        generator: a CPU :class:`torch.Generator` for reproducible shuffling.
        drop_last: skip a final incomplete batch.

    Raises:
        KDGuardError: ``batch_size`` < 1, tensors of different lengths, or an unsupported type
            (raised by this call, before any batch is produced).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KDGuardError(f"batch size {batch_size!r} is not a positive integer",
                           "give e.g. batch_size=128")
    if isinstance(data, ImageDataset):
        tensors: tuple[torch.Tensor, ...] | None = (data.images, data.labels)
        n = len(data)
    elif isinstance(data, int) and not isinstance(data, bool):
        tensors, n = None, data
    elif isinstance(data, Sequence) and data and all(isinstance(t, torch.Tensor) for t in data):
        tensors, n = tuple(data), len(data[0])
        if any(len(t) != n for t in tensors):
            raise KDGuardError(f"tensors of lengths {[len(t) for t in tensors]} cannot be "
                               "batched together", "give tensors with the same first dimension")
    else:
        raise KDGuardError(f"cannot batch a {type(data).__name__}",
                           "pass an ImageDataset, a tuple of tensors or a length")
    order = torch.randperm(n, generator=generator) if shuffle else None
    return _batches(tensors, n, batch_size, order, drop_last)


def _batches(tensors: tuple[torch.Tensor, ...] | None, n: int, batch_size: int,
             order: torch.Tensor | None, drop_last: bool) -> Iterator:
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if tensors is None:
            yield order[start:end] if order is not None else torch.arange(start, end)
        elif order is None:
            yield tuple(t[start:end] for t in tensors)
        else:
            idx = order[start:end]
            yield tuple(t[idx.to(t.device)] for t in tensors)


def to_float(x: torch.Tensor, device: torch.device | str | None = None, *,
             channels_last: bool = False) -> torch.Tensor:
    """Images for a model: float32 in ``[0, 1]`` on ``device``.

    ``x`` is ``uint8`` (0–255, divided by 255 *after* the move, so a quarter of the bytes cross
    the bus; the copy is asynchronous when ``x`` is in pinned memory) or already floating point
    (assumed in ``[0, 1]``, only cast and moved). ``channels_last`` returns the
    ``torch.channels_last`` memory format (same ``N×C×H×W`` shape), which convolutions on
    recent GPUs run faster in.

    Raises:
        KDGuardError: ``x`` is neither uint8 nor floating point.
    """
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise KDGuardError(f"cannot turn a {x.dtype} tensor into images",
                           "pass uint8 images (0-255) or float images in [0, 1]")
    if device is not None:
        x = x.to(device, non_blocking=x.device.type == "cpu" and x.is_pinned())
    out = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
