"""What a sweep varies and how each run generalized: gaps and hyperparameters per checkpoint.

Three sources, in the order a user would reach for them:

* the training record ``flatcli train`` stores in every checkpoint (train/test accuracy and
  loss, the training configuration, the model spec's keyword arguments);
* ``--evaluate``: accuracy and mean loss measured on the dataset's training data (the data
  exactly as trained on, when the record says how) and its test split, for the checkpoint's loss
  as ``flatcli train`` records them (``token-ce``: token accuracy and mean loss over the counted
  positions; ``mse``: the loss only);
* a user's table (``--table runs.csv``): a ``checkpoint`` column plus gap and hyperparameter
  columns, for sweeps trained elsewhere.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatcli.configs.rank import GAP_KINDS
from flatcli.errors import CheckpointError, UsageError
from flatcli.evaluation import EVAL_BATCH_SIZE, evaluate_loss

__all__ = [
    "GAP_KINDS",
    "GENERALIZATION_KEYS",
    "gap_of",
    "record_generalization",
    "record_hyperparameters",
    "evaluate_generalization",
    "check_gap_kind",
    "SweepTable",
    "read_table",
    "detect_axes",
    "hashable",
]

GENERALIZATION_KEYS = ("train_acc", "test_acc", "train_loss", "test_loss")

_TRAIN_KEYS_DROPPED = ("device", "log_every")
"""Training options that do not change the trained function (where it ran, how often it logged)."""

_SPEC_KWARGS_DROPPED = ("num_classes", "in_channels", "input_shape", "in_features")
"""Spec arguments fixed by the dataset rather than chosen by the sweep."""

REPEAT_AXES = ("seed",)
"""Hyperparameters that are repeats of one setting, not axes, unless asked for by ``--axes``."""


def hashable(value: Any) -> Hashable:
    """``value`` with lists as tuples and dicts as sorted JSON, so it can key a group."""
    if isinstance(value, list | tuple):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def gap_of(gen: Mapping[str, Any], kind: str) -> float | None:
    """The generalization gap of one run: ``acc`` train_acc − test_acc, ``loss`` test − train."""
    if kind not in GAP_KINDS:
        raise UsageError(f"--gap must be acc or loss; got {kind!r}")
    if gen.get("gap") is not None:
        return float(gen["gap"])
    a, b = ("train_acc", "test_acc") if kind == "acc" else ("test_loss", "train_loss")
    if gen.get(a) is None or gen.get(b) is None:
        return None
    value = float(gen[a]) - float(gen[b])
    return value if math.isfinite(value) else None


def record_generalization(record: Mapping[str, Any]) -> dict[str, float] | None:
    """Train/test accuracy and loss from a ``flatcli train`` record (``None`` if it has none)."""
    results = record.get("results") or {}
    gen = {k: results.get(k) for k in GENERALIZATION_KEYS}
    if gen["test_acc"] is None and gen["test_loss"] is None:
        return None
    return gen


def record_hyperparameters(record: Mapping[str, Any], spec: Any = None) -> dict[str, Hashable]:
    """The hyperparameters of one ``flatcli train`` run: its training configuration (optimizer,
    lr, batch size, weight decay, epochs, random-label fraction, seed, ...), the dataset, and the
    model: ``arch`` (or ``factory``) and the spec's keyword arguments (e.g. ``hidden``, ``width``,
    ``depth``; ``model.NAME`` where a name is also a training option)."""
    out: dict[str, Hashable] = {}
    train = record.get("train") or {}
    for k, v in train.items():
        if k not in _TRAIN_KEYS_DROPPED:
            out[k] = hashable(v)
    if record.get("dataset") is not None:
        out["dataset"] = hashable(record["dataset"])
    if spec is not None:
        model = spec.arch if getattr(spec, "arch", None) else getattr(spec, "factory", None)
        if model is not None:
            out["model"] = str(model)
        for k, v in (getattr(spec, "kwargs", None) or {}).items():
            if k in _SPEC_KWARGS_DROPPED:
                continue
            out[k if k not in out else f"model.{k}"] = hashable(v)
    return out


def check_gap_kind(kind: str, loss: str, y: torch.Tensor) -> None:
    """Refuse an accuracy gap for a loss that has no accuracy on the targets ``y``.

    ``mse`` has none, ``bce`` one only when every target is 0 or 1
    (:func:`flatcli.evaluation.has_accuracy`); their gap is ``--gap loss``.

    Raises:
        UsageError: ``kind`` is ``acc`` and ``loss`` has no accuracy on ``y`` (exit 2).
    """
    from flatcli.evaluation import has_accuracy

    if kind == "acc" and not has_accuracy(loss, y):
        why = "bce has one only for targets that are all 0 or 1" if loss == "bce" else "none"
        raise UsageError(
            f"--gap acc needs an accuracy, and loss {loss} has {why}: pass --gap loss "
            "(test loss - train loss)"
        )


def evaluate_generalization(run: Any, batch_size: int | None = None) -> dict[str, Any]:
    """Accuracy and mean loss of ``run.model`` on its training data and test split.

    The loss is the run's (``run.loss``: the one asked for, else the one the checkpoint records,
    else inferred from the targets), evaluated as ``flatcli train`` records it
    (:func:`flatcli.evaluation.evaluate_loss`): for ``token-ce`` the mean over all counted
    positions and the token accuracy; for ``mse`` (and ``bce`` with targets that are not all
    0 or 1) no accuracy (None). The outputs are cast to float64 before the loss, and the sums
    are float64. The training data are those the record says the network was trained on
    (subset, random labels, confusion set: :func:`flatcli.train.prepare.rebuild_train_split`)
    when it is a ``flatcli train`` record of this dataset, else the dataset's training split;
    the whole splits are used (``--max-examples`` limits only the measures' data).

    Args:
        run: a loaded checkpoint (:class:`flatcli.io.load.Run`).
        batch_size: examples per forward (``--batch-size``); None: ``EVAL_BATCH_SIZE`` (1,024).

    Returns:
        ``{"train_acc", "train_loss", "test_acc", "test_loss"}`` (the accuracies None where the
        loss has none).

    Raises:
        CheckpointError: the dataset has no test split.
    """
    data = run.dataset
    if data.test is None:
        raise CheckpointError(
            f"--evaluate needs a test split, and dataset {data.name!r} has none; pass --table"
        )
    train = data.train
    record = run.record or {}
    if record.get("train") is not None and record.get("dataset") == data.name:
        from flatcli.train.prepare import rebuild_train_split

        train = rebuild_train_split(data.train, data.num_classes, record)
    batch = batch_size or EVAL_BATCH_SIZE
    loss_name = getattr(run, "loss", "ce")
    out: dict[str, Any] = {}
    for name, split in (("train", train), ("test", data.test)):
        # inputs as the run's (token ids stay integers); float targets in the run's dtype
        x = run.inputs(split.x)
        y = split.y.to(device=run.device, dtype=run.dtype if split.y.is_floating_point() else None)
        loss, acc = evaluate_loss(run.model, x, y, loss_name, batch, head_dtype=torch.float64)
        out[f"{name}_acc"], out[f"{name}_loss"] = acc, loss
    return out


@dataclass
class SweepTable:
    """A user's table of runs: per checkpoint, its generalization numbers and hyperparameters."""

    path: Path
    rows: list[dict[str, Any]]
    gap_columns: tuple[str, ...]
    hyperparameter_columns: tuple[str, ...]
    _by_path: dict[str, int] = field(default_factory=dict)
    _by_name: dict[str, list[int]] = field(default_factory=dict)

    def find(self, checkpoint: Path) -> dict[str, Any] | None:
        """The row of ``checkpoint``: matched by path (relative to the table's folder or the
        working directory), else by file name when that is unambiguous; None when the table has
        no row for it (a checkpoint without a gap, not an error).

        Raises:
            CheckpointError: several rows by name for the checkpoint.
        """
        resolved = str(Path(checkpoint).resolve())
        if resolved in self._by_path:
            return self.rows[self._by_path[resolved]]
        hits = self._by_name.get(Path(checkpoint).name, [])
        if len(hits) == 1:
            return self.rows[hits[0]]
        if len(hits) > 1:
            raise CheckpointError(
                f"{self.path} has {len(hits)} rows for a file named {Path(checkpoint).name}; "
                "give its checkpoint column as a path"
            )
        return None


def _cell(text: str) -> Any:
    text = text.strip()
    if text == "" or text.lower() in ("na", "nan", "null", "none"):
        return None
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        return value if not (isinstance(value, float) and not math.isfinite(value)) else None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


_CHECKPOINT_COLUMNS = ("checkpoint", "path", "file")


def read_table(path: str | Path) -> SweepTable:
    """Read ``--table CSV``: a ``checkpoint`` column (or ``path``/``file``), the gap as a ``gap``
    column or as ``train_acc``/``test_acc`` (and/or ``train_loss``/``test_loss``) columns, and
    every other column as a hyperparameter (numbers parsed; empty cells missing).

    Raises:
        UsageError: an unreadable file, no checkpoint column, or no gap columns.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): (v or "") for k, v in r.items()} for r in reader]
    except OSError as e:
        raise UsageError(f"cannot read --table {path}: {e.strerror or e}") from e
    ckpt_col = next((c for c in _CHECKPOINT_COLUMNS if c in fields), None)
    if ckpt_col is None:
        raise UsageError(
            f"--table {path} needs a 'checkpoint' column; its columns: {', '.join(fields)}"
        )
    gap_cols = tuple(c for c in ("gap", *GENERALIZATION_KEYS) if c in fields)
    if not gap_cols:
        raise UsageError(
            f"--table {path} needs a 'gap' column or train_acc/test_acc (or train_loss/test_loss) "
            f"columns; its columns: {', '.join(fields)}"
        )
    hp_cols = tuple(c for c in fields if c != ckpt_col and c not in gap_cols and c)
    rows, by_path, by_name = [], {}, {}
    for i, r in enumerate(raw):
        name = r.get(ckpt_col, "").strip()
        if not name:
            raise UsageError(f"--table {path}: row {i + 2} has an empty {ckpt_col} column")
        p = Path(name)
        candidates = [p] if p.is_absolute() else [path.parent / p, Path.cwd() / p]
        for c in candidates:
            by_path.setdefault(str(c.resolve()), i)
        by_name.setdefault(p.name, []).append(i)
        rows.append(
            {
                "checkpoint": name,
                "generalization": {c: _cell(r.get(c, "")) for c in gap_cols},
                "hyperparameters": {c: hashable(_cell(r.get(c, ""))) for c in hp_cols},
            }
        )
    return SweepTable(path, rows, gap_cols, hp_cols, by_path, by_name)


def detect_axes(
    hparams: Sequence[Mapping[str, Hashable]], requested: Sequence[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The sweep's hyperparameter axes: those that take at least two values across ``hparams``.

    ``seed`` counts as a repeat of a setting, not an axis, unless ``requested`` names it. With
    ``requested``, exactly those axes are used (an axis missing from some checkpoint, or
    constant, is reported in the notes).

    Returns:
        ``(axes, notes)``: ``notes`` maps a left-out hyperparameter to why it was left out.

    Raises:
        UsageError: a requested axis that no checkpoint has.
    """
    names: list[str] = []
    for h in hparams:
        for k in h:
            if k not in names:
                names.append(k)
    notes: dict[str, str] = {}
    if requested:
        unknown = [a for a in requested if a not in names]
        if unknown and hparams:
            raise UsageError(
                f"--axes: no checkpoint has hyperparameter(s) {', '.join(unknown)}; "
                f"hyperparameters: {', '.join(names)}"
            )
        candidates = list(requested)
    else:
        candidates = names
    axes = []
    for name in candidates:
        if any(name not in h for h in hparams):
            notes[name] = "missing on some checkpoints"
            continue
        if len({h[name] for h in hparams}) < 2:
            if requested:
                notes[name] = "takes one value only"
            continue
        if not requested and name in REPEAT_AXES:
            notes[name] = "a repeat of each setting, not an axis (name it in --axes to use it)"
            continue
        axes.append(name)
    return axes, notes
