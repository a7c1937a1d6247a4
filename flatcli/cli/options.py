"""A command's options, from the dataclasses that declare them (:mod:`flatcli.options`).

A command is a function whose parameters are annotated with option dataclasses:

    @command("spectrum", help="...")
    def spectrum(checkpoints: Paths, config: SpectrumConfig, files: SpectrumFiles,
                 common: Common) -> None: ...

:func:`command` builds the Typer signature from those dataclasses' fields and calls the
function with each dataclass built from what was parsed; a field that is not an option
(``seed``, ``batch_size``, ``loss``) takes the option of the same name (an option two groups
declare, the first group's). :func:`add` puts it on an app."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from flatcli.configs.common import Gates, LoadOptions
from flatcli.options import Flag, field_types, flags_of, from_flags, option

Paths = list[Path]  # the checkpoint arguments of a command function
Checkpoints = Annotated[
    list[Path],
    typer.Argument(
        help="Checkpoint files or directories (a directory stands for its checkpoints).",
        show_default=False,
        metavar="CHECKPOINT...",
    ),
]


@dataclass(frozen=True)
class OutputOptions:
    """Where a command's table and report go."""

    json: str | None = option(
        None,
        "--json",
        "Write the JSON report to PATH ('-' for stdout; the table then goes to stderr).",
    )
    quiet: bool = option(False, "--quiet", "No table, no progress bar.", short="-q")
    debug: bool = option(False, "--debug", "Show tracebacks for errors.")


@dataclass(frozen=True)
class Common(OutputOptions, Gates, LoadOptions):
    """The common options of every analysis command: loading, gates and output."""


def _cli_type(hint: Any, meta: Flag) -> Any:
    """The type Typer parses for a field annotated ``hint``."""
    if meta.parse is not None:
        return list[str] | None if meta.repeatable else str | None
    if meta.choices is not None:
        return list[meta.choices] | None if meta.repeatable else meta.choices
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if meta.repeatable:
        inner = typing.get_args(args[0])[0] if args and typing.get_args(args[0]) else str
        return list[inner] | None
    if len(args) > 1:  # e.g. ``Optimizer | str``: the text the library reads
        return str | None if type(None) in typing.get_args(hint) else str
    return hint


def _parameter(f: dataclasses.Field, meta: Flag, hint: Any) -> inspect.Parameter:
    names = [meta.flag] + ([meta.short] if meta.short else [])
    default = f.default
    if meta.repeatable or meta.parse is not None:
        default = None
    elif meta.choices is not None and default is not None:
        default = meta.choices(default)
    elif isinstance(default, Enum):
        default = default.value
    annotation = Annotated[
        _cli_type(hint, meta), typer.Option(*names, help=meta.help, min=meta.min)
    ]
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


def _groups(fn: Any) -> dict[str, type]:
    hints = typing.get_type_hints(fn).items()
    return {k: t for k, t in hints if isinstance(t, type) and dataclasses.is_dataclass(t)}


def build(config_type: type, values: dict[str, Any]) -> Any:
    """``config_type`` from parsed values; a field not an option takes the option so named."""
    flagged = {f.name for f, _ in flags_of(config_type)}
    fixed = {
        f.name: values[f.name]
        for f in dataclasses.fields(config_type)
        if f.name not in flagged and f.name in values and f.init
    }
    return from_flags(config_type, values, **fixed)


def command(name: str, help: str, prepare: Callable[[], object] | None = None) -> Any:
    """Make ``fn`` the command ``name``: its Typer signature read from its parameters' types;
    ``prepare()``, if given, runs before its option dataclasses are built."""
    from flatcli.cli.errors import handle_errors

    def decorator(fn: Any) -> Any:
        groups = _groups(fn)
        takes_checkpoints = "checkpoints" in inspect.signature(fn).parameters
        params: list[inspect.Parameter] = []
        if takes_checkpoints:
            kind = inspect.Parameter.KEYWORD_ONLY
            params.append(inspect.Parameter("checkpoints", kind, annotation=Checkpoints))
        for config_type in groups.values():
            hints = field_types(config_type)
            params += [_parameter(f, meta, hints[f.name]) for f, meta in flags_of(config_type)]
        params = list({p.name: p for p in params[::-1]}.values())[::-1]  # a repeat: the first

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            with handle_errors(bool(kwargs.get("debug"))):
                if prepare is not None:
                    prepare()
                args = {p: build(t, kwargs) for p, t in groups.items()}
                if takes_checkpoints:
                    args["checkpoints"] = kwargs["checkpoints"]
                return fn(**args)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__
        wrapper.flatcli_command = (name, help)
        return wrapper

    return decorator


def add(app: typer.Typer, fn: Any) -> None:
    """Put the command function ``fn`` (made by :func:`command`) on ``app``."""
    name, help = fn.flatcli_command
    app.command(name, help=help)(fn)


__all__ = ["Paths", "Checkpoints", "OutputOptions", "Common", "build", "command", "add"]
