"""Split, Dataset.split, subset and iter_batches."""

from __future__ import annotations

import pytest
import torch

from flatcli.data import Dataset, Split, iter_batches, subset
from flatcli.errors import DataError, UsageError


def _split(n=10):
    return Split(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def test_split_validates():
    with pytest.raises(DataError, match="same number"):
        Split(torch.zeros(3, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="int64"):
        Split(torch.zeros(3, 1), torch.zeros(3, dtype=torch.int32))


def test_to_casts_x_only():
    s = _split().to("cpu", torch.float64)
    assert s.x.dtype == torch.float64 and s.y.dtype == torch.int64
    assert _split().to("cpu").x.dtype == torch.float32
    with pytest.raises(UsageError, match="floating-point"):
        _split().to("cpu", torch.int32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda():
    s = _split().to("cuda", torch.float64)
    assert s.x.is_cuda and s.y.is_cuda and s.y.dtype == torch.int64
    sub = subset(s, 4, seed=0)
    assert sub.x.is_cuda
    assert sub.y.cpu().tolist() == subset(_split(), 4, seed=0).y.tolist()


def test_dataset_split():
    ds = Dataset("d", _split(), None, 10, (1,), None)
    assert ds.split("train") is ds.train
    with pytest.raises(DataError, match="no test split"):
        ds.split("test")
    with pytest.raises(UsageError, match="'train' or 'test'"):
        ds.split("val")


def test_subset_is_seeded():
    s = _split(100)
    a, b = subset(s, 10, seed=3), subset(s, 10, seed=3)
    assert torch.equal(a.y, b.y) and len(a) == 10
    assert not torch.equal(a.y, subset(s, 10, seed=4).y)
    assert torch.equal(a.x[:, 0].long(), a.y)  # rows stay paired
    assert len(set(a.y.tolist())) == 10  # without replacement
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:10]
    assert a.y.tolist() == expected.tolist()
    # a prefix of a larger subset with the same seed
    assert subset(s, 20, seed=3).y[:10].tolist() == a.y.tolist()


def test_subset_none_and_too_many():
    s = _split(5)
    assert subset(s, None, seed=0) is s
    assert sorted(subset(s, 5, seed=0).y.tolist()) == list(range(5))
    with pytest.raises(DataError, match="only 5"):
        subset(s, 6, seed=0)
    with pytest.raises(UsageError):
        subset(s, -1, seed=0)


def test_iter_batches_slices_without_copy():
    s = _split(7)
    batches = list(iter_batches(s, 3))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([x for x, _ in batches]), s.x)
    assert batches[1][0].data_ptr() == s.x[3:].data_ptr()  # a view, not a copy
    assert [len(y) for _, y in iter_batches((s.x, s.y), 10)] == [7]
    assert [len(y) for _, y in iter_batches(s, None)] == [7]
    with pytest.raises(UsageError):
        iter_batches(s, 0)
    with pytest.raises(DataError):
        iter_batches((s.x, s.y[:2]), 2)
