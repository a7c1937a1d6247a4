"""Writers of tiny files in the real on-disk formats torchvision reads.

Each writer takes images as uint8 arrays (N, C, H, W) and labels, and writes exactly the files
torchvision's class would find after its own download and extraction. CIFAR and SVHN files are
md5-checked by torchvision against the checksums of the real downloads; ``md5_of`` lets a test
patch those class attributes to the tiny files' checksums (see test_torchvision_sets.py).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX ubyte file (MNIST's format): magic 0x0000080N, big-endian dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str, train: tuple, test: tuple) -> None:
    """``root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; images (N, 1, 28, 28)."""
    raw = root / folder / "raw"
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, batches: list[tuple], test: tuple) -> None:
    """``root/cifar-10-batches-py/``: five ``data_batch_i``, ``test_batch``, ``batches.meta``.

    Rows of ``data`` are (N, 3072) uint8, channel-major (1024 red, 1024 green, 1024 blue).
    """
    base = root / "cifar-10-batches-py"
    assert len(batches) == 5
    for i, (x, y) in enumerate(batches, start=1):
        _pickle(
            base / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(v) for v in y],
                "data": x.reshape(len(x), -1),
                "filenames": [f"img{j}.png" for j in range(len(x))],
            },
        )
    x, y = test
    _pickle(
        base / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(v) for v in y],
            "data": x.reshape(len(x), -1),
            "filenames": [f"t{j}.png" for j in range(len(x))],
        },
    )
    _pickle(
        base / "batches.meta",
        {
            "label_names": [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ],
            "num_cases_per_batch": len(batches[0][0]),
            "num_vis": 3072,
        },
    )


def cifar10_md5s(root: Path) -> tuple[list, list, dict]:
    """(train_list, test_list, meta) class attributes matching the tiny files."""
    base = root / "cifar-10-batches-py"
    train = [[f"data_batch_{i}", md5_of(base / f"data_batch_{i}")] for i in range(1, 6)]
    test = [["test_batch", md5_of(base / "test_batch")]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": md5_of(base / "batches.meta")}
    return train, test, meta


def write_cifar100(root: Path, train: tuple, test: tuple) -> None:
    """``root/cifar-100-python/{train,test,meta}`` with ``fine_labels`` and ``coarse_labels``."""
    base = root / "cifar-100-python"
    for name, (x, y) in (("train", train), ("test", test)):
        _pickle(
            base / name,
            {
                "filenames": [f"{name}{j}.png" for j in range(len(x))],
                "batch_label": name,
                "fine_labels": [int(v) for v in y],
                "coarse_labels": [int(v) // 5 for v in y],
                "data": x.reshape(len(x), -1),
            },
        )
    _pickle(
        base / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )


def cifar100_md5s(root: Path) -> tuple[list, list, dict]:
    base = root / "cifar-100-python"
    return (
        [["train", md5_of(base / "train")]],
        [["test", md5_of(base / "test")]],
        {"filename": "meta", "key": "fine_label_names", "md5": md5_of(base / "meta")},
    )


def write_svhn(root: Path, train: tuple, test: tuple) -> None:
    """``root/{train,test}_32x32.mat``: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1), digit 0 as 10."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        stored = np.where(np.asarray(y) == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        savemat(str(root / f"{name}_32x32.mat"), {"X": x.transpose(2, 3, 1, 0), "y": stored})


def svhn_split_list(root: Path) -> dict:
    return {
        name: [
            f"http://invalid.example/{name}_32x32.mat",
            f"{name}_32x32.mat",
            md5_of(root / f"{name}_32x32.mat"),
        ]
        for name in ("train", "test")
    } | {"extra": ["http://invalid.example/extra_32x32.mat", "extra_32x32.mat", "0" * 32]}
