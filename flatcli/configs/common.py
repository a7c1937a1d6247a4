"""The options every analysis command shares: how each checkpoint is loaded, and the CI gates.

:class:`LoadOptions` are the arguments of :func:`flatcli.io.load.load`; :class:`Gates` turn the
report's rows into exit code 3 (:func:`flatcli.run.check_gates` refuses a gate on a metric the
run does not report, before any work).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatcli.configs.choices import LossName
from flatcli.errors import UsageError
from flatcli.options import option

__all__ = [
    "SPLITS",
    "LoadOptions",
    "Gates",
    "gate_failure",
    "parse_gates",
    "check_gate_names",
]

SPLITS = ("train", "test", "trained", "trained-clean")
"""Splits :func:`flatcli.io.load.load` can take: a dataset split, or the training data exactly as
trained on."""


@dataclass(frozen=True)
class LoadOptions:
    """How each checkpoint is loaded: the arguments of :func:`flatcli.io.load.load`, and the
    common options of every analysis command."""

    model: str | None = option(
        None,
        "--model",
        "Zoo name, YAML spec, pkg.module:callable, file.py:callable or torchvision:NAME. "
        "Default: the spec in the checkpoint, else <stem>.yaml / model.yaml beside it.",
    )
    dataset: str | None = option(
        None,
        "--dataset",
        "mnist5k, mnist5k-2, mnist, mnist-2, fashion-mnist, cifar10, cifar100, svhn, "
        "python-license, text:PATH, imagefolder:PATH, tensors:PATH. Default: the checkpoint's.",
    )
    seq_len: int | None = option(
        None,
        "--seq-len",
        "Tokens T per example of a text dataset (text:PATH, python-license). Default: the "
        "checkpoint's, else 128.",
        min=1,
    )
    data_dir: Path | None = option(
        None,
        "--data-dir",
        "Where dataset files live. Default: $FLATCLI_DATA, else ~/.cache/flatcli/data.",
    )
    download: bool = option(False, "--download", "Let torchvision download a missing dataset.")
    split: str = option(
        "train",
        "--split",
        "Data the measure is computed on: train, test, trained (the training data exactly as "
        "flatcli train used them: its subset, random labels and confusion set) or trained-clean "
        "(the same without the confusion set).",
    )
    max_examples: int | None = option(
        None,
        "--max-examples",
        "Use only the first N examples of the split, after a seeded shuffle.",
        min=1,
    )
    batch_size: int | None = option(
        None, "--batch-size", "Examples per forward/backward. Default: chosen to fit memory.", min=1
    )
    device: str = option("auto", "--device", "auto, cpu, cuda, cuda:N or mps.")
    dtype: str = option("float32", "--dtype", "float32 or float64.")
    seed: int = option(0, "--seed", "Every random draw derives from it.")
    unsafe_load: bool = option(
        False,
        "--unsafe-load",
        "Unpickle arbitrary objects from .pt files (runs code from the file).",
    )
    loss: str | None = option(
        None,
        "--loss",
        "Loss every measure takes: ce, nsce, token-ce (logits (N, T, V)), mse, bce. Default: "
        "the checkpoint's, else inferred: token-ce for int targets (N, T), mse for float "
        "targets, else ce.",
        choices=LossName,
    )

    def validate(self) -> None:
        """Check the values a type alone cannot (UsageError: exit 2 before any work)."""
        if self.split not in SPLITS:
            raise UsageError(
                f"--split must be train, test, trained or trained-clean; got '{self.split}'"
            )
        from flatcli.dtypes import dtype_of
        from flatcli.errors import choice

        dtype_of(self.dtype)
        if self.loss is not None:
            choice(LossName, self.loss, "loss")
        if self.seq_len is not None:
            from flatcli.data.text import check_seq_len

            check_seq_len(self.seq_len)

    def data(self) -> dict[str, Any]:
        """The arguments of :func:`flatcli.io.load.load` that pick the examples."""
        names = ("dataset", "seq_len", "split", "max_examples", "seed", "unsafe_load", "batch_size")
        names += ("loss",)
        return {name: getattr(self, name) for name in names}

    def load_config(self) -> dict[str, Any]:
        """The options as a report's ``config`` holds them."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "seq_len": self.seq_len,
            "data_dir": str(self.data_dir) if self.data_dir else None,
            "download": self.download,
            "split": self.split,
            "max_examples": self.max_examples,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            "seed": self.seed,
            "loss": self.loss,
        }


