"""Dataset loaders on tiny fake files in each supported format (no downloads, no shared data)."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdguard.data import CIFAR10_CLASSES, DATASETS, load_dataset, register_imagefolder, verify_md5
from kdguard.data.loaders import parse_idx
from kdguard.errors import KDGuardError

# The real data copies sit beside the project root (see the README); optional.
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


# --- writers of fake files --------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, split: str, n: int, seed: int,
                     gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        data = idx_bytes(arr)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return images, labels


def _s(b: bytes) -> bytes:  # SHORT_BINSTRING, the opcode Python 2 used for str
    return b"U" + bytes([len(b)]) + b


def _i(v: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", v)


def py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A pickle laid out like the official (Python 2) CIFAR batches: protocol 2, str keys and a
    numpy array rebuilt through numpy.core.multiarray._reconstruct."""
    raw = data.tobytes()
    return b"".join([
        b"\x80\x02}(", _s(b"data"),
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", _i(0), b"\x85", _s(b"b"),
        b"\x87R(", _i(1), _i(data.shape[0]), _i(data.shape[1]), b"\x86",
        b"cnumpy\ndtype\n", _s(b"u1"), _i(0), _i(1), b"\x87R(", _i(3), _s(b"|"), b"NNN",
        _i(-1), _i(-1), _i(0), b"tb\x89T", struct.pack("<I", len(raw)), raw, b"tb",
        _s(b"labels"), b"](", b"".join(_i(int(v)) for v in labels), b"eu."])


def write_cifar_batches(folder: Path, per_batch: int,
                        py2: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """data_batch_1..5 + test_batch; returns all train+test images (N×3×32×32) and labels."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        blob = (py2_batch_pickle(data, lab) if py2 else
                pickle.dumps({b"data": data, b"labels": lab, b"batch_label": b"x"}))
        (folder / name).write_bytes(blob)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if pixels.ndim == 2 else "RGB"
    fmt = {".jpg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".bmp": "BMP"}[path.suffix]
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(pixels, mode).save(path, fmt, **kwargs)


def smooth_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth image (JPEG reproduces it within a few levels)."""
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-2, 2, (3, 2))
    img = base[:, None, None] + slope[:, 0, None, None] * y + slope[:, 1, None, None] * x
    return np.clip(img.transpose(1, 2, 0), 0, 255).astype(np.uint8)


def tar_folder(folder: Path, archive: Path, arcname: str, mode: str) -> None:
    with tarfile.open(archive, mode) as tf:
        tf.add(folder, arcname=arcname)


# --- MNIST IDX ---------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip(tmp_path, gz):
    images, labels = write_fake_mnist(tmp_path / "data" / "mnist", "test", 7, seed=0, gz=gz)
    ds = load_dataset("mnist", "test", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.classes == tuple("0123456789") and not ds.hflip and ds.name == "mnist"


def test_mnist_files_directly_under_root(tmp_path):
    write_fake_mnist(tmp_path, "train", 3, seed=2, gz=False)
    assert len(load_dataset("mnist", "train", root=tmp_path, cache_dir=tmp_path / "c")) == 3


def test_parse_idx_rejects_bad_files():
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    assert parse_idx(good).shape == (2, 3)
    with pytest.raises(KDGuardError, match="magic"):
        parse_idx(b"\x01" + good[1:])
    with pytest.raises(KDGuardError, match="needs 6"):
        parse_idx(good[:-1])
    be = b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">2i", 1, -5)
    assert parse_idx(be).tolist() == [1, -5]


def test_mnist_wrong_shape_is_reported(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 27, 27), np.uint8)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(KDGuardError, match="28×28"):
        load_dataset("mnist", "test", root=tmp_path, cache_dir=tmp_path / "c")


def test_mnist_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(KDGuardError, match=r"t10k-images-idx3-ubyte.*--data-root"):
        load_dataset("mnist", "test", root=tmp_path, cache_dir=tmp_path / "c")


