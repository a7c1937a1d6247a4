"""``flatcli COMMAND --help`` answers without importing torch (issue #21: under 2 s each).

Each command builds its signature from the option dataclasses of :mod:`flatcli.configs` and
imports the library inside the command function, so asking for its help loads neither torch nor
numpy nor scipy. Checked in a fresh interpreter per command, not timed
(``benchmarks/bench_cli_startup.py`` measures the seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flatcli.cli.app import COMMANDS

HEAVY = ("torch", "numpy", "scipy")

HELP = """
import json, sys
from flatcli.cli.app import app
try:
    app([sys.argv[1], "--help"], prog_name="flatcli")
    code = 0
except SystemExit as e:
    code = e.code
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_imports_no_torch(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HELP, command, json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stderr
    *help_text, last = done.stdout.strip().splitlines()
    assert json.loads(last) == {"code": 0, "heavy": []}, done.stderr
    assert any(f"flatcli {command}" in line for line in help_text)  # the usage line
