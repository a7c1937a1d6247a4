"""``text:PATH`` and ``python-license`` (CONTRACTS.md, Datasets): windows, split, byte ids, the
checkpoint's tokenizer, and the errors that stop bad input before any work."""

from __future__ import annotations

import doctest
import importlib.util
from pathlib import Path

import pytest
import torch

import flatcli.data.text
from flatcli.data import load_dataset
from flatcli.data.text import (
    PYTHON_LICENSE,
    find_tokenizer,
    python_license_path,
    text_options,
    windows_of,
)
from flatcli.errors import DataError, UsageError

needs_tokenizers = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None, reason="needs the tokenizers package"
)


def _write(tmp_path: Path, text: str | bytes, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _expected_windows(ids: list[int], t: int) -> tuple[list, list]:
    """The contract's windows, written out with plain lists: (xs, ys)."""
    count = len(ids) // (t + 1)
    windows = [ids[i * (t + 1) : (i + 1) * (t + 1)] for i in range(count)]
    return [w[:t] for w in windows], [w[1:] for w in windows]


@pytest.mark.parametrize(("length", "t"), [(23, 4), (100, 8), (41, 3), (22, 10)])
def test_windows_split_and_byte_ids(tmp_path, length, t):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(length))
    ds = load_dataset(f"text:{_write(tmp_path, text)}", seq_len=t)
    xs, ys = _expected_windows(list(text.encode()), t)
    count = len(xs)
    n_test = max(1, count // 10)
    assert ds.train.x.tolist() == xs[: count - n_test]
    assert ds.train.y.tolist() == ys[: count - n_test]
    assert ds.test.x.tolist() == xs[count - n_test :]
    assert ds.test.y.tolist() == ys[count - n_test :]
    assert ds.train.x.dtype == ds.train.y.dtype == torch.int64
    assert ds.num_classes == 256 and ds.input_shape == (t,) and ds.normalization is None
    # y is x shifted by one token: each target is the next input
    assert torch.equal(ds.train.x[:, 1:], ds.train.y[:, :-1])
    assert ds.text["windows"] == count and ds.text["tokens"] == length
    assert ds.text["tokenizer"] == {"kind": "bytes", "vocab_size": 256}


def test_test_split_is_the_last_tenth_of_the_windows():
    train, test, vocab, counts = windows_of(torch.arange(5 * 95), 4, "t")  # 95 windows of 5
    assert (len(train), len(test)) == (86, 9)  # 95 // 10 = 9 test windows, by position
    assert int(test.x[0, 0]) == 86 * 5 and vocab == 475
    assert counts == {"tokens": 475, "windows": 95, "train_windows": 86, "test_windows": 9}
    train, test, _, _ = windows_of(torch.arange(10), 4, "t")  # 2 windows: one each
    assert (len(train), len(test)) == (1, 1)


def test_utf8_multibyte_characters_are_several_byte_tokens(tmp_path):
    text = "héllo wörld ✓ " * 4
    ds = load_dataset(f"text:{_write(tmp_path, text)}", seq_len=7)
    stream = torch.cat([ds.train.x.reshape(-1, 7), ds.test.x.reshape(-1, 7)])
    raw = list(text.encode("utf-8"))
    assert stream[0].tolist() == raw[:7]
    assert int(ds.train.x.max()) > 127  # a byte of a multi-byte character


def test_default_seq_len_is_128(tmp_path):
    ds = load_dataset(f"text:{_write(tmp_path, 'x' * 600)}")
    assert ds.input_shape == (128,) and len(ds.train) + len(ds.test) == 600 // 129


def _word_tokenizer(path: Path, corpus: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(path))


@needs_tokenizers
def test_tokenizer_json_tokenises_the_text(tmp_path):
    corpus = "the cat sat on the mat and the dog sat on the log " * 6
    tok_path = tmp_path / "tokenizer.json"
    _word_tokenizer(tok_path, corpus)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok_path)).encode(corpus, add_special_tokens=False).ids
    assert len(ids) == 13 * 6  # one token per word, no special tokens around the stream
    ds = load_dataset(f"text:{_write(tmp_path, corpus)}", seq_len=5, tokenizer=tok_path)
    xs, ys = _expected_windows(ids, 5)
    assert ds.train.x.tolist() + ds.test.x.tolist() == xs
    assert ds.train.y.tolist() + ds.test.y.tolist() == ys
    vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
    assert ds.num_classes == vocab == 9  # 8 words and [UNK]
    assert ds.text["tokenizer"]["kind"] == "tokenizer.json"
    assert ds.text["tokenizer"]["vocab_size"] == vocab


