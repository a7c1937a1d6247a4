"""``text:PATH``: UTF-8 text for a language model, cut into next-token windows.

The file is tokenised (docs, "Checkpoints, models and datasets") with the checkpoint's tokenizer (a
Hugging Face ``tokenizer.json`` in the checkpoint's folder, read with the ``tokenizers`` package) or
else as its UTF-8 bytes (ids 0-255, a vocabulary of 256). The token stream is cut into consecutive,
non-overlapping windows of T + 1 tokens (``--seq-len T``, default 128), the last incomplete one
dropped; example i is ``x = window[:T]``, ``y = window[1:]``, both int64 (N, T), so the default loss
is ``token-ce``. The last 10 % of the windows (by position, ``max(1, W // 10)`` of W) are the test
split, the others the train split, in stored order.

``python-license`` names a real text every CPython install has offline: the ``LICENSE.txt`` of
the running interpreter's standard library (:func:`python_license_path`).

>>> train, test, vocab, info = windows_of(torch.arange(23), 4, "demo")
>>> tuple(train.x.shape), tuple(test.x.shape), vocab, train.x[1].tolist(), train.y[1].tolist()
((3, 4), (1, 4), 23, [5, 6, 7, 8], [6, 7, 8, 9])
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flatcli.data.splits import Split
from flatcli.errors import DataError, UsageError

__all__ = [
    "DEFAULT_SEQ_LEN",
    "BYTE_VOCAB",
    "TOKENIZER_FILE",
    "PYTHON_LICENSE",
    "is_text_dataset",
    "check_seq_len",
    "python_license_path",
    "read_text",
    "find_tokenizer",
    "tokenize",
    "windows_of",
    "load_text",
    "text_options",
]

DEFAULT_SEQ_LEN = 128
"""T when ``--seq-len`` is not given and the checkpoint records none (docs: the command's page)."""
BYTE_VOCAB = 256
"""Vocabulary of the byte tokenisation: every UTF-8 byte is one token id."""
TOKENIZER_FILE = "tokenizer.json"
"""The Hugging Face tokenizer a checkpoint's folder may hold (``save_pretrained``'s name)."""
PYTHON_LICENSE = "python-license"
"""The dataset name of CPython's own ``LICENSE.txt`` (:func:`python_license_path`)."""


def is_text_dataset(name: Any) -> bool:
    """Whether ``name`` is a text dataset: ``text:PATH`` or ``python-license``.

    >>> [is_text_dataset(n) for n in ("text:corpus.txt", "Python_License", "mnist")]
    [True, True, False]
    """
    if not isinstance(name, str):
        return False
    stripped = name.strip()
    prefix, sep, _ = stripped.partition(":")
    if sep:
        return prefix.lower() == "text"
    return stripped.lower().replace("_", "-") == PYTHON_LICENSE


def check_seq_len(seq_len: Any) -> int:
    """``seq_len`` as an int >= 1; else a UsageError (exit 2) that quotes it."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"--seq-len must be a whole number of tokens >= 1; got {seq_len!r}")
    return seq_len


def python_license_path() -> Path:
    """CPython's ``LICENSE.txt`` as the running interpreter installed it.

    CPython's ``make install`` (python.org, pyenv, conda, uv's builds, Debian's
    ``libpython3.X-stdlib``) puts it in the standard library folder, ``lib/python3.X/``; the
    Windows installer puts it in ``sys.base_prefix``. Both are looked up, in that order.

    Raises:
        DataError: neither exists (an interpreter stripped of it).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = [stdlib / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"{PYTHON_LICENSE}: this Python has no LICENSE.txt (looked in "
        f"{', '.join(str(p) for p in candidates)}); use text:PATH with any UTF-8 file"
    )


def read_text(path: Path, spec: str) -> str:
    """The UTF-8 text of the file at ``path``.

    Raises:
        DataError: no such file, an empty file, or bytes that are not UTF-8 (exit 2).
    """
    if not path.is_file():
        raise DataError(f"{spec}: no such file {path}")
    data = path.read_bytes()
    if not data:
        raise DataError(f"{spec}: {path} is empty; a language model needs text to read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{spec}: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: "
            f"{e.reason}); convert it, e.g. iconv -t UTF-8"
        ) from None


