"""The torchvision-backed names, read from tiny files written in the real on-disk formats.

MNIST and Fashion-MNIST raw files are only checked for existence by torchvision. CIFAR-10/100
and SVHN files are checked against the md5 of the real downloads (class attributes
``train_list``/``test_list``/``meta`` and ``split_list``). The tests patch those attributes,
with ``monkeypatch``, to the md5s of the tiny files they write: the code under test runs
torchvision's real integrity check and parser unchanged, it just accepts these files.
"""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from flatcli.data import USUAL_STATS, load_dataset
from flatcli.errors import DataError

from .formats import (
    cifar10_md5s,
    cifar100_md5s,
    svhn_split_list,
    write_cifar10,
    write_cifar100,
    write_mnist,
    write_svhn,
)


def _images(rng: np.random.Generator, n: int, c: int, hw: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, hw, hw), dtype=np.uint8)


def _check(ds, train, test, num_classes, stats_key):
    """Inputs round-trip exactly as pixel / 255, normalised with the usual stats."""
    stats = USUAL_STATS[stats_key]
    assert ds.normalization == stats
    assert ds.num_classes == num_classes
    assert ds.input_shape == train[0].shape[1:]
    shape = (1, -1, 1, 1)
    mean = torch.tensor(stats["mean"]).view(shape)
    std = torch.tensor(stats["std"]).view(shape)
    for split, (x, y) in ((ds.train, train), (ds.test, test)):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape == x.shape
        pixels = split.x * std + mean
        torch.testing.assert_close(pixels, torch.from_numpy(x).float() / 255, atol=1e-6, rtol=0)
        assert split.y.tolist() == [int(v) for v in y]


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_like(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    train = (_images(rng, 7, 1, 28), np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8))
    test = (_images(rng, 3, 1, 28), np.array([7, 8, 6], dtype=np.uint8))
    write_mnist(tmp_path, folder, train, test)
    ds = load_dataset(name, data_dir=tmp_path)
    _check(ds, train, test, 10, name)
    raw = load_dataset(name, data_dir=tmp_path, normalization=None)
    assert raw.normalization is None
    assert raw.train.x.min() >= 0 and raw.train.x.max() <= 1


def test_mnist_2_maps_labels(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.arange(10, dtype=np.uint8)
    write_mnist(
        tmp_path,
        "MNIST",
        (_images(rng, 10, 1, 28), labels),
        (_images(rng, 10, 1, 28), labels[::-1].copy()),
    )
    ds = load_dataset("mnist-2", data_dir=tmp_path)
    assert ds.num_classes == 2
    assert ds.train.y.tolist() == [0] * 5 + [1] * 5
    assert ds.test.y.tolist() == [1] * 5 + [0] * 5


def test_cifar10(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    batches = [(_images(rng, 2, 3, 32), np.array([i, 9 - i])) for i in range(5)]
    test = (_images(rng, 3, 3, 32), np.array([3, 1, 4]))
    write_cifar10(tmp_path, batches, test)
    train_list, test_list, meta = cifar10_md5s(tmp_path)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(tvd.CIFAR10, "meta", meta)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    train = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    _check(ds, train, test, 10, "cifar10")
    assert ds.normalization["mean"] == [0.4914, 0.4822, 0.4465]


def test_cifar100_uses_fine_labels(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    train = (_images(rng, 4, 3, 32), np.array([0, 57, 99, 12]))
    test = (_images(rng, 2, 3, 32), np.array([98, 3]))
    write_cifar100(tmp_path, train, test)
    train_list, test_list, meta = cifar100_md5s(tmp_path)
    monkeypatch.setattr(tvd.CIFAR100, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR100, "test_list", test_list)
    monkeypatch.setattr(tvd.CIFAR100, "meta", meta)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    _check(ds, train, test, 100, "cifar100")


def test_svhn_maps_ten_to_zero(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    train = (_images(rng, 4, 3, 32), np.array([0, 1, 9, 0]))
    test = (_images(rng, 2, 3, 32), np.array([5, 0]))
    write_svhn(tmp_path, train, test)  # stores digit 0 as label 10, like the real files
    monkeypatch.setattr(tvd.SVHN, "split_list", svhn_split_list(tmp_path))
    ds = load_dataset("svhn", data_dir=tmp_path)
    _check(ds, train, test, 10, "svhn")


@pytest.mark.parametrize(
    "name", ["mnist", "mnist-2", "fashion-mnist", "fashion-mnist-2", "cifar10", "cifar100", "svhn"]
)
def test_missing_dataset_names_download(tmp_path, name):
    with pytest.raises(DataError) as info:
        load_dataset(name, data_dir=tmp_path / "empty")
    msg = str(info.value)
    assert f"dataset '{name}' not found under {tmp_path / 'empty'}" in msg
    assert "torchvision's layout" in msg and "--download" in msg and "--data-dir" in msg
    assert info.value.exit_code == 2
    assert not (tmp_path / "empty").exists()  # nothing created, nothing fetched
    if name.startswith("fashion-mnist"):  # the system copy is named too
        assert "apt-get install dataset-fashion-mnist" in msg


def test_no_download_unless_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", lambda *a, **k: calls.append(a))
    with pytest.raises(DataError, match="--download"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert calls == []


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    """download=True calls torchvision's download; here a fake one writes the tiny files."""
    rng = np.random.default_rng(5)
    batches = [(_images(rng, 1, 3, 32), np.array([i])) for i in range(5)]
    test = (_images(rng, 1, 3, 32), np.array([7]))
    staging = tmp_path / "staging"
    write_cifar10(staging, batches, test)
    train_list, test_list, meta = cifar10_md5s(staging)
    monkeypatch.setattr(tvd.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tvd.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(tvd.CIFAR10, "meta", meta)
    root = tmp_path / "new" / "dir"

    def fake_download(url, download_root, filename=None, md5=None):
        write_cifar10(Path(download_root), batches, test)

    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", fake_download)
    ds = load_dataset("cifar10", data_dir=root, download=True)
    assert len(ds.train) == 5 and len(ds.test) == 1
    assert ds.test.y.tolist() == [7]


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", fail)
    with pytest.raises(DataError, match="could not download dataset 'cifar10'"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)


def test_corrupted_files_say_so(tmp_path):
    rng = np.random.default_rng(6)
    batches = [(_images(rng, 1, 3, 32), np.array([i])) for i in range(5)]
    write_cifar10(tmp_path, batches, (_images(rng, 1, 3, 32), np.array([0])))
    # no md5 patch: the tiny files do not match the real downloads' checksums
    with pytest.raises(DataError, match="incomplete or corrupted.*--download"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_data_dir_defaults_to_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    labels = np.array([1, 2], dtype=np.uint8)
    images = _images(rng, 2, 1, 28)
    write_mnist(tmp_path, "MNIST", (images, labels), (images, labels))
    monkeypatch.setenv("FLATCLI_DATA", str(tmp_path))
    assert load_dataset("mnist").train.y.tolist() == [1, 2]


def test_malformed_files_are_a_data_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(b"\xff" * 16)
    with pytest.raises(DataError, match="could not be parsed"):
        load_dataset("mnist", data_dir=tmp_path)


def test_download_chatter_stays_off_stdout(tmp_path, monkeypatch, capsys):
    def noisy(url, download_root, filename=None, md5=None):
        print("Downloading cifar-10-python.tar.gz")
        raise URLError("no network")

    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", noisy)
    with pytest.raises(DataError):
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    out, err = capsys.readouterr()
    assert out == "" and "Downloading" in err