# --- CIFAR-10 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("py2", [True, False])
def test_cifar_python_batches(tmp_path, py2):
    images, labels = write_cifar_batches(tmp_path / "cifar-10-batches-py", 4, py2=py2)
    train = load_dataset("cifar10", "train", root=tmp_path, cache_dir=tmp_path / "c")
    test = load_dataset("cifar10", "test", root=tmp_path, cache_dir=tmp_path / "c")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(images[:20]))
    assert torch.equal(test.images, torch.from_numpy(images[20:]))
    assert train.labels.tolist() == labels[:20].tolist()
    assert train.classes == CIFAR10_CLASSES and train.hflip
    expected_mean = images[:20].transpose(1, 0, 2, 3).reshape(3, -1).mean(1) / 255
    assert np.allclose(train.mean, expected_mean) and train.mean == test.mean
    expected_std = (images[:20].transpose(1, 0, 2, 3).reshape(3, -1) / 255).std(1)
    assert np.allclose(train.std, expected_std)


def test_cifar_python_tarball(tmp_path):
    images, _ = write_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", 2)
    (tmp_path / "root").mkdir()
    tar_folder(tmp_path / "src" / "cifar-10-batches-py",
               tmp_path / "root" / "cifar-10-python.tar.gz", "cifar-10-batches-py", "w:gz")
    test = load_dataset("cifar10", "test", root=tmp_path / "root", cache_dir=tmp_path / "c")
    assert torch.equal(test.images, torch.from_numpy(images[10:]))


def test_cifar_unpickler_refuses_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(KDGuardError, match=r"data_batch_3.*refusing to load builtins\.print"):
        load_dataset("cifar10", "train", root=tmp_path, cache_dir=tmp_path / "c")


def _write_cifar_folder(base: Path, ext: str, per_class: int = 2) -> dict[str, list[np.ndarray]]:
    """cifar10/{train,test}/<class>/NNNN.ext with smooth images; returns split → images in the
    expected order (classes in official order, files sorted)."""
    rng = np.random.default_rng(3)
    expected: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            for i in reversed(range(per_class)):  # written out of order on purpose
                write_image(base / "cifar10" / split / cls / f"{i:04d}{ext}",
                            smooth_rgb(rng, 32, 32))
        expected[split] = [np.asarray(Image.open(p).convert("RGB"))
                           for cls in CIFAR10_CLASSES
                           for p in sorted((base / "cifar10" / split / cls).iterdir())]
    return expected


def test_cifar_image_folder_png_exact(tmp_path):
    expected = _write_cifar_folder(tmp_path, ".png")
    ds = load_dataset("cifar10", "test", root=tmp_path, cache_dir=tmp_path / "c")
    assert ds.images.shape == (20, 3, 32, 32)
    assert ds.labels.tolist() == [c for c in range(10) for _ in range(2)]
    want = np.stack(expected["test"]).transpose(0, 3, 1, 2)
    assert torch.equal(ds.images, torch.from_numpy(want))
    assert ds.meta["layout"] == "image-folder"


def test_cifar_jpeg_tarball_close_to_source(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    originals = {}
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES:
            pixels = smooth_rgb(rng, 32, 32)
            originals[(split, cls)] = pixels
            write_image(src / "cifar10" / split / cls / "0000.jpg", pixels)
    (tmp_path / "root").mkdir()
    tar_folder(src / "cifar10", tmp_path / "root" / "cifar10-jpeg.tar.gz", "cifar10", "w:gz")
    ds = load_dataset("cifar10", "train", root=tmp_path / "root", cache_dir=tmp_path / "c")
    assert ds.images.shape == (10, 3, 32, 32) and ds.labels.tolist() == list(range(10))
    want = np.stack([originals[("train", c)] for c in CIFAR10_CLASSES]).transpose(0, 3, 1, 2)
    err = np.abs(ds.images.numpy().astype(int) - want.astype(int))
    assert err.mean() < 3 and err.max() < 30  # JPEG quality 95 on smooth images


def test_cifar_wrong_class_folder(tmp_path):
    black = np.zeros((32, 32, 3), np.uint8)
    write_image(tmp_path / "cifar10" / "train" / "airplane" / "0.png", black)
    write_image(tmp_path / "cifar10" / "train" / "plane" / "0.png", black)
    with pytest.raises(KDGuardError, match="plane"):
        load_dataset("cifar10", "train", root=tmp_path, cache_dir=tmp_path / "c")


def test_cifar_nothing_found(tmp_path):
    with pytest.raises(KDGuardError, match=r"no CIFAR-10 files in .*--data-root"):
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "c")


