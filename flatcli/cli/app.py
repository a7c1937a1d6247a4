"""The Typer application: one table of subcommands, each in its own module, imported on use.

``flatcli --help`` and ``flatcli --version`` must answer at once, so nothing here imports torch:
:data:`COMMANDS` names each command's module and one-line help, ``--help`` lists the commands
from that table, and a command's module (and with it torch) is imported only when that command
runs or shows its own help. A module that is missing (not written yet, or left out of an
install) drops out of the list without breaking the other commands. To add a command, write
``flatcli/cli/<name>.py`` with ``register(app)`` and add one line to :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from flatcli import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "flatcli.cli.train",
        "Train a model and write a .safetensors checkpoint that records everything.",
    ),
    "spectrum": (
        "flatcli.cli.spectrum",
        "Top eigenvalues (Lanczos), trace (Hutch++) and density (SLQ).",
    ),
    "sharpness": (
        "flatcli.cli.sharpness",
        "Normalized sharpness (scale-invariant, Tsuzuku et al.) and the classic sharpness measures.",
    ),
    "reparam": (
        "flatcli.cli.reparam",
        "Write a checkpoint computing the same function with rescaled weights; report the "
        "largest logit difference.",
    ),
    "gamma": ("flatcli.cli.gamma", "γ̂ = mean ln|J Jᵀ| over samples (Jia & Su, Eq. 5)."),
    "pacbayes": (
        "flatcli.cli.pacbayes",
        "Optimised, certified PAC-Bayes bound (Dziugaite & Roy; Wu et al.).",
    ),
    "rank": ("flatcli.cli.rank", "Rank a sweep of checkpoints by their measures against the gap."),
    "kfac": ("flatcli.cli.kfac", "Kronecker factors of each layer's Hessian vs the exact block."),
    "measures": (
        "flatcli.cli.measures",
        "List every measure: its metrics, their direction, source and cost.",
    ),
}
"""Subcommand name -> (module with ``register(app)``, one-line help for ``flatcli --help``)."""


def _available(module: str) -> bool:
    """Whether ``module`` exists, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_commands() -> list[str]:
    """The names of :data:`COMMANDS` whose module exists, in the table's order."""
    return [name for name, (module, _) in COMMANDS.items() if _available(module)]


class LazyGroup(TyperGroup):
    """A command group that imports a subcommand's module only when that subcommand is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listing = False
        self._loaded: dict[str, Any] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return available_commands()

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS or not _available(COMMANDS[cmd_name][0]):
            return None
        if self._listing:  # the group's own --help: the table's line, nothing imported
            help_line = COMMANDS[cmd_name][1]
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
    """The click command ``name``, from its module's ``register(app)``."""
    module = importlib.import_module(COMMANDS[name][0])
    holder = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @holder.callback()
    def _holder() -> None:  # a callback makes the holder a group, whatever it registers
        """Holder of one module's commands."""

    module.register(holder)
    group = typer.main.get_group(holder)
    command = group.commands.get(name)
    if command is None:
        raise RuntimeError(f"{COMMANDS[name][0]}.register(app) did not add a command '{name}'")
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
    finally:
        # Under torchrun, leave the process group together and before interpreter teardown:
        # a rank that destroys it while a peer is still in a collective, or gloo's threads
        # torn down by the interpreter, abort the process ("terminate called ...").
        import sys

        if "flatcli.distributed" in sys.modules:
            sys.modules["flatcli.distributed"].shutdown(synchronize=True)
