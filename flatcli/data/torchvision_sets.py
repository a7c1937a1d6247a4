"""The standard sets in torchvision's on-disk layout: MNIST, Fashion-MNIST, CIFAR-10/100, SVHN.

torchvision's own dataset classes read the files (so their formats and integrity checks are
exactly torchvision's, and ``download=True`` fetches what is missing); each whole split is then
converted to tensors once, from the class's ``data`` array, never item by item. ``--data-dir``
is the ``root`` one would pass to torchvision, so it holds:

- ``mnist``, ``mnist-2``: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
- ``fashion-mnist``, ``fashion-mnist-2``: ``FashionMNIST/raw/`` (the same four files); when the
  directory has no ``FashionMNIST/``, the system's copy (Debian's ``dataset-fashion-mnist`` in
  ``/usr/share/datasets/fashion-mnist/``, see :mod:`flatcli.data.idx`) is read instead
- ``cifar10``: ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
- ``cifar100``: ``cifar-100-python/`` (``train``, ``test``, ``meta``)
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` directly in the directory

torchvision checks the md5 of every CIFAR and SVHN file (MNIST raw files only need to exist).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from flatcli.errors import DataError

__all__ = ["TORCHVISION_SETS", "TorchvisionSet", "load_torchvision_split"]


@dataclass(frozen=True)
class TorchvisionSet:
    """How one named set maps onto a torchvision dataset class."""

    cls_name: str  # attribute of torchvision.datasets
    stats_key: str  # key of USUAL_STATS
    num_classes: int
    input_shape: tuple[int, ...]
    layout: str  # the files expected under the data directory, for error messages
    markers: tuple[str, ...]  # paths whose presence means "the user has this set"
    binary: bool = False  # labels 0-4 -> 0, 5-9 -> 1
    system_copy: bool = False  # may be read from the system's IDX files (flatcli.data.idx)


_MNIST_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte"
)


def _mnist_like(cls_name: str, stats_key: str, *, system_copy: bool = False) -> TorchvisionSet:
    """A 28x28 grey-scale set of ten classes whose four IDX files sit in ``<cls_name>/raw/``."""
    layout = f"{cls_name}/raw/{{{_MNIST_FILES}}}"
    return TorchvisionSet(
        cls_name, stats_key, 10, (1, 28, 28), layout, (cls_name,), system_copy=system_copy
    )


def _two_class(spec: TorchvisionSet) -> TorchvisionSet:
    """``spec`` with labels 0-4 read as 0 and 5-9 as 1."""
    return replace(spec, num_classes=2, binary=True)


_MNIST = _mnist_like("MNIST", "mnist")
_FASHION_MNIST = _mnist_like("FashionMNIST", "fashion-mnist", system_copy=True)

TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "mnist": _MNIST,
    "mnist-2": _two_class(_MNIST),
    "fashion-mnist": _FASHION_MNIST,
    "fashion-mnist-2": _two_class(_FASHION_MNIST),
    "cifar10": TorchvisionSet(
        "CIFAR10",
        "cifar10",
        10,
        (3, 32, 32),
        "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
        ("cifar-10-batches-py",),
    ),
    "cifar100": TorchvisionSet(
        "CIFAR100",
        "cifar100",
        100,
        (3, 32, 32),
        "cifar-100-python/{train, test, meta}",
        ("cifar-100-python",),
    ),
    "svhn": TorchvisionSet(
        "SVHN",
        "svhn",
        10,
        (3, 32, 32),
        "{train_32x32.mat, test_32x32.mat}",
        ("train_32x32.mat", "test_32x32.mat"),
    ),
}


def _construct(spec: TorchvisionSet, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.cls_name)
    # torchvision prints download progress to stdout, which carries flatcli's table or JSON
    with contextlib.redirect_stdout(sys.stderr):
        if spec.cls_name == "SVHN":
            return cls(str(root), split="train" if train else "test", download=download)
        return cls(str(root), train=train, download=download)


def load_torchvision_split(
    name: str, root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``train``/test of ``name`` as (x uint8 (N, C, H, W), y int64 (N,)), read once.

    Raises DataError naming ``--download`` when the files are missing (and ``download`` is
    off), or when torchvision's integrity check fails or the download itself fails.
    Fashion-MNIST comes from the system's IDX files (:func:`flatcli.data.idx.load_idx_split`)
    when ``root`` holds no ``FashionMNIST/`` folder and the system has all four files.
    """
    spec = TORCHVISION_SETS[name]
    if spec.system_copy and not any((root / m).exists() for m in spec.markers):
        from flatcli.data.idx import fashion_mnist_system_dir, find_idx_files, load_idx_split

        system = fashion_mnist_system_dir()
        if find_idx_files(system) is not None:
            x, y = load_idx_split(system, train)
            return x, ((y >= 5).to(torch.int64) if spec.binary else y)
    if download:
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create the data directory {root}: {exc}") from exc
    try:
        ds = _construct(spec, root, train, download)
    except RuntimeError as exc:
        present = any((root / m).exists() for m in spec.markers)
        if download:
            raise DataError(f"could not download dataset '{name}' into {root}: {exc}") from exc
        if present:
            raise DataError(
                f"dataset '{name}' under {root} is incomplete or corrupted (torchvision's "
                f"check failed: {exc}; expected {spec.layout}); pass --download to fetch it "
                "again, or --data-dir to point at a good copy"
            ) from exc
        hint = ""
        if spec.system_copy:
            from flatcli.data.idx import INSTALL_HINT

            hint = f", {INSTALL_HINT}"
        raise DataError(
            f"dataset '{name}' not found under {root} (expected torchvision's layout: "
            f"{spec.layout}); pass --download to fetch it, or --data-dir to point at it{hint}"
        ) from exc
    except OSError as exc:  # network errors from a download, unreadable files
        what = "download" if download else "read"
        raise DataError(f"could not {what} dataset '{name}' under {root}: {exc}") from exc
    except (
        ValueError,
        TypeError,
        AssertionError,
        KeyError,
        EOFError,
        pickle.UnpicklingError,
    ) as exc:
        # malformed files
        raise DataError(
            f"dataset '{name}' under {root} could not be parsed "
            f"({type(exc).__name__}: {exc}); expected torchvision's layout: {spec.layout}"
        ) from exc
    x, y = _to_tensors(spec, ds)
    if spec.binary:
        y = (y >= 5).to(torch.int64)
    return x, y


def _to_tensors(spec: TorchvisionSet, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 (N, C, H, W), int64 (N,)), from the class's arrays."""
    if spec.cls_name in ("MNIST", "FashionMNIST"):
        x = torch.as_tensor(ds.data).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
        y = torch.as_tensor(ds.targets)
    elif spec.cls_name in ("CIFAR10", "CIFAR100"):
        data = np.asarray(ds.data)  # (N, H, W, C)
        x = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
        y = torch.as_tensor(np.asarray(ds.targets))
    else:  # SVHN: already (N, C, H, W)
        x = torch.from_numpy(np.ascontiguousarray(ds.data))
        y = torch.as_tensor(np.asarray(ds.labels))
    if x.dtype != torch.uint8:
        raise DataError(f"expected 8-bit images from torchvision's {spec.cls_name}; got {x.dtype}")
    return x.contiguous(), y.to(torch.int64).reshape(-1)