@dataclass(frozen=True)
class Gates:
    """CI gates on the reported metrics: exit 3 when a checkpoint crosses one."""

    fail_above: tuple[str, ...] | None = option(
        None,
        "--fail-above",
        "Gate METRIC=VALUE: exit 3 if METRIC > VALUE for any checkpoint. Repeatable.",
        repeatable=True,
    )
    fail_below: tuple[str, ...] | None = option(
        None,
        "--fail-below",
        "Gate METRIC=VALUE: exit 3 if METRIC < VALUE for any checkpoint. Repeatable.",
        repeatable=True,
    )

    @property
    def above(self) -> list[tuple[str, float]]:
        """``--fail-above`` as (metric, limit) pairs."""
        return parse_gates(self.fail_above or (), "--fail-above")

    @property
    def below(self) -> list[tuple[str, float]]:
        """``--fail-below`` as (metric, limit) pairs."""
        return parse_gates(self.fail_below or (), "--fail-below")

    def gate_config(self) -> dict[str, Any]:
        """The gates as a report's ``config`` holds them."""
        return {
            "fail_above": list(self.fail_above or ()),
            "fail_below": list(self.fail_below or ()),
        }

    def failures(self, results: Sequence[dict[str, Any]]) -> tuple[int, list[str]]:
        """(exit code, one message per failed gate): 3 when a gate failed, 2 when a gate's
        metric is in no row, else 0."""
        messages: list[str] = []
        pairs = [(n, v, ">") for n, v in self.above] + [(n, v, "<") for n, v in self.below]
        for name, limit, sign in pairs:
            if results and all(name not in r["metrics"] and name not in r for r in results):
                known = sorted({k for r in results for k in r["metrics"]})
                return 2, [
                    f"gate metric '{name}' is not in this report; metrics: {', '.join(known)}"
                ]
            label = f"gate {name}{sign}{limit:g}"
            found = (
                gate_failure(r, name, sign, limit, label, f"{sign} {limit:g}") for r in results
            )
            messages += [m for m in found if m is not None]
        return (3 if messages else 0), messages


def gate_failure(
    row: dict[str, Any], name: str, sign: str, limit: float, label: str, beyond: str
) -> str | None:
    """The message when ``row``'s value of ``name`` (a metric, or a key of the row itself such
    as ``rank``'s gap) is null, or lies beyond ``limit`` (``sign`` ``>`` or ``<``); else None."""
    value = row["metrics"][name] if name in row["metrics"] else row.get(name)
    if value is None:
        return f"{label} cannot be checked for {row['checkpoint']}: value is null"
    if (sign == ">" and value > limit) or (sign == "<" and value < limit):
        return f"gate failed: {row['checkpoint']}: {name} = {value:.6g} {beyond}"
    return None


def parse_gates(specs: Sequence[str], flag: str) -> list[tuple[str, float]]:
    """``METRIC=VALUE`` gate options as (metric, value) pairs; UsageError when malformed."""
    gates = []
    for s in specs:
        name, sep, value = s.partition("=")
        try:
            gates.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UsageError(
                f"{flag} takes METRIC=VALUE (e.g. {flag} top_eigenvalue=50); got '{s}'"
            )
    return gates


def check_gate_names(gates: Iterable[tuple[str, tuple[str, float]]], known: Sequence[str]) -> None:
    """Raise a UsageError for a gate on a metric the run does not report (before any work).

    ``gates`` holds (option name, (metric, value)) pairs; ``known`` the metric keys (and
    ``gap``) the run reports.
    """
    for flag, (name, _) in gates:
        if name not in known:
            raise UsageError(
                f"{flag} {name}: not a metric of this run; metrics: {', '.join(known)}"
            )
