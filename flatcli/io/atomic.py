"""Atomic file writes: a file is written beside its target and renamed over it when whole.

A reader (or a run that is interrupted and resumed) sees the old file or the new one, never
half of one: the rename (``os.replace``) is atomic on POSIX and Windows. The new file gets the
permissions of the file it replaces, else those a plain ``open`` would give it (the umask's).

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp())
>>> write_text_atomic(folder / "a" / "report.json", "{}\\n")
>>> (folder / "a" / "report.json").read_text(), sorted(p.name for p in (folder / "a").iterdir())
('{}\\n', ['report.json'])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed over ``path`` at its end.

    The folder is created when missing. If the block raises (Ctrl-C included), the temporary
    file is removed and ``path`` stays as it was.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "weights.bin"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_bytes(b"abc")
    >>> target.read_bytes()
    b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half."""
    with atomic_path(path) as tmp:
        with tmp.open("w") as f:
            f.write(text)
