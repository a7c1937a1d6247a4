"""``tensors:PATH``: examples the user saved as tensors, used exactly as stored.

The file is a ``.safetensors`` file or a ``.pt``/``.pth`` file read with
``torch.load(..., weights_only=True)`` (a dict of tensors). It holds ``x_train`` and
``y_train``, optionally ``x_test`` and ``y_test``, or just ``x`` and ``y`` (the train split),
and optionally a scalar ``num_classes``. Inputs are not normalised, reordered or augmented;
a floating-point ``x`` keeps its dtype (float64 stays float64), an integer ``x`` becomes
float32 with the same values (int64 token ids when the targets are (N, T) integers). Targets:
integer class labels >= 0 (N,) (int64), integer token targets (N, T) (ids >= 0, -100 where a
position is not counted), or float targets (N,) / (N, D) kept as stored (regression,
multi-label). ``num_classes`` is the largest label + 1 (float targets: D).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from flatcli.errors import DataError

__all__ = ["load_tensors"]

_TORCH_SUFFIXES = (".pt", ".pth")
IGNORE_INDEX = -100
"""A token target that is not counted (as ``flatcli.curvature.losses.IGNORE_INDEX``)."""
_LAYOUT = "x_train and y_train (optionally x_test and y_test), or x and y"


def _read(path: Path, spec: str) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{spec}: cannot read {path} as safetensors: {exc}") from exc
    if suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for refused objects, RuntimeError, EOFError
            raise DataError(
                f"{spec}: cannot read {path} with torch.load(weights_only=True): {exc}. "
                "Save a plain dict of tensors (torch.save({'x': x, 'y': y}, path))"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{spec}: {path} holds a {type(obj).__name__}, not a dict of tensors with {_LAYOUT}"
            )
        return obj
    raise DataError(
        f"{spec}: unsupported file type {suffix or '(none)'!r}; use .safetensors, .pt or .pth"
    )


def _tensor(obj: dict, key: str, spec: str) -> Tensor:
    value = obj[key]
    if not isinstance(value, Tensor):
        raise DataError(f"{spec}: '{key}' must be a tensor; got {type(value).__name__}")
    return value


def _labels(y: Tensor, key: str, spec: str) -> Tensor:
    if y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{spec}: '{key}' must hold int64 labels or float targets; got {y.dtype}")
    if y.dtype.is_floating_point:  # regression or multi-label targets, kept as stored
        if y.ndim not in (1, 2):
            raise DataError(
                f"{spec}: float targets '{key}' must have shape (N,) or (N, D); got "
                f"{tuple(y.shape)}"
            )
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{spec}: '{key}' holds a value that is not finite")
        return y
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim not in (1, 2):
        raise DataError(
            f"{spec}: '{key}' must hold one class index per example, shape (N,), or token "
            f"targets (N, T); got {tuple(y.shape)}"
        )
    y = y.to(torch.int64)
    counted = y[y != IGNORE_INDEX] if y.ndim == 2 else y
    if counted.numel() and int(counted.min()) < 0:
        raise DataError(f"{spec}: '{key}' holds a negative label ({int(counted.min())})")
    return y


def _num_outputs(y: Tensor) -> int:
    """Classes (max label + 1; token targets: the largest counted id + 1) or float outputs D."""
    if y.dtype.is_floating_point:
        return 1 if y.ndim == 1 else int(y.shape[1])
    counted = y[y != IGNORE_INDEX]
    return int(counted.max()) + 1 if counted.numel() else 1


def _inputs(x: Tensor, key: str, spec: str, tokens: bool = False) -> Tensor:
    if x.ndim < 2:
        raise DataError(
            f"{spec}: '{key}' must have shape (N, ...) with at least one feature dimension; "
            f"got {tuple(x.shape)} (use shape (N, 1) for one feature)"
        )
    if x.dtype.is_complex:
        raise DataError(f"{spec}: '{key}' must be real; got {x.dtype}")
    if not x.dtype.is_floating_point:
        # token ids (beside (N, T) int targets) stay int64; other integers become float32
        x = x.to(torch.int64 if tokens else torch.float32)
    return x


def _pair(obj: dict, xk: str, yk: str, spec: str) -> tuple[Tensor, Tensor]:
    for have, need in ((xk, yk), (yk, xk)):
        if have in obj and need not in obj:
            raise DataError(
                f"{spec}: the file has '{have}' but no '{need}'; it must hold {_LAYOUT}"
            )
    y = _labels(_tensor(obj, yk, spec), yk, spec)
    tokens = y.ndim == 2 and not y.dtype.is_floating_point
    x = _inputs(_tensor(obj, xk, spec), xk, spec, tokens)
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{spec}: '{xk}' holds {x.shape[0]} examples but '{yk}' holds {y.shape[0]} labels"
        )
    if x.shape[0] == 0:
        raise DataError(f"{spec}: '{xk}' holds no examples")
    return x, y


def load_tensors(
    path: Path, spec: str
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None, int]:
    """((x_train, y_train), (x_test, y_test) or None, num_classes) from the file at ``path``."""
    if not path.is_file():
        raise DataError(f"{spec}: no such file {path}")
    obj = _read(path, spec)
    keys = set(obj)
    if "x_train" in keys or "y_train" in keys:
        if "x" in keys or "y" in keys:
            raise DataError(
                f"{spec}: the file has both 'x'/'y' and 'x_train'/'y_train'; keep one pair"
            )
        train = _pair(obj, "x_train", "y_train", spec)
    elif "x" in keys or "y" in keys:
        train = _pair(obj, "x", "y", spec)
    else:
        raise DataError(f"{spec}: the file must hold {_LAYOUT}; found keys {sorted(keys)}")
    test = None
    if "x_test" in keys or "y_test" in keys:
        test = _pair(obj, "x_test", "y_test", spec)
        if test[0].shape[1:] != train[0].shape[1:]:
            raise DataError(
                f"{spec}: test inputs have shape {tuple(test[0].shape[1:])} but train inputs "
                f"{tuple(train[0].shape[1:])}"
            )
        if test[0].dtype != train[0].dtype:
            raise DataError(
                f"{spec}: test inputs are {test[0].dtype} but train inputs {train[0].dtype}"
            )

        if test[1].dtype.is_floating_point != train[1].dtype.is_floating_point or (
            test[1].shape[1:] != train[1].shape[1:] and train[1].dtype.is_floating_point
        ):
            raise DataError(
                f"{spec}: test targets ({test[1].dtype}, {tuple(test[1].shape[1:])}) do not "
                f"match train targets ({train[1].dtype}, {tuple(train[1].shape[1:])})"
            )

    max_label = max(_num_outputs(y) for _, y in ([train] + ([test] if test else []))) - 1
    if "num_classes" in keys:
        stored = obj["num_classes"]
        try:
            if isinstance(stored, Tensor):
                if stored.numel() != 1:
                    raise ValueError
                value = stored.reshape(()).item()
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                num_classes = int(value)
            elif isinstance(stored, int) and not isinstance(stored, bool):
                num_classes = stored
            else:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{spec}: 'num_classes' must be one whole number; got {stored!r}"
            ) from None
        if num_classes <= max_label:
            raise DataError(f"{spec}: 'num_classes' is {num_classes} but a label is {max_label}")
    else:
        num_classes = max_label + 1
    return train, test, num_classes
