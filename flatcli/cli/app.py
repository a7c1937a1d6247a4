"""The Typer application: it only registers the subcommands, each in its own module."""

from __future__ import annotations

import warnings
from typing import Annotated

import typer

import flatcli
from flatcli.cli import gamma, reparam, sharpness, spectrum, train

app = typer.Typer(
    name="flatcli",
    help="How flat or sharp is the minimum of a trained network, and how that relates to generalization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flatcli {flatcli.__version__}")
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


for _module in (train, spectrum, sharpness, reparam, gamma):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    # torch 2.15 warns about its own internal use of torch.jit.script (in torch.func and
    # torch.fx); a user of the command line can do nothing about it.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    app()
