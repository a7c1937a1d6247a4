"""Output paths checked before any work: a report or checkpoint that cannot be written is a
usage error (exit 2) up front, not after minutes of measuring or training."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flatcli.errors import UsageError

__all__ = ["check_writable"]


def check_writable(target: str | Path, option: str = "--json") -> None:
    """Fail early (exit 2, naming ``option`` and the path) when ``target`` cannot be written.

    Creates the missing parent folders, as writing the file later would.
    """
    if str(target) == "-":
        return
    path = Path(target)
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(f"{option} {target}: cannot write there ({reason})") from e
