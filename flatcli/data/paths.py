"""Dataset names that hold a path (``tensors:PATH``, ``imagefolder:PATH``, ``text:PATH``):
recording and finding.

A checkpoint or a YAML spec that names such a dataset must keep working when its folder is
moved or opened from another working directory. So a checkpoint records the path relative to
its own folder (in the dataset name itself), plus the absolute path and a fingerprint of the
data at the time of writing (:func:`record_dataset`); reading resolves the name against the
checkpoint's (or the YAML's) folder first, then the recorded absolute path, then the working
directory (:func:`resolve_dataset`), preferring a candidate whose fingerprint matches.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["dataset_path", "fingerprint", "record_dataset", "resolve_dataset"]

_KINDS = ("tensors", "imagefolder", "text")
_fingerprints: dict[tuple[str, int, int], str] = {}


def dataset_path(name: Any) -> tuple[str, Path] | None:
    """``(kind, path)`` for a ``tensors:PATH``, ``imagefolder:PATH`` or ``text:PATH`` name, else
    None.

    >>> dataset_path("tensors:data/x.pt")
    ('tensors', PosixPath('data/x.pt'))
    >>> dataset_path("mnist5k") is None
    True
    """
    if not isinstance(name, str):
        return None
    prefix, sep, rest = name.strip().partition(":")
    if not sep or prefix.lower() not in _KINDS or not rest.strip():
        return None
    return prefix.lower(), Path(rest.strip()).expanduser()


def fingerprint(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, or of a folder's listing (relative names and sizes).

    A folder's fingerprint changes when a file is added, removed, renamed or resized; reading
    every image of a large folder on each load would cost more than the check is worth.
    A file's fingerprint is cached per (path, size, modification time) for the life of the
    process.
    """
    h = hashlib.sha256()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                f = Path(root) / name
                h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n".encode())
        return h.hexdigest()
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _fingerprints:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _fingerprints[key] = h.hexdigest()
    return _fingerprints[key]


def record_dataset(name: Any, folder: Path) -> tuple[Any, dict | None]:
    """The dataset name as a file in ``folder`` should record it, and where it was found.

    A path name is rewritten relative to ``folder`` (the checkpoint's), resolving a relative
    path against the working directory, as the user typed it; the second value then records
    ``kind``, ``relative`` (to ``folder``), ``absolute`` and ``sha256`` (:func:`fingerprint`).
    Any other name, or a path that does not exist, comes back unchanged with None.

    >>> record_dataset("mnist5k", Path("."))
    ('mnist5k', None)
    """
    parsed = dataset_path(name)
    if parsed is None:
        return name, None
    kind, path = parsed
    absolute = Path(os.path.abspath(path))
    if not absolute.exists():
        return name, None
    relative = Path(os.path.relpath(absolute, os.path.abspath(folder))).as_posix()
    source = {
        "kind": kind,
        "relative": relative,
        "absolute": str(absolute),
        "sha256": fingerprint(absolute),
    }
    return f"{kind}:{relative}", source


def resolve_dataset(
    name: Any, folders: list[Path], source: dict | None = None, *, what: str = "the checkpoint"
) -> Any:
    """A path name rewritten to an absolute path that exists from here, when one is found.

    Candidates, in order: the path relative to each of ``folders`` (the checkpoint's or the
    YAML's folder first), the absolute path ``source`` recorded, and the path as written
    (relative to the working directory). A candidate whose :func:`fingerprint` matches the
    recorded ``sha256`` wins; else the first that exists (with a warning that the data differ
    from the recorded ones). When none exists the recorded absolute path (else the first
    candidate) is returned, so that the error names where the data were.
    Names without a path come back unchanged.
    """
    parsed = dataset_path(name)
    if parsed is None:
        return name
    kind, path = parsed
    candidates: list[Path] = []
    if path.is_absolute():
        candidates.append(path)
    else:
        candidates.extend(Path(folder) / path for folder in folders)
    if isinstance(source, dict) and isinstance(source.get("absolute"), str):
        candidates.append(Path(source["absolute"]))
    candidates.append(path)
    unique: list[Path] = []
    for c in candidates:
        c = Path(os.path.abspath(c))
        if c not in unique:
            unique.append(c)
    existing = [c for c in unique if c.exists()]
    if not existing:
        recorded = source.get("absolute") if isinstance(source, dict) else None
        fallback = Path(os.path.abspath(recorded)) if isinstance(recorded, str) else unique[0]
        return f"{kind}:{fallback}"
    sha = source.get("sha256") if isinstance(source, dict) else None
    if sha:
        for c in existing:
            if fingerprint(c) == sha:
                return f"{kind}:{c}"
        warnings.warn(
            f"{kind}:{existing[0]} differs from the data {what} recorded (sha256 {sha[:12]}...); "
            "measuring on it anyway",
            UserWarning,
            stacklevel=2,
        )
    return f"{kind}:{existing[0]}"