@needs_tokenizers
def test_the_checkpoints_tokenizer_is_found_beside_or_inside_it(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    assert find_tokenizer(ckpt) is None
    assert text_options("text:a.txt", {}, ckpt, None) == {"seq_len": 128, "tokenizer": None}
    _word_tokenizer(tmp_path / "tokenizer.json", "a b c")
    assert find_tokenizer(ckpt) == tmp_path / "tokenizer.json"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    assert find_tokenizer(hf_dir) is None
    _word_tokenizer(hf_dir / "tokenizer.json", "a b c")
    assert find_tokenizer(hf_dir) == hf_dir / "tokenizer.json"
    # the recorded seq-len and tokenizer win over the defaults; an explicit seq-len over both
    record = {"seq_len": 16, "text": {"tokenizer": {"kind": "bytes", "vocab_size": 256}}}
    assert text_options("text:a.txt", record, ckpt, None) == {"seq_len": 16, "tokenizer": None}
    assert text_options("text:a.txt", record, ckpt, 8)["seq_len"] == 8
    assert text_options("mnist5k", record, ckpt, None) == {}
    with pytest.raises(UsageError, match="--seq-len applies to text datasets"):
        text_options("mnist5k", {}, ckpt, 8)
    trained = {"seq_len": 4, "text": {"tokenizer": {"kind": "tokenizer.json", "sha256": "0"}}}
    with pytest.warns(UserWarning, match="differs from the tokenizer"):
        assert text_options("text:a.txt", trained, ckpt, None)["tokenizer"] == find_tokenizer(ckpt)
    with pytest.raises(DataError, match="no longer in its folder"):
        text_options("text:a.txt", trained, tmp_path / "elsewhere" / "m.safetensors", None)


@needs_tokenizers
def test_tokenizer_json_without_the_tokenizers_package_is_exit_2(tmp_path, monkeypatch):
    import sys

    _word_tokenizer(tmp_path / "tokenizer.json", "a b c")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(UsageError, match="'tokenizers' package is not installed") as info:
        load_dataset(
            f"text:{_write(tmp_path, 'a b c ' * 20)}",
            seq_len=2,
            tokenizer=tmp_path / "tokenizer.json",
        )
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "seq_len", "match"),
    [
        (b"", 4, "is empty"),
        (b"abcdefghi", 4, "too few for --seq-len 4"),  # 9 bytes: one window of 5, not two
        (b"caf\xe9 au lait" * 3, 4, r"not UTF-8 text \(byte 0xe9 at offset 3"),
    ],
)
def test_bad_text_is_a_one_line_usage_error(tmp_path, content, seq_len, match):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(f"text:{_write(tmp_path, content)}", seq_len=seq_len)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_seq_len_below_one_is_refused(tmp_path, bad):
    with pytest.raises(UsageError, match="--seq-len must be a whole number of tokens >= 1"):
        load_dataset(f"text:{_write(tmp_path, 'abc' * 50)}", seq_len=bad)


def test_missing_file_and_seq_len_on_other_datasets(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"text:{tmp_path / 'none.txt'}")
    with pytest.raises(UsageError, match="needs a path"):
        load_dataset("text:")
    with pytest.raises(UsageError, match="apply to text datasets"):
        load_dataset("mnist5k", seq_len=8)
    with pytest.raises(UsageError, match="never normalised"):
        load_dataset(f"text:{_write(tmp_path, 'abc' * 50)}", normalization={"mean": [0]})


def test_python_license_is_cpythons_license_text():
    path = python_license_path()
    assert path.is_file() and path.name == "LICENSE.txt"
    text = path.read_text(encoding="utf-8")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text
    ds = load_dataset(PYTHON_LICENSE, seq_len=32)
    assert ds.name == PYTHON_LICENSE and ds.num_classes == 256
    count = len(text.encode()) // 33
    assert len(ds.train) + len(ds.test) == count and len(ds.test) == count // 10
    assert ds.train.x[0].tolist() == list(text.encode()[:32])
    assert load_dataset("Python_License", seq_len=32).train.x.shape == ds.train.x.shape


def test_module_docstring_examples():
    result = doctest.testmod(flatcli.data.text)
    assert result.attempted > 0 and result.failed == 0
