"""The synthesizer interface: one object owns a generator (or an image pool) and produces data.

``synthesize()`` runs one round of generator or input optimisation and returns its named
losses (detached scalar tensors, averaged over the round's steps, left on the device so no
host synchronisation happens). ``sample(n)`` always returns a float tensor ``n×C×H×W`` in the
models' input space, without gradient: ``[0, 1]`` for every synthesizer except a ZSKT generator
with the (reference) ``affine`` output mapping, whose images are unbounded (see
:mod:`kdguard.datafree.generators`).

Extension point ``generator_regularizers`` (ABD's Shuffling Vaccine): callables
``(x, teacher_logits) -> {name: scalar}`` evaluated at every generator/input step on the batch
the teacher just saw (with gradients through ``x``) and *added* to the loss being minimised.
Their names are prefixed with ``reg/`` in the logs. A regulariser with ``state_dict`` /
``load_state_dict`` methods is checkpointed with the synthesizer.
"""

from __future__ import annotations

import contextlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...errors import KDGuardError
from ...runtime import autocast
from ..student import frozen

GeneratorRegularizer = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class Synthesizer(ABC):
    """Base class: shared state (models, RNGs, regularisers) and checkpointing.

    Args:
        teacher: frozen teacher (eval mode, no parameter gradients).
        student: the student (the synthesizer only reads it; adversarial terms use it).
        image_shape: ``(C, H, W)``.
        num_classes: K.
        device: where synthesis runs.
        seed: seeds the synthesizer's own tensor RNG (on ``device``) and host RNG.
        bf16: run forward passes under bf16 autocast.
    """

    #: The registry name of the method family, for logs.
    name = "synthesizer"
    #: Whether ``sample`` returns the same batch object for every student step of a round (then
    #: the loop computes the teacher's outputs once per round).
    reuses_batch = False

    def __init__(self, teacher: nn.Module, student: nn.Module, *, image_shape: tuple[int, int, int],
                 num_classes: int, device: torch.device, seed: int = 0, bf16: bool = False) -> None:
        if any(p.requires_grad for p in teacher.parameters()):
            raise KDGuardError("the teacher's parameters require gradients",
                               "freeze it first: for p in teacher.parameters(): p.requires_grad_(False)")
        self.teacher = teacher
        self.student = student
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.bf16 = bool(bf16)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.host_rng = random.Random(seed)
        self.generator_regularizers: list[GeneratorRegularizer] = []

    # -- interface ----------------------------------------------------------------------------
    @abstractmethod
    def synthesize(self) -> dict[str, torch.Tensor]:
        """Run one round of synthesis; return named, detached scalar losses."""

    @abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """``n`` images, float ``n×C×H×W`` in the models' input space, no gradient."""

    def preview(self, n: int) -> torch.Tensor:
        """Up to ``n`` recent synthetic images for a PNG grid, float in [0, 1] on the CPU."""
        return self.sample(n).detach().float().clamp(0.0, 1.0).cpu()

    def set_progress(self, round_index: int, total_rounds: int) -> None:
        """Called at the start of every round (learning-rate schedules); default: nothing."""

    def close(self) -> None:
        """Remove hooks the synthesizer installed on the models."""

    # -- helpers for subclasses ----------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.bf16)

    def regularizer_losses(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum up the ``generator_regularizers`` on one batch as ``{"reg/<name>": scalar}``.

        Raises:
            KDGuardError: a regulariser returned something other than a dict of scalar tensors.
        """
        out: dict[str, torch.Tensor] = {}
        for fn in self.generator_regularizers:
            terms = fn(x, teacher_logits)
            if not isinstance(terms, dict) or not all(
                    isinstance(v, torch.Tensor) and v.dim() == 0 for v in terms.values()):
                raise KDGuardError(f"generator regularizer {getattr(fn, '__name__', fn)!r} did not "
                                   "return a dict of scalar tensors", "return {name: scalar loss}")
            for k, v in terms.items():
                key = f"reg/{k}"
                out[key] = out[key] + v if key in out else v
        return out

    @contextlib.contextmanager
    def student_as_critic(self, mode: str) -> Iterator[None]:
        """The student during a generator step: in ``mode`` ("train" or "eval") and with frozen
        weights (gradients reach the images only); its previous mode is restored afterwards."""
        was_training = self.student.training
        self.student.train(mode == "train")
        try:
            with frozen(self.student):
                yield
        finally:
            self.student.train(was_training)

    @staticmethod
    def _mean_losses(sums: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
        return {k: v / max(steps, 1) for k, v in sums.items()}

    @staticmethod
    def _accumulate(sums: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            sums[k] = sums[k] + v if k in sums else v

    # -- checkpointing -------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Subclass state (generators, optimisers, pools) as tensors and plain containers."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        regs = {str(i): fn.state_dict() for i, fn in enumerate(self.generator_regularizers)
                if hasattr(fn, "state_dict")}
        return {"rng": self.rng.get_state(), "host_rng": self.host_rng.getstate(),
                "extra": self.extra_state(), "regularizers": regs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        host = state["host_rng"]
        self.host_rng.setstate((host[0], tuple(host[1]), host[2]))
        self.load_extra_state(state["extra"])
        for i, fn in enumerate(self.generator_regularizers):
            if hasattr(fn, "load_state_dict") and str(i) in state.get("regularizers", {}):
                fn.load_state_dict(state["regularizers"][str(i)])


def check_image_batch(x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """Raise :class:`KDGuardError` unless ``x`` is a float ``N×shape`` batch."""
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape) or not x.is_floating_point():
        raise KDGuardError(f"{what} produced {x.dtype} images of shape {tuple(x.shape)}, "
                           f"expected float N×{tuple(shape)}", "check the generator's image shape")


class PooledSynthesizer(Synthesizer):
    """A synthesizer that keeps its images in a uint8 pool (``self.pool``) and matches the
    teacher's BatchNorm statistics through hooks (``self.bn_stats``): DeepInversion and CMI.

    ``sample(n)`` draws ``n`` pooled images (float ``N×C×H×W`` in [0, 1]) and applies
    ``self.augment``; ``preview(n)`` gives the newest ``n`` images, unaugmented, on the CPU.
    """

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        x = self.pool.sample(n, self.rng).float().div_(255.0)
        return self.augment(x, generator=self.rng)

    def preview(self, n: int) -> torch.Tensor:
        return self.pool.latest(n).float().div(255.0).cpu()

    def close(self) -> None:
        self.bn_stats.remove()
