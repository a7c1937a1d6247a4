"""Sequences longer than a model's learned positions: a usage error (exit 2) before any forward,
one line naming the model's maximum and the option to change."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flatcli.errors import UsageError
from flatcli.io.checkpoint import save_checkpoint
from flatcli.io.load import load, max_positions
from tests.cli.helpers import invoke

BLOCK = 16


def _gpt_checkpoint(tmp_path):
    """A gpt-tiny checkpoint with 16 positions, recorded on a text file cut into 16 + 1 tokens."""
    from model_zoo import get_model

    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    torch.manual_seed(0)
    model = get_model("gpt-tiny", num_classes=256, input_shape=(BLOCK,))
    spec = {"arch": "gpt-tiny", "kwargs": {"num_classes": 256, "input_shape": [BLOCK]}}
    meta = {"dataset": f"text:{text}", "seq_len": BLOCK, "loss": "token-ce"}
    return save_checkpoint(tmp_path / "lm.safetensors", model.state_dict(), spec, meta)


def test_a_longer_seq_len_than_the_models_positions_is_a_usage_error(tmp_path):
    ckpt = _gpt_checkpoint(tmp_path)
    assert load(ckpt, dtype="float64", seq_len=BLOCK).x.shape[1] == BLOCK
    assert load(ckpt, dtype="float64", seq_len=8).x.shape[1] == 8
    with pytest.raises(UsageError) as info:
        load(ckpt, dtype="float64", seq_len=64)
    assert str(info.value) == (
        f"the model of lm.safetensors takes at most {BLOCK} positions (block_size), but dataset "
        f"text:{tmp_path / 'corpus.txt'} has sequences of 64 tokens: pass --seq-len {BLOCK} or less"
    )


def test_the_command_exits_2_with_one_line(tmp_path):
    ckpt = _gpt_checkpoint(tmp_path)
    res = invoke("spectrum", ckpt, "--seq-len", 64, "--top-k", 1, "--quiet")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "at most 16 positions (block_size)" in lines[0]
    assert "--seq-len 16 or less" in lines[0] and "Traceback" not in res.output


def test_max_positions():
    from model_zoo import get_model

    gpt = get_model("gpt-tiny", num_classes=8, input_shape=(5,))
    assert max_positions(gpt) == (5, "block_size")
    assert max_positions(nn.Sequential(nn.Embedding(10, 4))) is None  # no config

    class Rotary(nn.Module):  # a limit in the config, but no table of positions
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"max_position_embeddings": 7})()
            self.tok = nn.Embedding(50, 4)

    assert max_positions(Rotary()) is None


transformers = pytest.importorskip("transformers")


def _tokens(path, length):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (4, length + 1), generator=g)
    save_file({"x": ids[:, :-1].contiguous(), "y": ids[:, 1:].contiguous()}, str(path))
    return f"tensors:{path}"


def test_a_hugging_face_gpt2_refuses_tokens_past_n_positions(tmp_path):
    from tests.io.test_hf import write_gpt2, write_llama

    gpt2 = write_gpt2(tmp_path / "gpt2")  # n_positions 16
    data = _tokens(tmp_path / "long.safetensors", 20)
    with pytest.raises(UsageError, match=r"takes at most 16 positions \(n_positions\).*store "):
        load(gpt2, dataset=data, dtype="float64")
    # rotary positions (Llama, max_position_embeddings 16) take any length
    run = load(write_llama(tmp_path / "llama"), dataset=data, dtype="float64")
    assert run.x.shape == (4, 20) and run.x.dtype == torch.int64