# --- GTSRB -------------------------------------------------------------------------------------

def _write_gtsrb(base: Path, *,
                 size: tuple[int, int] = (40, 37)) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Official layout with 2 classes × 2 train images and 3 test images, all ``size`` (W, H)."""
    rng = np.random.default_rng(9)
    w, h = size
    head = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n"
    expected: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    for cls in (0, 5):
        folder = base / "GTSRB" / "Final_Training" / "Images" / f"{cls:05d}"
        rows = head
        for i in range(2):
            pixels = smooth_rgb(rng, h, w)
            write_image(folder / f"{cls:05d}_{i:05d}.ppm", pixels)
            rows += f"{cls:05d}_{i:05d}.ppm;{w};{h};1;1;{w - 2};{h - 2};{cls}\r\n"
            expected["train"].append((pixels, cls))
        (folder / f"GT-{cls:05d}.csv").write_text(rows)
    rows = head
    for i, cls in enumerate((42, 0, 5)):
        pixels = smooth_rgb(rng, h, w)
        write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", pixels)
        rows += f"{i:05d}.ppm;{w};{h};1;1;{w - 2};{h - 2};{cls}\r\n"
        expected["test"].append((pixels, cls))
    (base / "GTSRB" / "Final_Test" / "GT-final_test.csv").write_text(rows)
    # The official test folder also holds an annotation file without ClassId: must be ignored.
    (base / "GTSRB" / "Final_Test" / "Images" / "GT-final_test.test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\r\n")
    return expected


def _resized(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("packed", [False, True])
def test_gtsrb_official_layout_resized(tmp_path, packed):
    expected = _write_gtsrb(tmp_path / "src")
    root = tmp_path / "src"
    if packed:
        root = tmp_path / "root"
        root.mkdir()
        tar_folder(tmp_path / "src" / "GTSRB", root / "gtsrb32.tar.xz", "GTSRB", "w:xz")
    for split in ("train", "test"):
        ds = load_dataset("gtsrb", split, root=root, cache_dir=tmp_path / "c")
        want = np.stack([_resized(p) for p, _ in expected[split]]).transpose(0, 3, 1, 2)
        assert ds.images.shape == (len(want), 3, 32, 32)
        assert torch.equal(ds.images, torch.from_numpy(want))
        assert ds.labels.tolist() == [c for _, c in expected[split]]
        assert ds.num_classes == 43 and not ds.hflip


def test_gtsrb_test_without_annotations(tmp_path):
    _write_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Test" / "GT-final_test.csv").unlink()
    with pytest.raises(KDGuardError, match="GT-final_test.csv"):
        load_dataset("gtsrb", "test", root=tmp_path, cache_dir=tmp_path / "c")


# --- generic image folders ---------------------------------------------------------------------

def test_imagefolder_gray_resized_and_registered(tmp_path, monkeypatch):
    # registrations below are undone after the test (the registry is process-wide)
    for attr in ("_items", "_meta", "_aliases"):
        monkeypatch.setattr(DATASETS, attr, dict(getattr(DATASETS, attr)))
    rng = np.random.default_rng(4)
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("b_cls", "a_cls"):
            for i in range(n):
                write_image(tmp_path / "f" / split / cls / f"{i}.png",
                            rng.integers(0, 256, (20, 24), dtype=np.uint8))
    ds = load_dataset("imagefolder", "train", root=tmp_path / "f", cache_dir=tmp_path / "c",
                      image_size=16)
    assert ds.images.shape == (4, 1, 16, 16) and ds.classes == ("a_cls", "b_cls")
    assert ds.labels.tolist() == [0, 0, 1, 1]
    want = np.array(Image.open(tmp_path / "f" / "train" / "a_cls" / "0.png").resize(
        (16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(ds.images[0, 0], torch.from_numpy(want))

    register_imagefolder("tiny_gray_test", tmp_path / "f", image_size=8, aliases=("tgt",))
    test = load_dataset("tgt", "test", cache_dir=tmp_path / "c")
    assert test.images.shape == (2, 1, 8, 8) and test.name == "tiny_gray_test"
    rgb = load_dataset("tiny-gray-test", "test", cache_dir=tmp_path / "c", channels=3)
    assert rgb.images.shape == (2, 3, 8, 8)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    with pytest.raises(KDGuardError, match="registered twice"):
        register_imagefolder("tiny_gray_test", tmp_path)


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    write_image(tmp_path / "train" / "x" / "0.png", np.full((32, 32), 7, np.uint8))
    write_image(tmp_path / "train" / "y" / "0.bmp", np.full((32, 32, 3), 9, np.uint8))
    ds = load_dataset("imagefolder", root=tmp_path, cache_dir=tmp_path / "c")
    assert ds.images.shape == (2, 3, 32, 32) and int(ds.images[0].max()) == 7
    with pytest.raises(KDGuardError, match="no test images"):
        load_dataset("imagefolder", "test", root=tmp_path, cache_dir=tmp_path / "c")


def test_imagefolder_bad_image_and_options(tmp_path):
    write_image(tmp_path / "train" / "x" / "0.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "train" / "x" / "1.png").write_bytes(b"not an image")
    with pytest.raises(KDGuardError, match=r"1\.png"):
        load_dataset("imagefolder", root=tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(KDGuardError, match="image_size"):
        load_dataset("imagefolder", root=tmp_path, cache_dir=tmp_path / "c", image_size=0)
    with pytest.raises(KDGuardError, match="no option 'image_size'"):
        load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "c", image_size=3)


# --- embedded MNIST, registry errors, real data ------------------------------------------------

def test_embedded_mnist(tmp_path):
    train = load_dataset("embedded", "train", cache_dir=tmp_path)
    test = load_dataset("mnist_embedded", "test", cache_dir=tmp_path)
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    assert train.labels.bincount().tolist() == [400] * 10
    assert test.labels.bincount().tolist() == [100] * 10
    assert 0.1 < train.mean[0] < 0.16 and train.mean == test.mean
    # disjoint: no test image appears in train
    flat_train = {bytes(x) for x in train.images.reshape(4000, -1).numpy()}
    assert sum(bytes(x) in flat_train for x in test.images.reshape(1000, -1).numpy()) < 5


def test_registry_errors(tmp_path, monkeypatch):
    with pytest.raises(KDGuardError, match=r"unknown dataset 'cifar11'.*cifar10"):
        load_dataset("cifar11", cache_dir=tmp_path)
    with pytest.raises(KDGuardError, match=r"unknown split 'val'.*train, test"):
        load_dataset("mnist_embedded", "val", cache_dir=tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(KDGuardError, match=rf"{missing}.*--data-root"):
        load_dataset("mnist", root=missing, cache_dir=tmp_path)
    monkeypatch.setenv("KDGUARD_DATA_ROOT", str(missing))
    with pytest.raises(KDGuardError, match=rf"{missing}.*KDGUARD_DATA_ROOT"):
        load_dataset("cifar10", cache_dir=tmp_path)


def test_env_data_root_and_cache(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "d" / "mnist", "test", 2, seed=1, gz=True)
    monkeypatch.setenv("KDGUARD_DATA_ROOT", str(tmp_path / "d"))
    monkeypatch.setenv("KDGUARD_CACHE", str(tmp_path / "envcache"))
    assert len(load_dataset("mnist", "test")) == 2
    assert list((tmp_path / "envcache" / "datasets" / "mnist").glob("*/test.json"))


@pytest.mark.skipif(not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="real MNIST copy not present")
def test_real_mnist_test_split(tmp_path):
    verify_md5(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")  # md5 of the uncompressed file
    verify_md5(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637",
               gunzip=True)
    ds = load_dataset("mnist", "test", root=SHARED_MNIST.parent, cache_dir=tmp_path)
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert ds.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
