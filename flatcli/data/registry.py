"""Dataset names, where their files live, and :func:`load_dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flatcli.data.normalization import (
    USUAL_STATS,
    apply_normalization,
    make_stats,
    resolve_normalization,
)
from flatcli.data.splits import Dataset, Split
from flatcli.errors import DataError, UsageError

__all__ = ["default_data_dir", "list_datasets", "load_dataset"]

_BUNDLED = ("mnist5k", "mnist5k-2")
_TORCHVISION = (
    "mnist",
    "mnist-2",
    "fashion-mnist",
    "fashion-mnist-2",
    "cifar10",
    "cifar100",
    "svhn",
)
_TEXT = ("python-license",)
_PATTERNS = ("text:PATH", "imagefolder:PATH", "tensors:PATH")
_PATH_KINDS = ("text", "imagefolder", "tensors")


def list_datasets(*, include_patterns: bool = False) -> list[str]:
    """The dataset names ``load_dataset`` accepts.

    With ``include_patterns`` the path forms ``text:PATH``, ``imagefolder:PATH`` and
    ``tensors:PATH`` are listed too.

    >>> list_datasets()[:2]
    ['mnist5k', 'mnist5k-2']
    """
    return [*_BUNDLED, *_TORCHVISION, *_TEXT, *(_PATTERNS if include_patterns else ())]


def default_data_dir() -> Path:
    """``$FLATCLI_DATA`` if set (and not empty), else ``~/.cache/flatcli/data``."""
    env = os.environ.get("FLATCLI_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flatcli" / "data"


def _canonical(name: str) -> tuple[str, str | None]:
    """(kind, path) where kind is a fixed name or 'text'/'imagefolder'/'tensors'."""
    if not isinstance(name, str):
        raise UsageError(f"a dataset name must be a string; got {type(name).__name__}")
    stripped = name.strip()
    prefix, sep, rest = stripped.partition(":")
    if sep and prefix.lower() in _PATH_KINDS:
        if not rest.strip():
            raise UsageError(f"'{prefix.lower()}:' needs a path, e.g. {prefix.lower()}:./data")
        return prefix.lower(), rest.strip()
    key = stripped.lower().replace("_", "-")
    if key in _BUNDLED or key in _TORCHVISION or key in _TEXT:
        return key, None
    raise UsageError(
        f"unknown dataset {name!r}; valid names: {', '.join(list_datasets(include_patterns=True))}"
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    normalization: dict | None | str = "default",
    seq_len: int | None = None,
    tokenizer: str | Path | None = None,
) -> Dataset:
    """Load a whole dataset into memory as float inputs and int64 labels.

    Args:
        name: ``mnist5k``, ``mnist5k-2``, ``mnist``, ``mnist-2``, ``fashion-mnist``,
            ``fashion-mnist-2``, ``cifar10``, ``cifar100``, ``svhn``, ``python-license``,
            ``text:PATH``, ``imagefolder:PATH`` or ``tensors:PATH``.
        data_dir: where torchvision sets live (torchvision's ``root``); default
            :func:`default_data_dir`. Unused by the other names. Fashion-MNIST is read from
            the system's copy (Debian's ``dataset-fashion-mnist``, see :mod:`flatcli.data.idx`)
            when this directory holds none.
        download: let torchvision fetch a missing set into ``data_dir``. Never otherwise.
        normalization: ``"default"`` (the set's usual per-channel mean/std; for
            ``imagefolder:`` the train images' own; for ``tensors:`` none), None (pixels in
            [0, 1]), or an explicit ``{"mean": [...], "std": [...]}``, e.g. the one a checkpoint
            recorded. ``tensors:`` and text inputs are never normalised: only "default" or None.
        seq_len: a text dataset's T, tokens per example (default 128; :mod:`flatcli.data.text`).
            Only for ``text:PATH`` and ``python-license``.
        tokenizer: a Hugging Face ``tokenizer.json`` that tokenises a text dataset (default:
            its UTF-8 bytes). Only for text datasets.

    Returns:
        A :class:`Dataset` whose ``normalization`` is what was applied.

    Raises:
        UsageError: unknown name or bad ``normalization`` (exit code 2).
        DataError: missing or unreadable files; the message says what to pass
            (``--download``, ``--data-dir``).
    """
    kind, path = _canonical(name)
    if kind in _TEXT or kind == "text":
        return _load_text(kind, path, normalization, seq_len, tokenizer)
    if seq_len is not None or tokenizer is not None:
        raise UsageError(
            f"--seq-len and a tokenizer apply to text datasets (text:PATH, python-license); "
            f"dataset {name!r} is not one"
        )
    if kind in _BUNDLED:
        return _load_mnist5k(kind, normalization)
    if kind in _TORCHVISION:
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        return _load_torchvision(kind, root, download, normalization)
    assert path is not None
    spec = f"{kind}:{path}"
    if kind == "tensors":
        return _load_tensors(spec, Path(path).expanduser(), normalization)
    return _load_imagefolder(spec, Path(path).expanduser(), normalization)


def _finish(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None,
    num_classes: int,
    stats: dict | None,
) -> Dataset:
    """Normalise float images in place and wrap them in a Dataset."""
    x_train, y_train = train
    apply_normalization(x_train, stats)
    test_split = None
    if test is not None:
        apply_normalization(test[0], stats)
        test_split = Split(test[0], test[1])
    return Dataset(
        name=name,
        train=Split(x_train, y_train),
        test=test_split,
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        normalization=stats,
    )


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


def _load_mnist5k(kind: str, normalization) -> Dataset:
    from flatcli.data.mnist5k import load_mnist5k_arrays

    stats = resolve_normalization(normalization, USUAL_STATS["mnist"], 1, kind)
    x_train, y_train, x_test, y_test = load_mnist5k_arrays()
    num_classes = 10
    if kind == "mnist5k-2":
        y_train, y_test = (y_train >= 5).to(torch.int64), (y_test >= 5).to(torch.int64)
        num_classes = 2
    return _finish(kind, (x_train, y_train), (x_test, y_test), num_classes, stats)


def _load_torchvision(kind: str, root: Path, download: bool, normalization) -> Dataset:
    from flatcli.data.torchvision_sets import TORCHVISION_SETS, load_torchvision_split

    spec = TORCHVISION_SETS[kind]
    stats = resolve_normalization(
        normalization, USUAL_STATS[spec.stats_key], spec.input_shape[0], kind
    )
    x_train, y_train = load_torchvision_split(kind, root, train=True, download=download)
    x_test, y_test = load_torchvision_split(kind, root, train=False, download=download)
    return _finish(
        kind, (_to_unit(x_train), y_train), (_to_unit(x_test), y_test), spec.num_classes, stats
    )


def _load_tensors(spec: str, path: Path, normalization) -> Dataset:
    from flatcli.data.tensors import load_tensors

    if normalization is not None and normalization != "default":
        raise UsageError(
            f"{spec}: tensors: inputs are used exactly as stored and never normalised; "
            f"pass normalization None or 'default' (got {normalization!r})"
        )
    train, test, num_classes = load_tensors(path, spec)
    return _finish(spec, train, test, num_classes, None)


def _load_text(
    kind: str, path: str | None, normalization, seq_len: int | None, tokenizer
) -> Dataset:
    from flatcli.data.text import DEFAULT_SEQ_LEN, load_text, python_license_path

    spec = kind if path is None else f"text:{path}"
    if normalization is not None and normalization != "default":
        raise UsageError(
            f"{spec}: text is tokenised, never normalised; pass normalization None or 'default' "
            f"(got {normalization!r})"
        )
    file = python_license_path() if path is None else Path(path).expanduser()
    tok = None if tokenizer is None else Path(tokenizer).expanduser()
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    train, test, vocab, record = load_text(file, spec, seq_len, tok)
    return Dataset(
        name=spec,
        train=train,
        test=test,
        num_classes=vocab,
        input_shape=(int(train.x.shape[1]),),
        normalization=None,
        text=record,
    )


def _load_imagefolder(spec: str, path: Path, normalization) -> Dataset:
    from flatcli.data.imagefolder import load_imagefolder, pixel_stats

    (x_train, y_train), test, classes = load_imagefolder(path, spec)
    x_train = _to_unit(x_train)
    test = None if test is None else (_to_unit(test[0]), test[1])
    channels = x_train.shape[1]
    default = None
    if isinstance(normalization, str) and normalization == "default":
        mean, std = pixel_stats(x_train)
        if min(std) <= 0:
            raise DataError(
                f"{spec}: a channel is constant over the train images (std {std}); "
                "its default normalisation is undefined: load it with normalization=None"
            )
        default = make_stats(mean, std)
    stats = resolve_normalization(normalization, default, channels, spec)
    return _finish(spec, (x_train, y_train), test, len(classes), stats)
