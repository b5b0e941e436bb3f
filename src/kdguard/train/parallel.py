"""Data-parallel training under torchrun: the model wrapper, batch statistics over all shards, and
the gather of a batch's outputs (:mod:`kdguard.distributed` starts the processes).

Each process takes its shard of every batch (``batch_size / N`` images), and
:class:`torch.nn.parallel.DistributedDataParallel` averages the gradients, so a step follows the
gradient of the mean loss over the whole batch, as one process would.

BatchNorm layers in training mode normalise with the mean and variance of the whole batch, not
of the process's shard (:func:`sync_batch_norms`; Ioffe & Szegedy 2015, Alg. 1, over the union
of the shards): with per-shard statistics the result would depend on the number of processes.
:class:`torch.nn.SyncBatchNorm` computes the same, but it accepts no CPU tensors (gloo) and it
replaces the modules, which loses the forward hooks that feature taps registered on them and
their ``isinstance(m, nn.BatchNorm2d)``; here the layers keep their identity and only their
``forward`` is swapped while the loop trains. Every process computes the same statistics, so the
running averages stay equal on all of them.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import active, rank, world_size

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _GatherBatch(torch.autograd.Function):
    """All processes' ``x`` concatenated along dim 0 in rank order; the gradient of a process's
    part is the sum of the gradients every process computed for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[rank() * ctx.n:(rank() + 1) * ctx.n]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """The ``n×…`` shards of all processes as one ``(N·n)×…`` tensor in rank order (the batch a
    single process would hold), differentiable; ``x`` itself when the process runs alone.

    A loss computed on the gathered batch by every process, back-propagated and averaged by
    DistributedDataParallel, gives each parameter the gradient of that loss (the gather's
    backward sums the N processes' gradients, the average divides by N)."""
    return _GatherBatch.apply(x) if active() else x


def _synced_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and active()):
        return type(self).forward(self, x)
    self._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    count = xf.numel() // xf.shape[1] * world_size()  # the shards are equal
    mean = gather_batch(xf.sum(dims)[None]).sum(0) / count
    centred = xf - mean.view(shape)
    var = gather_batch((centred * centred).sum(dims)[None]).sum(0) / count  # biased, as BN normalises
    y = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.weight is not None:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - f).add_(mean, alpha=f)
            self.running_var.mul_(1 - f).add_(var * (count / max(count - 1, 1)), alpha=f)  # unbiased
    return y.to(x.dtype)


@contextlib.contextmanager
def sync_batch_norms(module: nn.Module) -> Iterator[None]:
    """While the block runs, the BatchNorm layers of ``module`` in training mode normalise with
    the statistics of the whole batch over all processes (see the module docstring); in eval mode,
    or when the process runs alone, they are unchanged. Nothing is swapped when alone."""
    layers = [m for m in module.modules() if isinstance(m, _BATCH_NORMS)] if active() else []
    for m in layers:
        m.forward = types.MethodType(_synced_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in :class:`DistributedDataParallel` on ``device`` when the process
    trains with others, else ``module`` itself.

    Buffers are not broadcast before each forward (``forward_sync_buffers=False``, earlier
    ``broadcast_buffers=False``): the BatchNorm
    statistics are the whole batch's on every process (:func:`sync_batch_norms`), so they stay
    equal; the wrapper's construction copies rank 0's parameters and buffers to every process.
    """
    if not active():
        return module
    # torch >= 2.13 names the option forward_sync_buffers (broadcast_buffers is deprecated there)
    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{"forward_sync_buffers" if new else "broadcast_buffers": False})


__all__ = ["data_parallel", "gather_batch", "sync_batch_norms"]
