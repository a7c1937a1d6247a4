"""Fashion-MNIST from the system's gzipped IDX files (Debian's dataset-fashion-mnist layout)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import flatcli.data.idx as idx
from flatcli.data import USUAL_STATS, load_dataset
from flatcli.data.idx import FASHION_MNIST_SYSTEM_DIR, IDX_FILES, read_idx
from flatcli.errors import DataError

from .formats import write_idx, write_mnist


def write_system_copy(folder: Path, train: tuple, test: tuple, *, gz: bool = True) -> None:
    """The four files as Debian installs them: ``{train,t10k}-*-ubyte.gz`` in one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for is_train, (x, y) in ((True, train), (False, test)):
        for stem, array in zip(IDX_FILES[is_train], (x, y), strict=True):
            plain = folder / stem
            write_idx(plain, array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(plain.read_bytes()))
                plain.unlink()


def _tiny(seed: int = 0):
    rng = np.random.default_rng(seed)
    train = (rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8))
    test = (rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.array([9, 4, 5, 0], np.uint8))
    return train, test


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    (tmp_path / "a.gz").write_bytes(gzip.compress((tmp_path / "a-idx3-ubyte").read_bytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00", "not an IDX file of unsigned bytes"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "header is incomplete"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "holds 2 values but its header says"),
    ],
)
def test_read_idx_rejects_malformed(tmp_path, content, match):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_idx(tmp_path / "f")
    (tmp_path / "g.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "g.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_falls_back_to_the_system_copy(tmp_path, monkeypatch, gz):
    train, test = _tiny()
    system = tmp_path / "usr-share"
    write_system_copy(system, train, test, gz=gz)
    monkeypatch.setenv("FLATCLI_FASHION_MNIST_DIR", str(system))
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    assert ds.name == "fashion-mnist" and ds.num_classes == 10
    assert ds.normalization == USUAL_STATS["fashion-mnist"]
    assert ds.train.x.shape == (10, 1, 28, 28) and ds.test.x.shape == (4, 1, 28, 28)
    mean, std = USUAL_STATS["fashion-mnist"]["mean"][0], USUAL_STATS["fashion-mnist"]["std"][0]
    pixels = ds.train.x[:, 0] * std + mean
    torch.testing.assert_close(pixels, torch.from_numpy(train[0]).float() / 255, atol=1e-6, rtol=0)
    assert ds.train.y.tolist() == list(range(10)) and ds.test.y.tolist() == [9, 4, 5, 0]
    two = load_dataset("fashion-mnist-2", data_dir=tmp_path / "empty")
    assert two.num_classes == 2
    assert two.train.y.tolist() == [0] * 5 + [1] * 5 and two.test.y.tolist() == [1, 0, 1, 0]
    torch.testing.assert_close(two.train.x, ds.train.x)


def test_a_copy_in_the_data_dir_wins(tmp_path, monkeypatch):
    system_train, system_test = _tiny(1)
    write_system_copy(tmp_path / "system", system_train, system_test)
    monkeypatch.setenv("FLATCLI_FASHION_MNIST_DIR", str(tmp_path / "system"))
    own = (np.zeros((3, 1, 28, 28), np.uint8), np.array([7, 7, 7], np.uint8))
    write_mnist(tmp_path / "data", "FashionMNIST", own, own)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path / "data")
    assert ds.train.y.tolist() == [7, 7, 7]


def test_incomplete_system_copy_is_not_used(tmp_path, monkeypatch):
    train, test = _tiny()
    write_system_copy(tmp_path / "system", train, test)
    (tmp_path / "system" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("FLATCLI_FASHION_MNIST_DIR", str(tmp_path / "system"))
    with pytest.raises(DataError, match="not found under .*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")


def test_mismatched_system_files_are_a_data_error(tmp_path, monkeypatch):
    train, test = _tiny()
    write_system_copy(tmp_path / "system", (train[0], train[1][:7]), test)
    monkeypatch.setenv("FLATCLI_FASHION_MNIST_DIR", str(tmp_path / "system"))
    with pytest.raises(DataError, match="labels of shape \\[7\\] for 10 images"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")


def test_default_system_dir_is_debians(monkeypatch):
    monkeypatch.delenv("FLATCLI_FASHION_MNIST_DIR")
    assert idx.fashion_mnist_system_dir() == FASHION_MNIST_SYSTEM_DIR
    assert FASHION_MNIST_SYSTEM_DIR == Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    idx.find_idx_files(FASHION_MNIST_SYSTEM_DIR) is None,
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_debian_files(tmp_path, monkeypatch):
    monkeypatch.delenv("FLATCLI_FASHION_MNIST_DIR")
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, normalization=None)
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    # every class has 6,000 training and 1,000 test images (Xiao et al. 2017)
    assert torch.bincount(ds.train.y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [1000] * 10
    # the usual statistics are those of these very pixels
    assert abs(ds.train.x.mean().item() - USUAL_STATS["fashion-mnist"]["mean"][0]) < 1e-3
    assert abs(ds.train.x.std().item() - USUAL_STATS["fashion-mnist"]["std"][0]) < 1e-3
