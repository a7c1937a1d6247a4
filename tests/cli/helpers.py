"""What the CLI tests share: running a command on a :func:`tests.cases.write_cli_problem` folder."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from flatcli.cli.app import app


def invoke(*args: object) -> Result:
    """``flatcli ARGS`` in this process, each argument passed as ``str``."""
    return CliRunner().invoke(app, [str(a) for a in args])


def invoke_on_problem(
    command: str, folder: Path, *args: object, ckpt: str = "m.pt", factory: str = "make"
) -> Result:
    """``flatcli COMMAND folder/ckpt ARGS`` in float64 on ``nets.py:factory`` and the folder's data.

    ``folder`` is one written by :func:`tests.cases.write_cli_problem`.
    """
    model = ["--model", f"{folder}/nets.py:{factory}"]
    data = ["--dataset", f"tensors:{folder}/data.safetensors"]
    return invoke(command, folder / ckpt, *model, *data, "--dtype", "float64", *args)


def report_of(
    command: str, folder: Path, out: Path, *args: object, exit_code: int = 0, **kwargs: str
) -> tuple[Result, dict]:
    """:func:`invoke_on_problem` with ``--json out``: the result, once its exit code is
    ``exit_code``, and the JSON report it wrote."""
    res = invoke_on_problem(command, folder, *args, "--json", out, **kwargs)
    assert res.exit_code == exit_code, res.output
    return res, json.loads(out.read_text())
