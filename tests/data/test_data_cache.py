"""Decoded-array cache (hits, staleness, corruption), md5 checks and the offline-testable
parts of download()."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from kdguard.data import cache as cache_mod
from kdguard.data import load_dataset, loaders
from kdguard.data.cache import ArrayCache, SplitArrays, download, md5_of, verify_md5
from kdguard.errors import KDGuardError


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root, n, fill):
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "t10k-images-idx3-ubyte", np.full((n, 28, 28), fill, np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)


def fail(*args, **kwargs):
    raise AssertionError("decoder called although the cache is fresh")


def test_second_load_uses_cache(tmp_path, monkeypatch):
    fake_mnist(tmp_path / "d", 5, 3)
    first = load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=tmp_path / "c")
    monkeypatch.setattr(loaders, "read_idx", fail)
    start = time.perf_counter()
    second = load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=tmp_path / "c")
    assert time.perf_counter() - start < 1.0
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert (first.classes, first.mean, first.std) == (second.classes, second.mean, second.std)
    # atomic writes leave no temporary files behind
    entry = next((tmp_path / "c" / "datasets" / "mnist").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["test.json", "test_images.npy",
                                                       "test_labels.npy"]


def test_image_decoder_not_called_on_hit(tmp_path, monkeypatch):
    for split in ("train", "test"):
        path = tmp_path / "f" / split / "k" / "0.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(path)
    opts = dict(root=tmp_path / "f", cache_dir=tmp_path / "c", image_size=8)
    first = load_dataset("imagefolder", "train", **opts)
    monkeypatch.setattr(loaders, "decode_image", fail)
    # the test split was decoded and cached in the same pass as train
    assert int(load_dataset("imagefolder", "test", **opts).images.max()) == 50
    assert torch.equal(load_dataset("imagefolder", "train", **opts).images, first.images)
    with pytest.raises(AssertionError, match="decoder called"):  # a new option = a new entry
        load_dataset("imagefolder", "train", **dict(opts, image_size=4))


def test_stale_cache_is_rebuilt(tmp_path):
    fake_mnist(tmp_path / "d", 4, 3)
    old = load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=tmp_path / "c")
    fake_mnist(tmp_path / "d", 6, 9)  # new content, new size
    new = load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=tmp_path / "c")
    assert len(old) == 4 and len(new) == 6 and int(new.images.max()) == 9
    # same size, only the modification time changes: still detected
    images = tmp_path / "d" / "mnist" / "t10k-images-idx3-ubyte"
    write_idx(images, np.full((6, 28, 28), 1, np.uint8))
    os.utime(images, ns=(10**18, 10**18))
    assert int(load_dataset("mnist", "test", root=tmp_path / "d",
                            cache_dir=tmp_path / "c").images.max()) == 1


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    fake_mnist(tmp_path / "d", 3, 7)
    load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=tmp_path / "c")
    npy = next((tmp_path / "c").rglob("test_images.npy"))
    npy.write_bytes(npy.read_bytes()[:100])
    ds = load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=tmp_path / "c")
    assert ds.images.shape == (3, 1, 28, 28) and int(ds.images.min()) == 7


def test_array_cache_round_trip_and_fingerprint(tmp_path):
    cache = ArrayCache(tmp_path)
    arrays = SplitArrays(np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2),
                         np.array([1, 0], dtype=np.int64),
                         {"classes": ["a", "b"], "mean": [0.1] * 3, "std": [0.2] * 3,
                          "hflip": True})
    cache.save("x/key", "train", "fp1", arrays)
    hit = cache.load("x/key", "train", "fp1")
    assert hit is not None and np.array_equal(hit.images, arrays.images)
    assert hit.info["classes"] == ["a", "b"] and hit.info["count"] == 2
    assert cache.load("x/key", "train", "fp2") is None
    assert cache.load("x/key", "test", "fp1") is None


def test_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fake_mnist(tmp_path / "d", 2, 1)
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        ds = load_dataset("mnist", "test", root=tmp_path / "d", cache_dir=blocker)
    assert len(ds) == 2


def test_verify_md5(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"kdguard")
    digest = hashlib.md5(b"kdguard").hexdigest()
    assert verify_md5(path, digest) == digest
    with pytest.raises(KDGuardError, match=r"blob\.bin.*expected 0+"):
        verify_md5(path, "0" * 32)
    gz = tmp_path / "blob.bin.gz"
    gz.write_bytes(gzip.compress(b"kdguard"))
    assert md5_of(gz, gunzip=True) == digest and md5_of(gz) != digest
    with pytest.raises(KDGuardError, match="no known md5"):
        verify_md5(path)
    with pytest.raises(KDGuardError, match="does not exist"):
        verify_md5(tmp_path / "missing", digest)


def test_verify_md5_known_table(tmp_path, monkeypatch):
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(b"labels"))
    monkeypatch.setitem(cache_mod.KNOWN_MD5, "t10k-labels-idx1-ubyte",
                        hashlib.md5(b"labels").hexdigest())
    verify_md5(gz)  # looked up by the uncompressed name, checked after gunzip


def test_download_verifies_checksum_offline(tmp_path, monkeypatch):
    src = tmp_path / "served.tar.gz"
    src.write_bytes(b"pretend archive")
    monkeypatch.setattr(cache_mod, "_CIFAR10_URL", src.as_uri())
    with pytest.raises(KDGuardError, match=r"could not download cifar-10-python.*place it"):
        download("cifar10", tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []  # nothing half-written left behind
    monkeypatch.setitem(cache_mod.KNOWN_MD5, "cifar-10-python.tar.gz", md5_of(src))
    (path,) = download("cifar10", tmp_path / "root")
    assert path.read_bytes() == b"pretend archive"
    with pytest.raises(KDGuardError, match="no official download"):
        download("gtsrb", tmp_path / "root")


def test_cache_entries_go_through_the_one_atomic_write(tmp_path, monkeypatch):
    """Every cache file is written by kdguard.io.atomic_write: 0644 whatever the umask (a shared
    cache), fsync'ed, no temporary left, and a failed write leaves the old entry intact."""
    from kdguard import io as io_mod

    written = []
    real = io_mod.atomic_write
    monkeypatch.setattr(io_mod, "atomic_write",
                        lambda path, write, **kw: (written.append(path.name), real(path, write, **kw))[1])
    cache = ArrayCache(tmp_path)
    arrays = SplitArrays(np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2), np.array([1, 0], dtype=np.int64),
                         {"classes": ["a", "b"]})
    old = os.umask(0o077)
    try:
        cache.save("x/key", "train", "fp1", arrays)
    finally:
        os.umask(old)
    assert written == ["train_images.npy", "train_labels.npy", "train.json"]  # the JSON last
    folder = cache.entry_dir("x/key")
    assert sorted(p.name for p in folder.iterdir()) == sorted(written)
    assert all((folder / name).stat().st_mode & 0o777 == 0o644 for name in written)

    def broken(p):
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        real(folder / "train_images.npy", broken)
    assert sorted(p.name for p in folder.iterdir()) == sorted(written)
    hit = cache.load("x/key", "train", "fp1")
    assert hit is not None and np.array_equal(hit.images, arrays.images)
