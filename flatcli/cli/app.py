"""The Typer application: it only registers the subcommands, each in its own module."""

from __future__ import annotations

import importlib
from typing import Annotated

import typer

import flatcli

app = typer.Typer(
    name="flatcli",
    help="How flat or sharp is the minimum of a trained network, and how that relates to generalization.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMAND_MODULES = ("train", "spectrum", "sharpness", "reparam", "gamma")


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


for _name in COMMAND_MODULES:
    try:
        importlib.import_module(f"flatcli.cli.{_name}").register(app)
    except ModuleNotFoundError as _e:  # a subcommand not yet written
        if _e.name != f"flatcli.cli.{_name}":
            raise


def main() -> None:
    """Console-script entry point."""
    app()
