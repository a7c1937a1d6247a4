"""Options declared once: a config dataclass field carries its command-line flag and help.

A measure's config (``SpectrumConfig``, ``GammaConfig``, ...) is the one definition of its
options. A field made with :func:`option` has a name, a type, a default and a :class:`Flag`
(the flag, its help, its bounds); from these the command line's signature (``flatcli.cli``),
the options object (the config itself) and the report's ``config`` (:func:`plain_dict`) follow.
Fields made with plain ``dataclasses.field`` (``seed``, ``batch_size``: common options, set by
the runner) are not flags of the command.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Demo:
...     top_k: int = option(10, "--top-k", "Eigenvalues to compute.", min=0)
>>> [(f.name, flag.flag) for f, flag in flags_of(Demo)]
[('top_k', '--top-k')]
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["Flag", "option", "choices", "flags_of", "plain_dict", "from_flags"]

_KEY = "flatcli.option"


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line.

    Attributes:
        flag: the option's name, e.g. ``--top-k``.
        help: one or two sentences for ``--help`` and the command's docs page.
        min: the smallest value accepted (checked by the command line before any work).
        choices: a ``str`` Enum whose values are the accepted strings (the field holds the
            plain string).
        repeatable: a list option given once per value; the field holds a tuple (or None).
        short: an optional one-letter alias, e.g. ``-o``.
        parse: the command line gives text (a list of texts when ``repeatable``) and
            ``parse(text)`` makes the field's value (``"a,b"`` → ``("a", "b")``, say).
    """

    flag: str
    help: str
    min: float | None = None
    choices: type[Enum] | None = None
    repeatable: bool = False
    short: str | None = None
    parse: Callable[[Any], Any] | None = None


def option(
    default: Any,
    flag: str,
    help: str,
    *,
    min: float | None = None,
    choices: type[Enum] | None = None,
    repeatable: bool = False,
    short: str | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field with ``default`` that is the command-line option ``flag``."""
    meta = Flag(
        flag, help, min=min, choices=choices, repeatable=repeatable, short=short, parse=parse
    )
    if isinstance(default, list | dict | set):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={_KEY: meta})


def choices(name: str, values: str, doc: str) -> Any:
    """A ``str`` Enum of the space-separated command-line choices ``values``: member ``NAME``
    for each value (upper case, ``-`` as ``_``), equal to its string, so it prints as plain
    text in JSON and shows as a choice in ``--help``.

    >>> Kind = choices("Kind", "hessian ggn", "Which curvature matrix.")
    >>> Kind.GGN == "ggn", Kind("hessian").name
    (True, 'HESSIAN')
    """
    members = {value.upper().replace("-", "_"): value for value in values.split()}
    module = sys._getframe(1).f_globals.get("__name__")
    enum = Enum(name, members, type=str, module=module, qualname=name)
    enum.__doc__ = doc
    return enum


def flags_of(config_type: type) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of ``config_type`` that are command-line options, in declaration order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(config_type) if _KEY in f.metadata]


def field_types(config_type: type) -> dict[str, Any]:
    """The evaluated type annotation of every field of ``config_type``."""
    return typing.get_type_hints(config_type)


def from_flags(config_type: type, values: dict[str, Any], **fixed: Any) -> Any:
    """``config_type(**values, **fixed)`` with command-line values made plain: Enum members as
    their values, repeated options as tuples; a repeatable option not given keeps its default."""
    kwargs: dict[str, Any] = {}
    for f, meta in flags_of(config_type):
        if f.name not in values:
            continue
        value = values[f.name]
        if meta.parse is not None:
            if value is None or value == []:
                continue
            kwargs[f.name] = meta.parse(value)
            continue
        if isinstance(value, Enum):
            value = value.value
        if meta.repeatable:
            if not value:
                continue
            value = tuple(v.value if isinstance(v, Enum) else v for v in value)
        kwargs[f.name] = value
    return config_type(**kwargs, **fixed)


def plain_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-ready values: tuples as lists, Enums as their values, paths as text."""

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if value is not None and not isinstance(value, bool | int | float | str):
            return str(value)
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
