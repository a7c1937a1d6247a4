"""Options shared by the analysis commands, defined once (README "Common options").

:func:`analysis_command` registers a command function whose signature is extended with the
CHECKPOINT argument and every common option; the function receives them bundled as ``common``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from flatcli.errors import UsageError

Checkpoints = Annotated[
    list[Path],
    typer.Argument(
        help="Checkpoint files or directories (a directory stands for its checkpoints).",
        show_default=False,
        metavar="CHECKPOINT...",
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Zoo name, YAML spec, pkg.module:callable, file.py:callable or torchvision:NAME. Default: the spec in the checkpoint, else <stem>.yaml / model.yaml beside it.",
    ),
]
Dataset = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="mnist5k, mnist5k-2, mnist, mnist-2, fashion-mnist, cifar10, cifar100, svhn, imagefolder:PATH, tensors:PATH. Default: the checkpoint's.",
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where dataset files live. Default: $FLATCLI_DATA, else ~/.cache/flatcli/data.",
    ),
]
Download = Annotated[
    bool, typer.Option("--download", help="Let torchvision download a missing dataset.")
]
Split = Annotated[
    str,
    typer.Option(
        "--split",
        help="Data the measure is computed on: train, test, trained (the training data exactly as "
        "flatcli train used them: its subset, random labels and confusion set) or trained-clean "
        "(the same without the confusion set).",
    ),
]
MaxExamples = Annotated[
    int | None,
    typer.Option(
        "--max-examples",
        min=1,
        help="Use only the first N examples of the split, after a seeded shuffle.",
    ),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size", min=1, help="Examples per forward/backward. Default: chosen to fit memory."
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 or float64.")]
Seed = Annotated[int, typer.Option("--seed", help="Every random draw derives from it.")]
JsonOut = Annotated[
    str | None,
    typer.Option(
        "--json",
        help="Write the JSON report to PATH ('-' for stdout; the table then goes to stderr).",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress bar.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
UnsafeLoad = Annotated[
    bool,
    typer.Option(
        "--unsafe-load", help="Unpickle arbitrary objects from .pt files (runs code from the file)."
    ),
]
FailAbove = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-above",
        help="Gate METRIC=VALUE: exit 3 if METRIC > VALUE for any checkpoint. Repeatable.",
    ),
]
FailBelow = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-below",
        help="Gate METRIC=VALUE: exit 3 if METRIC < VALUE for any checkpoint. Repeatable.",
    ),
]

_COMMON = {
    "model": (Model, None),
    "dataset": (Dataset, None),
    "data_dir": (DataDir, None),
    "download": (Download, False),
    "split": (Split, "train"),
    "max_examples": (MaxExamples, None),
    "batch_size": (BatchSize, None),
    "device": (Device, "auto"),
    "dtype": (Dtype, "float32"),
    "seed": (Seed, 0),
    "json": (JsonOut, None),
    "quiet": (Quiet, False),
    "debug": (Debug, False),
    "unsafe_load": (UnsafeLoad, False),
    "fail_above": (FailAbove, None),
    "fail_below": (FailBelow, None),
}


@dataclass
class CommonOptions:
    """The common options of an analysis command, parsed."""

    checkpoints: list[Path]
    model: str | None = None
    dataset: str | None = None
    data_dir: Path | None = None
    download: bool = False
    split: str = "train"
    max_examples: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    json: str | None = None
    quiet: bool = False
    debug: bool = False
    unsafe_load: bool = False
    fail_above: list[str] = field(default_factory=list)
    fail_below: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Check option values that Typer cannot check by type alone."""
        if self.split not in ("train", "test", "trained", "trained-clean"):
            raise UsageError(
                f"--split must be train, test, trained or trained-clean; got '{self.split}'"
            )
        if self.dtype not in ("float32", "float64"):
            raise UsageError(f"--dtype must be 'float32' or 'float64'; got '{self.dtype}'")

    def to_config(self) -> dict:
        """The options as they go into a report's ``config``."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "download": self.download,
            "split": self.split,
            "max_examples": self.max_examples,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "fail_above": list(self.fail_above),
            "fail_below": list(self.fail_below),
        }


def analysis_command(app: typer.Typer, name: str, **command_kwargs):
    """Register ``fn(common: CommonOptions, **own_options)`` as an analysis command of ``app``.

    The registered signature is: CHECKPOINT..., the command's own options, then the common
    options, so ``--help`` lists them all.
    """

    def decorator(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "common"]
        checkpoints = inspect.Parameter(
            "checkpoints", inspect.Parameter.KEYWORD_ONLY, annotation=Checkpoints
        )
        common = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=ann, default=default)
            for n, (ann, default) in _COMMON.items()
        ]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            from flatcli.cli.errors import handle_errors

            opts = {n: kwargs.pop(n) for n in _COMMON}
            opts["fail_above"] = opts["fail_above"] or []
            opts["fail_below"] = opts["fail_below"] or []
            common = CommonOptions(checkpoints=kwargs.pop("checkpoints"), **opts)
            with handle_errors(common.debug):
                return fn(common=common, **kwargs)

        params = [checkpoints, *own, *common]
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__
        app.command(name, **command_kwargs)(wrapper)
        return fn

    return decorator
