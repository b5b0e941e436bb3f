"""Mini-batch iteration and the uint8 → float conversion."""

from __future__ import annotations

import pytest
import torch

from kdguard.data import ImageDataset, iterate_batches, num_batches, to_float
from kdguard.errors import KDGuardError


def dataset(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images=images, labels=torch.arange(n), classes=tuple("x" * n))


def test_ordered_batches_are_views_in_order():
    ds = dataset()
    batches = list(iterate_batches(ds, 4, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2] == [len(b[1]) for b in batches]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(10))
    assert batches[0][0].data_ptr() == ds.images.data_ptr()  # no copy
    assert len(batches) == num_batches(10, 4)
    assert [len(b[0]) for b in iterate_batches(ds, 4, shuffle=False, drop_last=True)] == [4, 4]
    assert num_batches(10, 4, drop_last=True) == 2


def test_shuffled_batches_cover_everything_once_and_are_reproducible():
    ds = dataset()
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return list(iterate_batches(ds, 3, shuffle=True, generator=gen))
    a, b, c = run(0), run(0), run(1)
    labels = torch.cat([y for _, y in a])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert torch.cat([y for _, y in c]).tolist() != labels.tolist()
    # images stay paired with their labels
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in a)


def test_tensor_tuples_and_lengths():
    x, y, w = torch.randn(7, 3), torch.arange(7), torch.ones(7)
    parts = list(iterate_batches((x, y, w), 5, shuffle=False))
    assert len(parts) == 2 and len(parts[0]) == 3 and torch.equal(parts[1][0], x[5:])
    idx = list(iterate_batches(7, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert sorted(torch.cat(idx).tolist()) == list(range(7)) and idx[0].dtype == torch.int64
    assert [i.tolist() for i in iterate_batches(5, 2, shuffle=False)] == [[0, 1], [2, 3], [4]]


def test_batch_errors():
    with pytest.raises(KDGuardError, match="batch size 0"):
        iterate_batches(dataset(), 0, shuffle=False)
    with pytest.raises(KDGuardError, match="same first dimension"):
        iterate_batches((torch.zeros(3), torch.zeros(4)), 2, shuffle=False)
    with pytest.raises(KDGuardError, match="cannot batch a str"):
        iterate_batches("abc", 2, shuffle=False)


def test_to_float():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = to_float(x, "cpu")
    assert out.dtype == torch.float32 and out.min() == 0 and out.max() == 1
    assert torch.allclose(out[0, 1], torch.full((2, 2), 128 / 255))
    cl = to_float(x, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)
    halves = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    assert to_float(halves).dtype == torch.float32 and float(to_float(halves).max()) == 0.5
    with pytest.raises(KDGuardError, match="torch.int64"):
        to_float(torch.zeros(1, 1, 1, 1, dtype=torch.long))
    if torch.cuda.is_available():
        assert torch.equal(to_float(x.pin_memory(), "cuda").cpu(), out)
