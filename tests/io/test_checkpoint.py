"""Checkpoint reading and writing: formats, wrappers, prefixes, safety and error messages."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from flatcli.errors import CheckpointError, UsageError
from flatcli.io.checkpoint import (
    check_finite,
    expand_checkpoints,
    load_checkpoint,
    match_state_dict,
    save_checkpoint,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_safetensors_round_trip_with_spec_meta_and_init(tmp_path):
    m = _model()
    init = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
    path = save_checkpoint(
        tmp_path / "a.safetensors",
        m.state_dict(),
        spec={"arch": "mlp"},
        meta={"dataset": "mnist5k"},
        init_state_dict=init,
    )
    ck = load_checkpoint(path)
    assert ck.spec == {"arch": "mlp"}
    assert ck.meta["dataset"] == "mnist5k" and ck.meta["init_weights"].startswith("inline:")
    assert set(ck.state_dict) == set(m.state_dict())
    assert all(torch.equal(ck.state_dict[k], v) for k, v in m.state_dict().items())
    assert set(ck.init_state_dict) == set(init)
    assert len(ck.sha256) == 64


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state_dict", "net"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_pickle_wrappers_and_prefixes(tmp_path, wrapper, prefix):
    m = _model()
    sd = {prefix + k: v for k, v in m.state_dict().items()}
    obj = sd if wrapper is None else {wrapper: sd, "epoch": 3}
    path = tmp_path / "m.ckpt"
    torch.save(obj, path)
    ck = load_checkpoint(path)
    matched = match_state_dict(_model(), ck.state_dict)
    fresh = _model()
    fresh.load_state_dict(matched)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in m.state_dict().items())


def test_missing_file():
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint("nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    m = _model()
    path = tmp_path / f"t{suffix}"
    if suffix == ".pt":
        torch.save(m.state_dict(), path)
    else:
        save_checkpoint(path, m.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["FLATCLI_TEST_MARKER"],))


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FLATCLI_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _model().state_dict(), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="--unsafe-load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_mismatched_keys_are_listed():
    sd = _model().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["0.bias"]
    with pytest.raises(
        CheckpointError, match=r"missing keys \[0\.bias\].*unexpected keys \[extra\.weight\]"
    ):
        match_state_dict(_model(), sd)


def test_shape_mismatch_is_listed():
    sd = _model().state_dict()
    sd["2.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError, match=r"2\.weight \(5, 3\) vs model \(2, 3\)"):
        match_state_dict(_model(), sd)


def test_nan_weights_named():
    sd = _model().state_dict()
    sd["0.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite weights in \[0\.weight \(1\)\]"):
        check_finite(sd)


def test_directory_expansion_sorted_and_empty(tmp_path):
    for name in ("b.pt", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in expand_checkpoints([tmp_path])] == ["a.safetensors", "b.pt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="holds no checkpoint"):
        expand_checkpoints([empty])


def test_save_refuses_other_suffix(tmp_path):
    with pytest.raises(UsageError, match=".safetensors"):
        save_checkpoint(tmp_path / "x.pt", _model().state_dict())
