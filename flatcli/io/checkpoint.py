"""Reading and writing checkpoints: safetensors with flatcli metadata, PyTorch pickles read safely.

Formats read (README "Checkpoints and model specs"): ``.safetensors`` (spec under
``flatcli.spec``, record under ``flatcli.meta``), ``.pt/.pth/.bin/.ckpt`` through
``torch.load(weights_only=True)``, state dicts wrapped under ``state_dict``/``model``/
``model_state_dict``/``net``, ``module.``/``model.`` prefixes stripped when that makes the keys
match.

A dataset the record names by path (``tensors:PATH``, ``imagefolder:PATH``) is written relative
to the checkpoint's folder, with its absolute path and fingerprint under ``dataset_source``, and
read back as an absolute path that exists from the working directory (see
:mod:`flatcli.data.paths`), so that a folder of checkpoints can be moved or opened from anywhere.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from flatcli.errors import CheckpointError, UsageError
from flatcli.errors import listing as _listing
from flatcli.io.atomic import atomic_path
from flatcli.io.digest import file_sha256

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
SPEC_KEY = "flatcli.spec"
META_KEY = "flatcli.meta"
INIT_PREFIX = "flatcli.init."
"""Initial weights are stored in the same safetensors file under this key prefix."""
DATASET_SOURCE_KEY = "dataset_source"
"""Record key: where a dataset named by path was when the checkpoint was written."""

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class Checkpoint:
    """A checkpoint file's contents: weights, and flatcli's spec and record when present.

    A ``dataset`` of ``spec`` or ``meta`` that names a path is absolute, resolved against the
    checkpoint's folder first (see :func:`flatcli.data.paths.resolve_dataset`).
    """

    path: Path
    state_dict: dict[str, Tensor]
    spec: dict | None = None
    meta: dict | None = None
    init_state_dict: dict[str, Tensor] | None = None
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def expand_checkpoints(paths: list[Path]) -> list[Path]:
    """Expand arguments: a file stays, a directory stands for its checkpoint files sorted by name,
    except a directory holding ``config.json``, which is one Hugging Face checkpoint
    (:mod:`flatcli.io.hf`) and stays.

    Raises:
        UsageError: a directory holds no checkpoint file; a Hugging Face directory has no
            weights, or ``transformers`` is not installed (the message names the extra).
    """
    from flatcli.io import hf

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if hf.is_hf_directory(p):
            hf.check_directory(p)
            out.append(p)
        elif p.is_dir():
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
        from flatcli.io.hf import is_hf_directory

        hint = (
            " (a Hugging Face directory: only the checkpoint arguments of the analysis commands "
            "and flatcli.load take one)"
            if is_hf_directory(path)
            else ""
        )
        raise CheckpointError(f"{path} is a directory, not a checkpoint file{hint}")
    if path.suffix.lower() == ".safetensors":
        ckpt = _load_safetensors(path)
    else:
        ckpt = _load_pickle(path, unsafe=unsafe)
    ckpt.sha256 = file_sha256(path)
    _resolve_datasets(ckpt)
    return ckpt


def _resolve_datasets(ckpt: Checkpoint) -> None:
    """Rewrite path-named datasets of the spec and record to paths that exist from here."""
    from flatcli.data.paths import resolve_dataset

    folders = [ckpt.path.parent]
    what = ckpt.path.name
    meta = ckpt.meta if isinstance(ckpt.meta, dict) else None
    recorded = meta.get("dataset") if meta else None
    source = meta.get(DATASET_SOURCE_KEY) if meta else None
    if meta and recorded is not None:
        meta["dataset"] = resolve_dataset(recorded, folders, source, what=what)
    if isinstance(ckpt.spec, dict) and ckpt.spec.get("dataset") is not None:
        same = ckpt.spec["dataset"] == recorded
        ckpt.spec["dataset"] = resolve_dataset(
            ckpt.spec["dataset"], folders, source if same else None, what=what
        )


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
        if unsafe or not _is_valid_pickle(path):
            raise CheckpointError(
                f"cannot read {path}: it is not a valid PyTorch pickle; the file is truncated "
                "or corrupt"
            ) from e
        refused = _refused_global(e)
        raise CheckpointError(
            f"{path} holds Python objects{refused} that safe loading (weights_only=True) "
            "refuses; if you trust the file, pass --unsafe-load (it runs code from the file)"
        ) from e
    except Exception as e:  # noqa: BLE001 - a broken file raises anything from deep inside
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


def _is_valid_pickle(path: Path) -> bool:
    """Whether ``path`` holds a well-formed pickle (read as opcodes only: nothing is executed).

    A zip archive (``torch.save``'s format) must hold a ``data.pkl`` member whose opcodes parse
    up to STOP; a legacy (pre-zip) file must start with one such pickle.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith("/data.pkl")]
                members = members or [n for n in archive.namelist() if n == "data.pkl"]
                if len(members) != 1:
                    return False
                stream = io.BytesIO(archive.read(members[0]))
        else:
            stream = io.BytesIO(path.read_bytes())
        ops = [op.name for op, _, _ in pickletools.genops(stream)]
    except Exception:  # noqa: BLE001 - any failure to parse means "not a pickle"
        return False
    return bool(ops) and ops[-1] == "STOP"


def _refused_global(error: BaseException) -> str:
    """`` (e.g. mod.Name)`` for the class torch's weights-only unpickler refused, if it says."""
    for line in str(error).splitlines():
        marker = "Unsupported global: GLOBAL "
        if marker in line:
            name = line.split(marker, 1)[1].split()[0].strip(" .,;:")
            return f" (e.g. {name})"
    return ""


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
    key prefix ``flatcli.init.``; the record says so under ``init_weights``. A ``dataset``
    named by path (in ``spec`` or ``meta``, relative to the working directory or absolute) is
    recorded relative to the checkpoint's folder, and ``meta`` gains ``dataset_source``
    (relative and absolute path, fingerprint; :func:`flatcli.data.paths.record_dataset`).
    The file is written atomically (:func:`flatcli.io.atomic.atomic_path`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"flatcli writes .safetensors checkpoints; got output path {path}")
    from flatcli.data.paths import record_dataset

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = dict(meta or {})
    if meta.get("dataset") is not None:
        meta["dataset"], source = record_dataset(meta["dataset"], path.parent)
        if source is not None:
            meta[DATASET_SOURCE_KEY] = source
    if spec is not None and spec.get("dataset") is not None:
        spec = {**spec, "dataset": record_dataset(spec["dataset"], path.parent)[0]}
    if init_state_dict is not None:
        for k, v in init_state_dict.items():
            tensors[INIT_PREFIX + k] = v.detach().to("cpu").contiguous().clone()
        meta["init_weights"] = f"inline:{INIT_PREFIX}"
    metadata = {META_KEY: json.dumps(meta)}
    if spec is not None:
        metadata[SPEC_KEY] = json.dumps(spec)
    with atomic_path(path) as tmp:  # an interrupted save leaves no half-written checkpoint
        save_file(tensors, str(tmp), metadata=metadata)
    return path
