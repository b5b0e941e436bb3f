"""Datasets as in-memory uint8 tensors, their loaders and cache (augmentation: :mod:`kdguard.augment`)."""

from .dataset import ImageDataset
from .registry import (DATA_ROOT_ENV, DATASETS, DEFAULT_DATASET, SPLITS, dataset_names,
                       default_data_root, load_dataset, resolve_data_root)
from . import loaders  # noqa: E402,F401  (registers the built-in datasets)
from .loaders import CIFAR10_CLASSES, GTSRB_CLASSES, register_imagefolder
from .cache import CACHE_ENV, KNOWN_MD5, ArrayCache, download, resolve_cache_dir, verify_md5
from .batches import iterate_batches, num_batches, to_float
from .splits import SplitData, clean_subset, load_splits, make_augment

__all__ = [
    "ImageDataset", "DATASETS", "DEFAULT_DATASET", "SPLITS", "DATA_ROOT_ENV", "CACHE_ENV",
    "load_dataset", "dataset_names", "default_data_root", "resolve_data_root",
    "register_imagefolder", "CIFAR10_CLASSES", "GTSRB_CLASSES",
    "ArrayCache", "KNOWN_MD5", "verify_md5", "download", "resolve_cache_dir",
    "iterate_batches", "num_batches", "to_float",
    "SplitData", "clean_subset", "load_splits", "make_augment",
]
