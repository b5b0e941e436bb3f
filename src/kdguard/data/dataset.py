"""The in-memory image dataset every other part of kdguard works on.

Images live as one ``uint8`` tensor of shape ``N×C×H×W`` (values 0–255) and labels as one
``int64`` tensor of shape ``N``. Keeping whole datasets as tensors lets triggers, poisoning and
augmentation work on batches (see ``docs/architecture.md``): per-sample Python loops are avoided.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import KDGuardError


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels of one split.

    Attributes:
        images: ``uint8`` tensor, ``N×C×H×W``, values 0–255.
        labels: ``int64`` tensor, ``N``, values in ``[0, num_classes)``.
        classes: class names, index = label.
        name: dataset name (e.g. ``"cifar10"``), kept for manifests and reports.
        mean, std: per-channel statistics of the *training* split in the 0–1 scale, used by
            models for input normalisation. Same for every split of a dataset.
        hflip: whether horizontal flips are a label-preserving augmentation (False for digits
            and traffic signs).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = "dataset"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    hflip: bool = False
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise KDGuardError(
                f"dataset {self.name!r} images must be a uint8 N×C×H×W tensor, got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}",
                "convert with (x * 255).round().to(torch.uint8) and permute to N×C×H×W",
            )
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise KDGuardError(
                f"dataset {self.name!r} has {len(self.images)} images but labels of shape "
                f"{tuple(self.labels.shape)}", "give one int64 label per image")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            object.__setattr__(self, "mean", tuple(self.mean[:1]) * self.channels
                               if len(self.mean) == 1 else self.mean)
            object.__setattr__(self, "std", tuple(self.std[:1]) * self.channels
                               if len(self.std) == 1 else self.std)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.channels, *self.image_size

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """Rows ``indices`` (int64 tensor or list) as a new dataset; tensors are copied."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return replace(self, images=self.images[idx].clone(), labels=self.labels[idx].clone())

    def with_images(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> "ImageDataset":
        return replace(self, images=images, labels=self.labels if labels is None else labels)

    def split(self, fraction: float, seed: int = 0) -> tuple["ImageDataset", "ImageDataset"]:
        """Stratified split into ``(rest, held_out)`` with ``fraction`` of each class held out.

        Used for the validation split (model selection) and for the clean subset a defender
        owns. Deterministic in ``seed``; raises :class:`KDGuardError` unless ``0 < fraction < 1``.
        """
        if not 0.0 < fraction < 1.0:
            raise KDGuardError(f"split fraction {fraction!r} is outside (0, 1)",
                               "give a fraction such as 0.1")
        held = self.stratified_indices(fraction, seed)
        mask = torch.ones(len(self), dtype=torch.bool)
        mask[held] = False
        return self.subset(mask.nonzero().squeeze(1)), self.subset(held)

    def stratified_indices(self, fraction: float, seed: int = 0) -> torch.Tensor:
        """Sorted indices of ``round(fraction·n_c)`` random images of each class ``c``."""
        gen = torch.Generator().manual_seed(seed)
        picked = []
        for c in range(self.num_classes):
            members = (self.labels == c).nonzero().squeeze(1)
            k = int(round(fraction * len(members)))
            picked.append(members[torch.randperm(len(members), generator=gen)[:k]])
        return torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)
