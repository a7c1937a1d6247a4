"""JSON reports in the documented shape (schema ``flatcli/report-v1``)."""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from flatcli._version import __version__
from flatcli.dtypes import dtype_name
from flatcli.io.atomic import write_text_atomic

SCHEMA = "flatcli/report-v1"
REPORT_KEYS = (
    "schema",
    "command",
    "flatcli_version",
    "created",
    "config",
    "environment",
    "results",
)
RESULT_KEYS = ("checkpoint", "sha256", "num_params", "metrics", "details", "seconds", "error")


def finite_metrics(metrics: dict[str, Any], details: dict[str, Any]) -> dict[str, Any]:
    """Metrics with non-finite numbers set to ``None``, the reason in ``details['non_finite']``.

    A measure that already set a metric to ``None`` is expected to have put its reason in details.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            details.setdefault("non_finite", {})[key] = f"value was {value}"
            value = None
        out[key] = value
    return out


def result_entry(
    checkpoint: str,
    *,
    sha256: str | None,
    num_params: int | None,
    metrics: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
    seconds: float = 0.0,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """One element of a report's ``results`` list."""
    details = dict(details or {})
    return {
        "checkpoint": checkpoint,
        "sha256": sha256,
        "num_params": num_params,
        "metrics": finite_metrics(metrics or {}, details) if error is None else {},
        "details": details,
        "seconds": round(seconds, 4),
        "error": None
        if error is None
        else {"type": type(error).__name__, "message": str(error) or type(error).__name__},
    }


def build_report(
    command: str,
    config: dict[str, Any],
    environment: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The whole report object, keys in the documented order.

    ``interrupted``: the run did not finish (still running, stopped by Ctrl-C, or crashed);
    ``results`` then hold the checkpoints finished so far and the report ends with
    ``"interrupted": true``. A finished run's report has no ``interrupted`` key.
    """
    report = {
        "schema": SCHEMA,
        "command": command,
        "flatcli_version": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": _jsonable(config),
        "environment": _jsonable(environment),
        "results": _jsonable(results),
    }
    if interrupted:
        report["interrupted"] = True
    return report


def environment_info(
    device: torch.device | str, dtype: torch.dtype | str, world_size: int = 1
) -> dict[str, Any]:
    """The ``environment`` block: torch and Python versions, device, dtype and world size."""
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": str(device),
        "dtype": dtype_name(dtype),
        "world_size": world_size,
    }


def write_report(report: dict[str, Any], target: str | Path) -> None:
    """Write ``report`` as JSON to a path (atomically), or to stdout when ``target`` is ``-``."""
    text = json.dumps(report, indent=2, allow_nan=False)
    if str(target) == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    else:
        write_text_atomic(Path(target), text + "\n")


def _jsonable(obj: Any) -> Any:
    """Convert tensors, paths, tuples and non-finite floats into plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "value") and isinstance(obj.value, str):  # str Enums
        return obj.value
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj
