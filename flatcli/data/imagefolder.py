"""``imagefolder:PATH``: a folder per class, read with torchvision's ``ImageFolder``.

``PATH`` is either the class root itself (``PATH/<class>/<image>``: a train split only, no
test split), or, when it holds both a ``train/`` and a ``test/`` folder, two class roots:
``PATH/train/<class>/...`` and ``PATH/test/<class>/...``. Class indices follow torchvision
(sorted class-folder names of the train root); a test class the train root lacks is an error,
and a test root may lack some train classes.

All images must have the same size (nothing is resized). If every train and test image is
grayscale (PIL mode ``L`` or ``1``) the inputs have 1 channel, otherwise every image is
converted to RGB (3 channels; an alpha channel is dropped). Pixels are scaled to [0, 1]; the
default normalisation is the per-channel mean and (population) standard deviation of the
train images, which the returned dataset records.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flatcli.errors import DataError

__all__ = ["load_imagefolder", "pixel_stats"]

_GRAY_MODES = frozenset({"L", "1"})


def _folder(root: Path, spec: str):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root))
    except OSError as exc:  # no class folders, or a class folder without images
        raise DataError(
            f"{spec}: {root} is not a folder of class folders holding images ({exc})"
        ) from exc


def load_imagefolder(
    path: Path, spec: str
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, list[str]]:
    """((x_train, y_train), (x_test, y_test) or None, class names); x uint8 (N, C, H, W)."""
    if not path.is_dir():
        raise DataError(f"{spec}: {path} is not a directory (expected a folder per class)")
    if (path / "train").is_dir() and (path / "test").is_dir():
        train_ds = _folder(path / "train", spec)
        test_ds = _folder(path / "test", spec)
        extra = sorted(set(test_ds.classes) - set(train_ds.classes))
        if extra:
            raise DataError(f"{spec}: the test folder has classes the train folder lacks: {extra}")
        remap = [train_ds.class_to_idx[c] for c in test_ds.classes]
        test_samples = [(p, remap[t]) for p, t in test_ds.samples]
    else:
        train_ds = _folder(path, spec)
        test_samples = None
    train_samples = list(train_ds.samples)

    everything = train_samples + (test_samples or [])
    size, gray = _survey(everything, spec)
    x_train, y_train = _decode(train_samples, size, gray, spec)
    test = None if test_samples is None else _decode(test_samples, size, gray, spec)
    return (x_train, y_train), test, list(train_ds.classes)


def _survey(samples: list[tuple[str, int]], spec: str) -> tuple[tuple[int, int], bool]:
    """The common (width, height) of all images and whether all are grayscale."""
    from PIL import Image

    size: tuple[int, int] | None = None
    first = ""
    gray = True
    for p, _ in samples:
        try:
            with Image.open(p) as im:  # reads the header only
                s, mode = im.size, im.mode
        except OSError as exc:
            raise DataError(f"{spec}: cannot read image {p}: {exc}") from exc
        if size is None:
            size, first = s, p
        elif s != size:
            raise DataError(
                f"{spec}: images must all be the same size (nothing is resized): "
                f"{first} is {size[0]}x{size[1]} but {p} is {s[0]}x{s[1]} (width x height)"
            )
        gray = gray and mode in _GRAY_MODES
    assert size is not None
    return size, gray


def _decode(
    samples: list[tuple[str, int]], size: tuple[int, int], gray: bool, spec: str
) -> tuple[Tensor, Tensor]:
    from PIL import Image

    w, h = size
    c = 1 if gray else 3
    out = np.empty((len(samples), h, w, c), dtype=np.uint8)
    for i, (p, _) in enumerate(samples):
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"{spec}: cannot decode image {p}: {exc}") from exc
        out[i] = arr.reshape(h, w, c)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    y = torch.tensor([t for _, t in samples], dtype=torch.int64)
    return x, y


def pixel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of float images ``x`` (N, C, H, W), in float64."""
    means, stds = [], []
    for c in range(x.shape[1]):  # one channel at a time: a float64 copy of one channel only
        xc = x[:, c].to(torch.float64)
        means.append(float(xc.mean()))
        stds.append(float(xc.std(correction=0)))
    return means, stds
