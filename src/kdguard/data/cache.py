"""On-disk cache of decoded datasets, file checksums and the optional official downloads.

Decoding CIFAR-10 or GTSRB from their image files takes 10–20 s; the decoded ``uint8`` arrays are
therefore kept as ``.npy`` files so later loads take well under a second. One cache entry per
(dataset, source, split) holds::

    <cache>/datasets/<dataset>/<source key>/<split>_images.npy   uint8  N×C×H×W
    <cache>/datasets/<dataset>/<source key>/<split>_labels.npy   int64  N
    <cache>/datasets/<dataset>/<source key>/<split>.json         classes, mean, std, fingerprint

The JSON file is written last and carries a fingerprint of the source files (names, sizes,
modification times); an entry whose fingerprint no longer matches is stale and gets rebuilt.
Every file is written with :func:`kdguard.io.atomic_write` (a temporary name in the same folder,
moved into place), so a crash or a concurrent writer never leaves a half-written entry.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import urllib.request
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KDGuardError
from ..io import atomic_write, write_npy, write_text

CACHE_ENV = "KDGUARD_CACHE"
"""Environment variable naming the cache folder (default ``~/.cache/kdguard``)."""

# Bump when the decoded layout changes, so old cache entries are rebuilt instead of misread.
CACHE_FORMAT = 1


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$KDGUARD_CACHE``, else ``~/.cache/kdguard``.

    The folder is created on first write, not here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/kdguard").expanduser()


def fingerprint(entries: Iterable[tuple[str, int, int]], *extra: Any) -> str:
    """SHA-256 hex digest of ``(name, size in bytes, mtime in ns)`` triples plus ``extra`` values.

    ``extra`` carries the decoding options (e.g. the image size) so that changing an option
    invalidates the cache entry just like changing a file does.
    """
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, list(extra)]).encode())
    for name, size, mtime_ns in entries:
        h.update(f"\0{name}\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()


def stat_entry(path: Path, name: str | None = None) -> tuple[str, int, int]:
    """``(name, size, mtime_ns)`` of one file, for :func:`fingerprint`."""
    st = path.stat()
    return (name if name is not None else path.name, st.st_size, st.st_mtime_ns)


@dataclass
class SplitArrays:
    """One decoded split as numpy arrays plus JSON-serialisable facts about it.

    Attributes:
        images: ``uint8`` array ``N×C×H×W``, C-contiguous, values 0–255.
        labels: ``int64`` array ``N``.
        info: ``classes`` (list of str), ``mean``/``std`` (per-channel, 0–1 scale, from the
            training split), ``hflip`` (bool) and free-form provenance such as ``source``.
    """

    images: np.ndarray
    labels: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


#: a cache may be shared by several users, whatever their umask
CACHE_FILE_MODE = 0o644


class ArrayCache:
    """Decoded-split cache rooted at ``root`` (see the module docstring for the layout).

    ``key`` names the entry folder relative to ``root/datasets`` (e.g. ``"cifar10/3f2a…"``).
    Write failures (read-only disk, full disk) only warn: the cache is an accelerator, never a
    requirement.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: str) -> Path:
        return self.root / "datasets" / key

    def load(self, key: str, split: str, fingerprint: str) -> SplitArrays | None:
        """The cached split, or ``None`` when absent, stale (fingerprint differs) or unreadable."""
        folder = self.entry_dir(key)
        try:
            info = json.loads((folder / f"{split}.json").read_text())
            if info.get("fingerprint") != fingerprint or info.get("format") != CACHE_FORMAT:
                return None
            images = np.load(folder / f"{split}_images.npy", mmap_mode=None, allow_pickle=False)
            labels = np.load(folder / f"{split}_labels.npy", mmap_mode=None, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if (images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64
                or labels.shape != (images.shape[0],) or images.shape[0] != info.get("count")):
            return None
        return SplitArrays(images, labels, info)

    def save(self, key: str, split: str, fingerprint: str, arrays: SplitArrays) -> None:
        """Write one split atomically; warns (does not raise) when the disk refuses."""
        folder = self.entry_dir(key)
        info = dict(arrays.info, fingerprint=fingerprint, format=CACHE_FORMAT,
                    count=int(arrays.images.shape[0]))
        try:
            write_npy(folder / f"{split}_images.npy", arrays.images, mode=CACHE_FILE_MODE)
            write_npy(folder / f"{split}_labels.npy", arrays.labels, mode=CACHE_FILE_MODE)
            # The JSON goes last: it is what makes the entry valid.
            write_text(folder / f"{split}.json", json.dumps(info, indent=1), mode=CACHE_FILE_MODE)
        except OSError as exc:
            warnings.warn(f"could not write the dataset cache in {folder} ({exc}); "
                          "the data will be decoded again next time", stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Checksums of the official files.

KNOWN_MD5: dict[str, str] = {
    # MNIST (LeCun et al.): md5 of the *uncompressed* IDX files.
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    # CIFAR-10 (Krizhevsky, 2009): md5 of the official python-version tarball itself.
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
}
"""File name → md5 hex digest, from the datasets' official distributions."""


def md5_of(path: str | Path, *, gunzip: bool = False) -> str:
    """md5 hex digest of a file's bytes, or of its gzip-decompressed bytes when ``gunzip``."""
    h = hashlib.md5()
    opener = gzip.open if gunzip else open
    try:
        with opener(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise KDGuardError(f"file {str(path)!r} does not exist",
                           "check the path or place the file there") from None
    except (OSError, EOFError) as exc:
        raise KDGuardError(f"cannot read {str(path)!r} ({exc})",
                           "replace the file with an intact copy") from None
    return h.hexdigest()


def verify_md5(path: str | Path, expected: str | None = None, *, gunzip: bool | None = None) -> str:
    """Check a file's md5 and return it; raise :class:`KDGuardError` on a mismatch.

    Args:
        path: the file.
        expected: md5 hex digest; ``None`` looks the file name up in :data:`KNOWN_MD5` (a name
            ending in ``.gz`` that is only known uncompressed is checked after decompression).
        gunzip: hash the decompressed content; ``None`` = decide from the :data:`KNOWN_MD5` lookup
            (False when ``expected`` is given).

    Raises:
        KDGuardError: mismatch, unreadable file, or no known checksum for the name.
    """
    path = Path(path)
    if expected is None:
        if path.name in KNOWN_MD5:
            expected, auto_gunzip = KNOWN_MD5[path.name], False
        elif path.suffix == ".gz" and path.stem in KNOWN_MD5:
            expected, auto_gunzip = KNOWN_MD5[path.stem], True
        else:
            raise KDGuardError(f"no known md5 for {path.name!r}",
                               f"pass verify_md5(path, expected=...) or use one of: {', '.join(sorted(KNOWN_MD5))}")
        gunzip = auto_gunzip if gunzip is None else gunzip
    actual = md5_of(path, gunzip=bool(gunzip))
    if actual != expected.lower():
        raise KDGuardError(f"md5 of {str(path)!r} is {actual}, expected {expected}",
                           "the file is corrupt or a different version; replace it with the "
                           "official file")
    return actual


# ---------------------------------------------------------------------------------------------
# Optional download of the official files (never used by the tests or implicitly by loaders).

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# The official MNIST page often refuses scripted downloads; the PyTorch S3 copy serves the same
# gzip files. Both are verified against the official uncompressed md5s.
_MNIST_BASES = ("https://yann.lecun.com/exdb/mnist/",
                "https://ossci-datasets.s3.amazonaws.com/mnist/")
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _fetch(urls: Iterable[str], dest: Path, *, gunzip_check: bool, timeout: float) -> Path:
    """Download the first URL that works to ``dest`` (atomically) and verify its md5."""
    errors = []
    name = dest.stem if gunzip_check else dest.name
    for url in urls:
        def download_to(tmp: Path, url: str = url) -> None:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
            verify_md5(tmp, KNOWN_MD5[name], gunzip=gunzip_check)  # a bad file never takes the name

        try:
            return atomic_write(dest, download_to)
        except (OSError, ValueError) as exc:  # URLError is an OSError; KDGuardError a ValueError
            errors.append(f"{url}: {exc}")
    raise KDGuardError(f"could not download {dest.name} ({'; '.join(errors)})",
                       f"download it by hand and place it at {dest}")


def download(dataset: str, root: str | Path, *, timeout: float = 60.0) -> list[Path]:
    """Fetch the official files of ``dataset`` ("mnist" or "cifar10") into the data root.

    MNIST goes to ``root/mnist/<name>.gz`` (checked against the official uncompressed md5s),
    CIFAR-10 to ``root/cifar-10-python.tar.gz`` (checked against its official md5), which the
    ``cifar10`` loader reads directly. Files already present and intact are not fetched again.
    Only call this where the network allows; nothing in kdguard calls it implicitly.

    Returns:
        The paths of the dataset's files.

    Raises:
        KDGuardError: unknown dataset, or a download that fails or does not verify (the message
            names the place to put the file by hand).
    """
    root = Path(root).expanduser()
    if dataset == "mnist":
        plan = [([base + f + ".gz" for base in _MNIST_BASES], root / "mnist" / f"{f}.gz", True)
                for f in _MNIST_FILES]
    elif dataset == "cifar10":
        plan = [([_CIFAR10_URL], root / "cifar-10-python.tar.gz", False)]
    else:
        raise KDGuardError(f"no official download for dataset {dataset!r}",
                           "choose 'mnist' or 'cifar10', or place the files under the data root")
    paths = []
    for urls, dest, gunzip_check in plan:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            try:
                verify_md5(dest, gunzip=gunzip_check)
                paths.append(dest)
                continue
            except KDGuardError:
                pass  # corrupt or partial: fetch again
        paths.append(_fetch(urls, dest, gunzip_check=gunzip_check, timeout=timeout))
    return paths
