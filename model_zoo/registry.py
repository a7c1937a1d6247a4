"""The model registry: ``register_model`` fills it, ``get_model`` and ``list_models`` read it."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(ValueError):
    """A zoo name that no builder is registered under; the message lists the valid names."""

    def __init__(self, name: str, valid: list[str]) -> None:
        message = f"unknown model {name!r}; valid names: {', '.join(valid)}"
        close = difflib.get_close_matches(normalise_name(name), valid, n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        super().__init__(message)
        self.name = name
        self.valid = valid


def normalise_name(name: str) -> str:
    """Registry key for ``name``: lower case, ``_`` read as ``-`` ("LeNet5_BN" -> "lenet5-bn")."""
    return name.strip().lower().replace("_", "-")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under ``name``; the builder must take keyword-only arguments."""

    def decorator(builder: Builder) -> Builder:
        if normalise_name(name) != name:
            raise ValueError(f"model names are lower case with '-', not '_'. Got {name!r}.")
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        positional = [
            p.name
            for p in inspect.signature(builder).parameters.values()
            if p.kind is not inspect.Parameter.KEYWORD_ONLY
        ]
        if positional:
            raise TypeError(
                f"builder {builder.__name__!r} must take keyword-only arguments; "
                f"got {', '.join(positional)}"
            )
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name`` (case and ``_``/``-`` insensitive).

    Raises:
        UnknownModelError: no model has that name; the message lists the valid names.
    """
    key = normalise_name(name)
    if key not in _REGISTRY:
        raise UnknownModelError(name, list_models())
    return _REGISTRY[key]


def model_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments the builder of ``name`` accepts, with their defaults."""
    params = inspect.signature(get_model_builder(name)).parameters
    return {k: p.default for k, p in params.items()}


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the zoo model ``name`` with the builder's keyword arguments ``kwargs``.

    Raises:
        UnknownModelError: no model has that name; the message lists the valid names.
        TypeError: a keyword the builder does not take; the message names it and the accepted ones.
        ValueError: a keyword with a value the builder refuses (quoted in the message).
    """
    builder = get_model_builder(name)
    accepted = list(inspect.signature(builder).parameters)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise TypeError(
            f"model {normalise_name(name)!r} got unexpected keyword argument{s} "
            f"{', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}"
        )
    return builder(**kwargs)
