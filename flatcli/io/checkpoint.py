"""Reading and writing checkpoints: safetensors with flatcli metadata, PyTorch pickles read safely.

CONTRACTS.md "Checkpoint files": ``.safetensors`` (spec under ``flatcli.spec``, record under
``flatcli.meta``), ``.pt/.pth/.bin/.ckpt`` through ``torch.load(weights_only=True)``, state dicts
wrapped under ``state_dict``/``model``/``model_state_dict``/``net``, ``module.``/``model.`` prefixes
stripped when that makes the keys match.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from flatcli.errors import CheckpointError, UsageError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SPEC_KEY = "flatcli.spec"
META_KEY = "flatcli.meta"
INIT_PREFIX = "flatcli.init."
"""Initial weights are stored in the same safetensors file under this key prefix."""

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class Checkpoint:
    """A checkpoint file's contents: weights, and flatcli's spec and record when present."""

    path: Path
    state_dict: dict[str, Tensor]
    spec: dict | None = None
    meta: dict | None = None
    init_state_dict: dict[str, Tensor] | None = None
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expand_checkpoints(paths: list[Path]) -> list[Path]:
    """Expand arguments: a file stays, a directory stands for its checkpoint files sorted by name.

    Raises:
        UsageError: a directory holds no checkpoint file.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(
                q for q in p.iterdir() if q.is_file() and q.suffix.lower() in CHECKPOINT_SUFFIXES
            )
            if not files:
                raise UsageError(
                    f"directory {p} holds no checkpoint file "
                    f"(looked for {', '.join(CHECKPOINT_SUFFIXES)})"
                )
            out.extend(files)
        else:
            out.append(p)
    return out


def load_checkpoint(path: str | Path, *, unsafe: bool = False) -> Checkpoint:
    """Read a checkpoint file into a :class:`Checkpoint` (weights on the CPU).

    Args:
        path: a ``.safetensors``, ``.pt``, ``.pth``, ``.bin`` or ``.ckpt`` file.
        unsafe: unpickle arbitrary objects (``torch.load(weights_only=False)``). Runs code from
            the file: only for files the user trusts.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or one that needs ``--unsafe-load``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.suffix.lower() == ".safetensors":
        ckpt = _load_safetensors(path)
    else:
        ckpt = _load_pickle(path, unsafe=unsafe)
    ckpt.sha256 = file_sha256(path)
    return ckpt


def _load_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(
            f"cannot read {path} as safetensors ({_first_line(e)}); "
            "the file is truncated or not a safetensors file"
        ) from e
    spec = _json_field(metadata, SPEC_KEY, path)
    meta = _json_field(metadata, META_KEY, path)
    init = {k[len(INIT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(INIT_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(INIT_PREFIX)}
    return Checkpoint(path, weights, spec, meta, init or None)


def _json_field(metadata: dict, key: str, path: Path) -> dict | None:
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"metadata '{key}' of {path} is not valid JSON ({e})") from e
    return value


def _load_pickle(path: Path, *, unsafe: bool) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        if unsafe:
            raise CheckpointError(f"cannot unpickle {path}: {_first_line(e)}") from e
        raise CheckpointError(
            f"{path} holds Python objects that safe loading (weights_only=True) refuses; "
            "if you trust the file, pass --unsafe-load (it runs code from the file)"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path} ({_first_line(e)}); the file is truncated or corrupt"
        ) from e
    extra: dict = {}
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, dict) and _is_state_dict(inner):
                extra = {k: v for k, v in obj.items() if k != key}
                obj = inner
                break
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds no state dict (found {keys}); expected tensors, or a dict with one of "
            f"{', '.join(_WRAPPER_KEYS)}"
        )
    weights = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    spec = extra.get(SPEC_KEY) if isinstance(extra.get(SPEC_KEY), dict) else None
    meta = extra.get(META_KEY) if isinstance(extra.get(META_KEY), dict) else None
    return Checkpoint(path, weights, spec, meta, extra={k: v for k, v in extra.items()})


def _is_state_dict(d: dict) -> bool:
    tensors = [v for v in d.values() if isinstance(v, Tensor)]
    return bool(tensors) and all(isinstance(k, str) for k in d) and len(tensors) >= len(d) / 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def match_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Return ``state_dict`` with wrapper prefixes stripped so its keys match ``model``'s.

    Prefixes ``module.`` (DDP), ``model.`` (Lightning) and ``_orig_mod.`` (torch.compile) are
    stripped only when stripping makes the keys match. Then missing or unexpected keys and shape
    mismatches raise an error that lists them.

    Raises:
        CheckpointError: the weights do not fit the model.
    """
    expected = model.state_dict()
    candidates = [state_dict]
    sd = state_dict
    for _ in range(2):  # e.g. "model.module." nests two wrappers
        for prefix in _PREFIXES:
            if any(k.startswith(prefix) for k in sd):
                sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
                candidates.append(sd)
    best = max(candidates, key=lambda c: len(set(c) & set(expected)))
    missing = sorted(set(expected) - set(best))
    unexpected = sorted(set(best) - set(expected))
    shapes = [
        f"{k} {tuple(best[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(best) & set(expected))
        if best[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_listing(shapes)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match the model spec: {'; '.join(problems)}; "
            "check --model (or the spec beside the checkpoint)"
        )
    return best


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def check_finite(state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the tensors that hold NaN or infinite values."""
    bad = [
        f"{k} ({int((~torch.isfinite(v)).sum())})"
        for k, v in state_dict.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointError(
            f"{source} has non-finite weights in {_listing(bad)}: the training diverged or the "
            "file is damaged; nothing can be measured on it"
        )


def save_checkpoint(
    path: str | Path,
    state_dict: dict[str, Tensor],
    spec: dict | None = None,
    meta: dict | None = None,
    init_state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write a ``.safetensors`` checkpoint with flatcli's spec and record in its metadata.

    Initial weights (for a PAC-Bayes prior centred on them) go into the same file under the
    key prefix ``flatcli.init.``; the record says so under ``init_weights``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"flatcli writes .safetensors checkpoints; got output path {path}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta or {})
    if init_state_dict is not None:
        for k, v in init_state_dict.items():
            tensors[INIT_PREFIX + k] = v.detach().to("cpu").contiguous().clone()
        meta["init_weights"] = f"inline:{INIT_PREFIX}"
    metadata = {META_KEY: json.dumps(meta)}
    if spec is not None:
        metadata[SPEC_KEY] = json.dumps(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
