"""The output sink: NO_COLOR and non-terminals turn off colour and bars; bars show the time left;
tables go to stdout unless stdout carries the JSON; the error map gives one line and a code."""

from __future__ import annotations

import io
import json
import sys

import pytest
from rich.progress import TimeRemainingColumn

from flatcli.cli import errors, output
from flatcli.errors import CheckpointError, UsageError


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch):
    """stdout and stderr that say they are terminals (set in the test: pytest's capture
    replaces sys.stdout again between a fixture's setup and the test)."""
    out, err = _TTY(), _TTY()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return out, err


def test_bars_on_a_terminal_show_the_time_left(monkeypatch):
    _, err = _terminal(monkeypatch)
    with output.progress_bar(True) as bar:
        assert bar is not None
        assert any(isinstance(c, TimeRemainingColumn) for c in bar.columns)
        assert bar.console.file is err
    with output.progress_bar(False) as bar:  # --quiet
        assert bar is None


def test_no_color_turns_off_bars_and_colour(monkeypatch):
    _terminal(monkeypatch)
    assert not output.console().no_color
    monkeypatch.setenv("NO_COLOR", "1")
    with output.progress_bar(True) as bar:
        assert bar is None
    assert output.console().no_color and output.console(stderr=True).no_color
    monkeypatch.setenv("NO_COLOR", "")  # set but empty: no effect (no-color.org)
    assert output.bars_enabled()


def test_no_bars_off_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("NO_COLOR", raising=False)
    with output.progress_bar(True) as bar:
        assert bar is None


def test_table_goes_to_stderr_when_stdout_carries_json(monkeypatch, tmp_path):
    out, err = _terminal(monkeypatch)
    sink = output.Output("-")
    sink.table("t", [("a", "A")], [{"a": 1.5}])
    sink.report({"x": 1})
    assert "1.5" in err.getvalue() and json.loads(out.getvalue()) == {"x": 1}
    sink.report({"x": 2}, partial=True)  # partial reports never go to stdout
    assert json.loads(out.getvalue()) == {"x": 1}
    quiet = output.Output(str(tmp_path / "r.json"), quiet=True)
    quiet.table("t", [("a", "A")], [{"a": 2.5}])
    quiet.message("hello")
    quiet.report({"y": 1}, partial=True)
    assert "2.5" not in out.getvalue() + err.getvalue() and "hello" not in err.getvalue()
    assert json.loads((tmp_path / "r.json").read_text()) == {"y": 1}


def test_check_writable_creates_parents_and_names_the_option(tmp_path):
    output.check_writable(tmp_path / "new" / "dir" / "r.json")
    assert (tmp_path / "new" / "dir").is_dir()
    assert not (tmp_path / "new" / "dir" / "r.json").exists()
    output.check_writable("-")
    with pytest.raises(UsageError, match=r"^-o .*: cannot write there"):
        output.check_writable(tmp_path, option="-o")


@pytest.mark.parametrize(
    "error, code, text",
    [
        (UsageError("bad --split"), 2, "bad --split"),
        (CheckpointError("checkpoint not found: a.pt"), 1, "checkpoint not found"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("CUDA out of memory. Tried"), 1, "lower --batch-size"),
        (ValueError("boom\nmore"), 1, "ValueError: boom (run with --debug"),
    ],
)
def test_one_error_map(error, code, text, capsys):
    assert errors.exit_code_of(error) == code and text in errors.describe(error)
    import typer

    with pytest.raises(typer.Exit) as e:
        with errors.handle_errors():
            raise error
    assert e.value.exit_code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and text in err and len(err.strip().splitlines()) == 1
