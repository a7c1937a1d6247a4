"""Under ``torchrun`` only rank 0 writes: eigenvectors, reparametrised and trained checkpoints."""

from __future__ import annotations

import pytest
import torch

from tests.cases import TANH_MLP_FACTORY, write_cli_problem
from tests.distributed.launch import run_world
from tests.distributed.writers import write_outputs

RELU_FACTORY = TANH_MLP_FACTORY.replace("nn.Tanh()", "nn.ReLU()")  # layer-scale needs ReLU

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs gloo")


def test_only_rank_0_writes_files(tmp_path):
    ns = write_cli_problem(tmp_path, 12, RELU_FACTORY)
    torch.manual_seed(0)
    torch.save(ns["make"]().double().eval().state_dict(), tmp_path / "m.pt")
    assert run_world(write_outputs, 2, str(tmp_path)) == [0, 0]
    for rank in (0, 1):  # every rank ran every command to the end
        codes = (tmp_path / f"codes-r{rank}").read_text()
        assert codes == "spectrum=0 reparam=0 train=0", (rank, codes)
    assert (tmp_path / "eig-r0" / "m.eigenvectors.safetensors").exists()
    assert (tmp_path / "reparam-r0.safetensors").exists()
    assert (tmp_path / "train-r0.safetensors").exists()
    assert (tmp_path / "train-r0.json").exists()
    assert not (tmp_path / "eig-r1").exists()
    assert not (tmp_path / "reparam-r1.safetensors").exists()
    assert not (tmp_path / "train-r1.safetensors").exists()
    assert not (tmp_path / "train-r1.json").exists()
