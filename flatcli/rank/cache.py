"""A resumable on-disk cache of measure results, one JSON file per (checkpoint, measure, data).

An entry is keyed by the checkpoint file's SHA-256, the measure's name and its whole config,
and a fingerprint of the examples it was computed on (their SHA-256, plus dtype, device type
and flatcli version), so a changed file, option or dataset is a miss, never a stale hit. Every
write goes to a temporary file in the same folder that is then renamed over the entry
(:func:`flatcli.io.atomic.write_text_atomic`): an interrupted run leaves whole entries or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatcli._version import __version__
from flatcli.configs.rank import default_cache_dir
from flatcli.dtypes import dtype_name
from flatcli.io.atomic import write_text_atomic

__all__ = ["default_cache_dir", "config_dict", "data_fingerprint", "ResultCache"]


def config_dict(config: Any) -> dict[str, Any]:
    """A measure config as a JSON-ready dict (its ``to_dict()``, else its dataclass fields)."""
    from flatcli.io.report import _jsonable

    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return _jsonable(config.to_dict())
    if dataclasses.is_dataclass(config):
        return _jsonable(dataclasses.asdict(config))
    return _jsonable(dict(config))


def data_fingerprint(x: Tensor, y: Tensor, split: str) -> str:
    """SHA-256 of the examples (values, shapes, dtypes) and the split's name."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    h.update(split.encode())
    return h.hexdigest()


def _key_hash(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    """Measure results on disk under ``root`` (``None``: a cache that stores nothing).

    ``hits`` and ``misses`` count lookups since construction.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(
        sha256: str, measure: str, config: Any, fingerprint: str, device: str, dtype: str
    ) -> dict[str, Any]:
        """The full key of one entry (stored inside it and compared on every read)."""
        return {
            "sha256": sha256,
            "measure": measure,
            "config": config_dict(config),
            "data": fingerprint,
            "device": str(device).split(":")[0],
            "dtype": dtype_name(dtype),
            "flatcli_version": __version__,
        }

    def _path(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        sha = key["sha256"]
        return self.root / sha[:2] / sha / f"{key['measure']}-{_key_hash(key)[:24]}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The stored ``{"metrics", "details", "seconds"}`` for ``key``, or None (a miss).

        An unreadable or foreign entry (another key under the same name) is a miss.
        """
        if self.root is None:
            self.misses += 1
            return None
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            self.misses += 1
            return None
        self.hits += 1
        return entry["value"]

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        """Store ``value`` (JSON-ready) for ``key``, atomically."""
        if self.root is None:
            return
        text = json.dumps({"key": key, "value": value}, allow_nan=False)  # keeps the value's order
        write_text_atomic(self._path(key), text)
