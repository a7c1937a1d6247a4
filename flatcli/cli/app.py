"""The Typer application: a table of subcommands, each module imported only when it runs.

``flatcli --help`` answers at once (no torch import): it lists :data:`COMMANDS`. A missing
module drops out of the list. To add a command, write ``flatcli/cli/<name>.py`` with a function
made by :func:`flatcli.cli.options.command` and add its line to :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from flatcli._version import __version__

COMMANDS: dict[str, str] = {
    "train": "Train a model and write a .safetensors checkpoint that records everything.",
    "spectrum": "Top eigenvalues (Lanczos), trace (Hutch++) and density (SLQ).",
    "sharpness": "Normalized sharpness (Tsuzuku et al.) and the classic sharpness measures.",
    "reparam": "Write a checkpoint computing the same function with rescaled weights; report "
    "the largest logit difference.",
    "gamma": "γ̂ = mean ln|J Jᵀ| over samples (Jia & Su, Eq. 5).",
    "pacbayes": "Optimised, certified PAC-Bayes bound (Dziugaite & Roy; Wu et al.).",
    "rank": "Rank a sweep of checkpoints by their measures against the gap.",
    "kfac": "Kronecker factors of each layer's Hessian vs the exact block.",
    "landscape": "Loss on a 1-D or 2-D slice around a minimum (filter-normalised, Li et al.).",
    "measures": "List every measure: its metrics, their direction, source and cost.",
}
"""Subcommand name -> its one-line help for ``flatcli --help``; its module is
``flatcli.cli.<name>``."""


def _module(name: str) -> str:
    return f"flatcli.cli.{name}"


def _available(module: str) -> bool:
    """Whether ``module`` exists, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_commands() -> list[str]:
    """The names of :data:`COMMANDS` whose module exists, in the table's order."""
    return [name for name in COMMANDS if _available(_module(name))]


class LazyGroup(TyperGroup):
    """A command group that imports a subcommand's module only when that subcommand is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listing = False
        self._loaded: dict[str, Any] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return available_commands()

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS or not _available(_module(cmd_name)):
            return None
        if self._listing:  # the group's own --help: the table's line, nothing imported
            help_line = COMMANDS[cmd_name]
            return typer.core.TyperCommand(name=cmd_name, help=help_line, short_help=help_line)
        if cmd_name not in self._loaded:
            self._loaded[cmd_name] = _load(cmd_name)
        return self._loaded[cmd_name]

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        self.commands = {name: None for name in self.list_commands(ctx)}  # for "did you mean"
        try:
            return super().resolve_command(ctx, args)
        finally:
            self.commands = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def _load(name: str) -> Any:
    """The click command ``name``, from the command function its module defines."""
    from flatcli.cli.options import add

    module = importlib.import_module(_module(name))
    holder = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @holder.callback()
    def _holder() -> None:  # a callback makes the holder a group, whatever it holds
        """Holder of one module's command."""

    for fn in vars(module).values():
        if getattr(fn, "flatcli_command", (None,))[0] == name:
            add(holder, fn)
    command = typer.main.get_group(holder).commands.get(name)
    if command is None:
        raise RuntimeError(f"{_module(name)} defines no command '{name}'")
    return command


app = typer.Typer(
    name="flatcli",
    cls=LazyGroup,
    help="How flat or sharp is the minimum of a trained network, and how that relates to generalization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flatcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = None,
) -> None:
    """flatcli: flatness, sharpness and curvature of trained networks."""


def main() -> None:
    """Console-script entry point."""
    # torch 2.15 warns about its own internal use of torch.jit.script (in torch.func and
    # torch.fx); a user of the command line can do nothing about it.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    try:
        app()
    finally:  # under torchrun, leave the process group together, before interpreter teardown
        import sys

        if "flatcli.distributed" in sys.modules:
            sys.modules["flatcli.distributed"].shutdown(synchronize=True)
