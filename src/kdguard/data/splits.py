"""Train / validation / test splits of a job's dataset and the defender's clean share.

Every supervised job (teacher, distillation, defences, RobustKD) holds out ``val_fraction`` of
the training split for validation curves (:func:`load_splits`); jobs that distil or defend train
on :func:`clean_subset` of the rest. The test split is used only for final metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from ..errors import check_range
from ..augment import Augment
from .dataset import ImageDataset
from .registry import load_dataset


@dataclass
class SplitData:
    """Train (without validation), validation and test splits of one dataset."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset


def load_splits(cfg: DataConfig, seed: int = 0) -> SplitData:
    """Load train/test and hold out ``val_fraction`` of train (stratified, seeded) for validation."""
    check_range("validation fraction", cfg.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    train = load_dataset(cfg.name, "train", root=cfg.root)
    test = load_dataset(cfg.name, "test", root=cfg.root)
    rest, val = train.split(cfg.val_fraction, seed=seed)
    return SplitData(rest, val, test)


def make_augment(cfg: DataConfig, ds: ImageDataset) -> Augment | None:
    """Random 4-pixel-padded crops (and flips where the dataset allows them) when ``cfg.augment``."""
    return Augment(crop_padding=4, hflip=ds.hflip) if cfg.augment else None


def clean_subset(data: SplitData, fraction: float, seed: int) -> ImageDataset:
    """The defender's clean data: ``fraction`` of the *whole* training set, from the train split.

    Same rule for every job that distils or defends: the validation split is held out first, so
    the share of the remaining train split is ``fraction · (n_train + n_val) / n_train``
    (capped at 1), drawn per class (stratified) with seed ``seed + 1``.

    Args:
        data: splits from :func:`load_splits`.
        fraction: in (0, 1].
        seed: the run's seed.

    Returns:
        An :class:`ImageDataset` (uint8 images, int64 labels) of about
        ``fraction · (n_train + n_val)`` images.

    Raises:
        KDGuardError: ``fraction`` outside (0, 1].
    """
    check_range("clean fraction", fraction, 0.0, 1.0, low_open=True)
    full = len(data.train) + len(data.val)
    share = min(1.0, fraction * full / len(data.train))
    if share >= 1.0:
        return data.train
    return data.train.subset(data.train.stratified_indices(share, seed=seed + 1))
