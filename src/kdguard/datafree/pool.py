"""Storage for synthesised data: a growing image pool and CMI's feature memory bank.

Both keep their tensors on the run's device (no host round trips per batch) and expose
``state_dict``/``load_state_dict`` with tensors and plain values only, so a run resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import KDGuardError


class ImagePool:
    """A pool of images that grows by one synthesis batch per round (CMI, DeepInversion) or is
    filled once (OOD proxy data).

    Images are stored as ``uint8`` ``N×C×H×W`` (the references save PNG files, i.e. they quantise
    to 8 bits too). :meth:`sample` walks through a random permutation of the pool and draws a
    new one when it is used up or when the pool has grown, like a shuffled ``DataLoader`` that
    the references rebuild after every synthesis; a batch that crosses the end of a permutation
    is completed from the next one, so every batch has exactly ``n`` images.

    Args:
        image_shape: ``(C, H, W)``.
        device: where the pool lives.
    """

    def __init__(self, image_shape: tuple[int, int, int], device: torch.device | str = "cpu") -> None:
        self.image_shape = tuple(int(v) for v in image_shape)
        self.device = torch.device(device)
        self.images = torch.empty(0, *self.image_shape, dtype=torch.uint8, device=self.device)
        self._order: torch.Tensor | None = None
        self._cursor = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def add(self, images: torch.Tensor) -> None:
        """Append float images in [0, 1] (clamped, rounded to 8 bits) or uint8 images.

        Raises:
            KDGuardError: wrong shape.
        """
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise KDGuardError(f"pool images have shape {tuple(images.shape)}, expected N×{self.image_shape}",
                               "add batches of the dataset's image shape")
        if images.dtype != torch.uint8:
            images = images.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        self.images = torch.cat([self.images, images.to(self.device)])
        self._order = None  # the references rebuild their loader after each synthesis

    def sample(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """``n`` images as ``uint8`` ``n×C×H×W`` in shuffled order (see the class docstring).

        Raises:
            KDGuardError: the pool is empty.
        """
        if len(self) == 0:
            raise KDGuardError("the image pool is empty", "call synthesize() before sample()")
        parts, need = [], n
        while need > 0:
            if self._order is None or self._cursor >= len(self._order):
                self._order = torch.randperm(len(self), generator=rng, device=rng.device).to(self.device)
                self._cursor = 0
            take = self._order[self._cursor:self._cursor + need]
            self._cursor += len(take)
            need -= len(take)
            parts.append(take)
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.images[idx]

    def latest(self, n: int) -> torch.Tensor:
        """The ``n`` most recently added images (uint8), for previews."""
        return self.images[-n:]

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images.cpu(), "order": None if self._order is None else self._order.cpu(),
                "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images = state["images"].to(self.device)
        self._order = None if state["order"] is None else state["order"].to(self.device)
        self._cursor = int(state["cursor"])


class MemoryBank:
    """A ring buffer of feature rows (CMI's bank of local+global instance features).

    Args:
        size: capacity in rows (CMI: 40,960).
        dim: feature length.
        device: where the rows live.

    :meth:`get` returns up to ``k`` distinct random rows among those filled so far (all
    ``size`` once the buffer has wrapped), as ``MemoryBank.get_data`` in the CMI code.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        if size < 1 or dim < 1:
            raise KDGuardError(f"memory bank size={size}, dim={dim} must be >= 1", "set cmi.bank_size >= 1")
        self.size, self.dim = int(size), int(dim)
        self.data = torch.zeros(self.size, self.dim, device=device)
        self.ptr = 0
        self.filled = 0

    def add(self, rows: torch.Tensor) -> None:
        """Write ``rows`` (``M×dim``) at the pointer, wrapping around; keeps the last ``size``."""
        rows = rows.detach().to(self.data.device, self.data.dtype)[-self.size:]
        idx = (torch.arange(len(rows), device=self.data.device) + self.ptr) % self.size
        self.data[idx] = rows
        self.ptr = (self.ptr + len(rows)) % self.size
        self.filled = min(self.size, self.filled + len(rows))

    def get(self, k: int, rng: torch.Generator) -> torch.Tensor:
        """Up to ``k`` random distinct filled rows (``min(k, filled)×dim``; empty when unfilled)."""
        if self.filled == 0 or k <= 0:
            return self.data[:0]
        idx = torch.randperm(self.filled, generator=rng, device=rng.device)[:k].to(self.data.device)
        return self.data[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.cpu(), "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data = state["data"].to(self.data.device)
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
