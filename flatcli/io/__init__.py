"""Reading and writing what flatcli works on: checkpoints, model specs, loaded runs, reports.

- :func:`load` (also ``flatcli.load``): checkpoint + spec + dataset -> a :class:`Run` (model
  in eval mode and examples on the device), what every analysis command measures.
- :func:`load_checkpoint` / :func:`save_checkpoint`: weights with flatcli's spec and record.
- :class:`ModelSpec`, :func:`parse_model_option`, :func:`build_model`: how a model is built.
- :func:`build_report`, :func:`result_entry`, :func:`write_report`: JSON reports
  (schema ``flatcli/report-v1``).
"""

from __future__ import annotations

from flatcli.io.checkpoint import Checkpoint, expand_checkpoints, load_checkpoint, save_checkpoint
from flatcli.io.load import DatasetCache, Run, load, resolve_device, resolve_dtype
from flatcli.io.report import SCHEMA, build_report, environment_info, result_entry, write_report
from flatcli.io.spec import ModelSpec, build_model, parse_model_option, resolve_spec

__all__ = [
    # loading for measuring
    "load",
    "Run",
    "DatasetCache",
    "resolve_device",
    "resolve_dtype",
    # checkpoints
    "Checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "expand_checkpoints",
    # model specs
    "ModelSpec",
    "parse_model_option",
    "resolve_spec",
    "build_model",
    # reports
    "SCHEMA",
    "build_report",
    "result_entry",
    "environment_info",
    "write_report",
]
