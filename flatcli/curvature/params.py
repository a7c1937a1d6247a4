"""Choosing a subset of a model's parameters and moving between a dict of tensors and a flat vector.

Every curvature operator acts on the flat concatenation of some parameters, in the order of
``model.named_parameters()``. These helpers turn the user's words ("features.0", "layer2.*",
"fc.weight") into parameter names and convert between the flat vector and per-parameter views.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
>>> select_parameters(model, "2")
['2.weight', '2.bias']
>>> select_parameters(model, ["0.bias", "2.*"])
['0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from flatcli.errors import UsageError

__all__ = [
    "select_parameters",
    "parameter_shapes",
    "param_slices",
    "flatten_params",
    "unflatten",
    "unflatten_columns",
    "flatten_columns",
]

_MAX_LISTED = 60


def _module_names_with_params(model: nn.Module) -> list[str]:
    """Names of modules that hold parameters directly (the ones a user can point at)."""
    return [
        name
        for name, mod in model.named_modules()
        if name and any(True for _ in mod.parameters(recurse=False))
    ]


def _valid_names_message(model: nn.Module) -> str:
    names = _module_names_with_params(model)
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return f"modules with parameters: {shown or '(none)'}"


def select_parameters(model: nn.Module, patterns: str | Iterable[str] | None) -> list[str]:
    """Parameter names (in ``model.named_parameters()`` order) selected by module names or globs.

    Each pattern may be
      - a module name (``"features.0"``): all parameters of that module and its children;
      - a parameter name (``"fc.weight"``);
      - a shell-style glob over module or parameter names (``"layer2.*"``, ``"*.bias"``);
      - ``"*"`` or ``""``: every parameter.

    Args:
        model: the network.
        patterns: one pattern, several, or None (every parameter with ``requires_grad``).

    Returns:
        The union of the selected parameter names, without duplicates, in model order.

    Raises:
        UsageError: a pattern matches nothing; the message lists the valid module names.
    """
    named = dict(model.named_parameters())
    if patterns is None:
        return [n for n, p in named.items() if p.requires_grad]
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in ("", "*"):
            chosen.update(named)
            continue
        hits: set[str] = set()
        if pattern in named:
            hits.add(pattern)
        mod_hits = [m for m in modules if m and (m == pattern or fnmatch.fnmatchcase(m, pattern))]
        for m in mod_hits:
            hits.update(f"{m}.{n}" for n, _ in modules[m].named_parameters())
        hits.update(n for n in named if fnmatch.fnmatchcase(n, pattern))
        hits &= set(named)  # shared parameters are listed once, under their first name
        if not hits:
            raise UsageError(
                f"No parameters match {pattern!r}. Use a module name, a parameter name or a "
                f"glob; {_valid_names_message(model)}."
            )
        chosen |= hits
    return [n for n in named if n in chosen]


def parameter_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Size]:
    """``{name: shape}`` for the named parameters of ``model``, in the order given."""
    named = dict(model.named_parameters())
    missing = [n for n in names if n not in named]
    if missing:
        raise UsageError(
            f"Unknown parameter names {missing}; {_valid_names_message(model)} "
            f"(parameter names are '<module>.<weight|bias|...>')."
        )
    return {n: named[n].shape for n in names}


def param_slices(shapes: Mapping[str, torch.Size]) -> dict[str, slice]:
    """``{name: slice}`` of each parameter in the flat vector, in the order of ``shapes``."""
    out: dict[str, slice] = {}
    start = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = slice(start, start + size)
        start += size
    return out


def flatten_params(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """Concatenate tensors (a ``{name: tensor}`` mapping in its order, or a sequence) to 1-D."""
    if isinstance(tensors, Mapping):
        tensors = tensors.values()
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Split a flat vector ``(dim,)`` into ``{name: view of shape}`` (the inverse of flatten)."""
    dim = sum(math.prod(s) for s in shapes.values())
    if vec.dim() != 1 or vec.shape[0] != dim:
        raise ValueError(f"Expected a vector of shape ({dim},). Got shape {tuple(vec.shape)}.")
    return {n: vec[sl].view(shapes[n]) for n, sl in param_slices(shapes).items()}


def unflatten_columns(mat: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """Split the columns of ``mat (dim, k)`` into ``{name: (k, *shape)}`` (batch dim first)."""
    k = mat.shape[1]
    return {n: mat[sl].T.reshape(k, *shapes[n]) for n, sl in param_slices(shapes).items()}


def flatten_columns(cols: Mapping[str, Tensor]) -> Tensor:
    """Inverse of :func:`unflatten_columns`: ``{name: (k, *shape)}`` -> ``(dim, k)``."""
    k = next(iter(cols.values())).shape[0]
    return torch.cat([c.reshape(k, -1) for c in cols.values()], dim=1).T