def find_tokenizer(checkpoint: Path) -> Path | None:
    """The ``tokenizer.json`` of a checkpoint: inside it (a Hugging Face directory) or beside it
    (in the folder of a checkpoint file); None when there is none."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    candidate = folder / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def _load_tokenizer(path: Path, spec: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError(
            f"{spec}: {path} is a Hugging Face tokenizer but the 'tokenizers' package is not "
            "installed: pip install tokenizers (or pip install -e '.[hf]')"
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for a malformed file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{spec}: cannot read the tokenizer {path}: {first}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenize(text: str, tokenizer: Path | None, spec: str) -> tuple[Tensor, int, dict[str, Any]]:
    """Token ids (int64, 1-D), the vocabulary size and a record of the tokenizer.

    Without ``tokenizer`` the ids are the text's UTF-8 bytes (vocabulary 256). With one, the
    text is encoded as one stream without special tokens (no BOS/EOS added around it).

    Raises:
        UsageError: a ``tokenizer.json`` but no ``tokenizers`` package (exit 2).
        DataError: an unreadable tokenizer, or one that yields no tokens for the text.
    """
    if tokenizer is None:
        data = text.encode("utf-8")
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        return ids, BYTE_VOCAB, {"kind": "bytes", "vocab_size": BYTE_VOCAB}
    tok = _load_tokenizer(tokenizer, spec)
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)
    vocab = int(tok.get_vocab_size(with_added_tokens=True))
    if ids.numel() and int(ids.max()) >= vocab:  # a tokenizer whose ids exceed its own size
        vocab = int(ids.max()) + 1
    record = {
        "kind": TOKENIZER_FILE,
        "path": str(tokenizer),
        "sha256": _sha256(tokenizer.read_bytes()),
        "vocab_size": vocab,
    }
    return ids, vocab, record


def windows_of(
    ids: Tensor, seq_len: int, spec: str, vocab: int | None = None
) -> tuple[Split, Split, int, dict[str, Any]]:
    """Cut a token stream into next-token examples: (train, test, vocabulary, counts).

    W = len(ids) // (T + 1) consecutive windows; window i is ``ids[i(T+1) : (i+1)(T+1)]``,
    ``x = window[:T]``, ``y = window[1:]``. The last ``max(1, W // 10)`` windows are the test
    split. ``vocab`` defaults to the largest id + 1.

    Raises:
        UsageError: ``seq_len`` < 1.
        DataError: fewer than two windows (one for each split).
    """
    seq_len = check_seq_len(seq_len)
    length = int(ids.numel())
    count = length // (seq_len + 1)
    if count < 2:
        raise DataError(
            f"{spec}: {length} tokens are too few for --seq-len {seq_len}: it takes two windows "
            f"of T + 1 = {seq_len + 1} tokens (one train, one test), {2 * (seq_len + 1)} tokens; "
            f"use a longer text or a --seq-len of at most {max(length // 2 - 1, 0)}"
        )
    blocks = ids[: count * (seq_len + 1)].reshape(count, seq_len + 1)
    x, y = blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()
    n_test = max(1, count // 10)
    n_train = count - n_test
    train = Split(x[:n_train], y[:n_train])
    test = Split(x[n_train:], y[n_train:])
    vocab = int(ids.max()) + 1 if vocab is None else int(vocab)
    counts = {"tokens": length, "windows": count, "train_windows": n_train, "test_windows": n_test}
    return train, test, vocab, counts


def load_text(
    path: Path, spec: str, seq_len: int, tokenizer: Path | None
) -> tuple[Split, Split, int, dict[str, Any]]:
    """The ``text:`` dataset at ``path``: (train, test, vocabulary size, record).

    The record (JSON-ready) names the seq-len, the tokenizer (kind, vocabulary, file and
    sha256), the text's sha256, and the token and window counts; ``flatcli train`` stores it.
    """
    seq_len = check_seq_len(seq_len)
    text = read_text(path, spec)
    ids, vocab, tok = tokenize(text, tokenizer, spec)
    train, test, vocab, counts = windows_of(ids, seq_len, spec, vocab)
    record = {
        "seq_len": seq_len,
        "tokenizer": tok,
        "path": str(path),
        "sha256": _sha256(text.encode("utf-8")),
        **counts,
    }
    return train, test, vocab, record


def text_options(name: Any, record: dict, checkpoint: Path, seq_len: int | None) -> dict[str, Any]:
    """The ``seq_len`` and ``tokenizer`` a checkpoint's text dataset is loaded with ({} for any
    other dataset): what :func:`flatcli.data.load_dataset` takes beside the name.

    ``seq_len``: the one asked for, else the one the checkpoint's record holds (``seq_len``),
    else :data:`DEFAULT_SEQ_LEN`. The tokenizer: the record says which one training used
    (``text.tokenizer``): bytes, or the ``tokenizer.json`` in the checkpoint's folder (which must
    still be there; a changed file is measured with a warning). A checkpoint without such a
    record uses the ``tokenizer.json`` in its folder when there is one, else bytes.

    Raises:
        UsageError: ``seq_len`` given for a dataset that is not text, or < 1.
        DataError: the record names a tokenizer.json that is no longer there.
    """
    if not is_text_dataset(name):
        if seq_len is not None:
            raise UsageError(
                f"--seq-len applies to text datasets (text:PATH, {PYTHON_LICENSE}); "
                f"dataset {name!r} is not one"
            )
        return {}
    recorded_len = record.get("seq_len")
    if seq_len is None:
        seq_len = recorded_len if isinstance(recorded_len, int) else DEFAULT_SEQ_LEN
    seq_len = check_seq_len(seq_len)
    text = record.get("text") if isinstance(record.get("text"), dict) else {}
    recorded = text.get("tokenizer") if isinstance(text.get("tokenizer"), dict) else None
    found = find_tokenizer(checkpoint)
    if recorded is not None and recorded.get("kind") == "bytes":
        return {"seq_len": seq_len, "tokenizer": None}
    if recorded is not None and found is None:
        raise DataError(
            f"{checkpoint.name} was trained on text tokenised with {TOKENIZER_FILE} "
            f"(sha256 {str(recorded.get('sha256'))[:12]}...), which is no longer in its folder; "
            "put it back beside the checkpoint"
        )
    if recorded is not None and found is not None and recorded.get("sha256"):
        if _sha256(found.read_bytes()) != recorded["sha256"]:
            warnings.warn(
                f"{found} differs from the tokenizer {checkpoint.name} was trained with; "
                "tokenising with it anyway",
                UserWarning,
                stacklevel=2,
            )
    return {"seq_len": seq_len, "tokenizer": found}
