"""Fashion-MNIST from the system's copy: the original gzipped IDX files of Debian's package.

Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) installs the full
Fashion-MNIST (Xiao, Rasul & Vollgraf 2017: 60,000 training and 10,000 test images of 28x28
pixels, 10 classes) as the four original files::

    /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
    /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz
    /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
    /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

``fashion-mnist`` and ``fashion-mnist-2`` read them when the data directory holds no copy in
torchvision's layout. ``$FLATCLI_FASHION_MNIST_DIR`` points flatcli at another folder of the
same four files (gzipped or not).

IDX (LeCun et al.'s MNIST format): two zero bytes, a type byte (0x08: unsigned bytes), the
number of dimensions, each dimension as a big-endian 32-bit integer, then the raw values.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from flatcli.errors import DataError

__all__ = [
    "FASHION_MNIST_SYSTEM_DIR",
    "IDX_FILES",
    "fashion_mnist_system_dir",
    "find_idx_files",
    "load_idx_split",
    "read_idx",
]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` installs the IDX files."""

ENV_VAR = "FLATCLI_FASHION_MNIST_DIR"

IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The (images, labels) file names of the train (True) and test (False) split, without ``.gz``."""

INSTALL_HINT = (
    "or install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    f"which flatcli reads from {FASHION_MNIST_SYSTEM_DIR}"
)


def fashion_mnist_system_dir() -> Path:
    """``$FLATCLI_FASHION_MNIST_DIR`` if set and not empty, else the Debian folder."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else FASHION_MNIST_SYSTEM_DIR


def _file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_files(folder: Path) -> dict[bool, tuple[Path, Path]] | None:
    """The four IDX files in ``folder`` (each gzipped or not), or None unless all four are there."""
    found: dict[bool, tuple[Path, Path]] = {}
    for train, (images, labels) in IDX_FILES.items():
        x, y = _file(folder, images), _file(folder, labels)
        if x is None or y is None:
            return None
        found[train] = (x, y)
    return found


def read_idx(path: Path) -> np.ndarray:
    """The unsigned-byte array an IDX file (``.gz`` or plain) holds, shaped by its header.

    Raises:
        DataError: the file is unreadable, not IDX unsigned bytes, or shorter or longer than
            its header says.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes (its first bytes are {data[:4]!r})"
        )
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path} is truncated: its header is incomplete")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - offset != expected:
        raise DataError(
            f"{path} holds {len(data) - offset} values but its header says {list(dims)} "
            f"({expected}): the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_idx_split(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of an MNIST-like IDX folder as (x uint8 (N, 1, 28, 28), y int64 (N,)).

    Raises:
        DataError: a file is missing, malformed, or images and labels disagree.
    """
    files = find_idx_files(folder)
    if files is None:
        names = ", ".join(f"{s}.gz" for pair in IDX_FILES.values() for s in pair)
        raise DataError(f"{folder} does not hold the four IDX files ({names})")
    x_path, y_path = files[train]
    x, y = read_idx(x_path), read_idx(y_path)
    if x.ndim != 3:
        raise DataError(f"{x_path} holds an array of shape {list(x.shape)}; expected (N, H, W)")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{y_path} holds labels of shape {list(y.shape)} for {len(x)} images in {x_path}"
        )
    images = torch.from_numpy(x.copy()).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    return images, torch.from_numpy(y.astype(np.int64))
