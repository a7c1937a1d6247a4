"""``pacbayes`` under ``torchrun``: the Monte-Carlo weight samples are split across the processes
and the certificate equals the one-process run."""

from __future__ import annotations

import torch

from tests.distributed.launch import result_path, run_world
from tests.distributed.pacbayes_workers import mc_errors
from tests.distributed.test_torchrun import (
    assert_same_report,
    launch,
    one_and_two,
    pytestmark,  # noqa: F401 - needs torchrun
)
from tests.pacbayes.problem import write_problem

FAST = ["--epochs", "2", "--lr", "0.01", "--opt-batch-size", "80", "--device", "cpu"]
FAST += ["--mc-samples", "7", "--dtype", "float64"]  # 7 samples: shards of 4 and 3


def test_mc_errors_split_over_ranks_equal_one_process(tmp_path):
    mc_errors(0, 1, str(tmp_path))  # one process (no process group)
    ref = torch.load(result_path(tmp_path, "mc", 1, 0))
    assert ref["collectives"] == 0 and float(ref["errors"].std()) > 0
    for world in (2, 3):  # shards 4+3 and 3+2+2 of the 7 samples
        assert run_world(mc_errors, world, str(tmp_path)) == [0] * world
        for rank in range(world):
            got = torch.load(result_path(tmp_path, "mc", world, rank))
            assert got["collectives"] == 1  # one all-reduce joins the shards
            torch.testing.assert_close(got["errors"], ref["errors"], rtol=0, atol=0)


def test_pacbayes_under_torchrun_equals_one_process(tmp_path):
    paths = write_problem(tmp_path, steps=100)

    def run(nproc: int, out):
        return launch(nproc, "pacbayes", str(paths["trained"]), *FAST, "--json", str(out), "-q")

    _, _, a, b = one_and_two(run, tmp_path, "p")
    assert b["environment"]["world_size"] == 2
    ma, mb = a["results"][0]["metrics"], b["results"][0]["metrics"]
    assert ma["mc_samples"] == 7 and 0 < ma["bound"] <= 1
    assert abs(ma["bound"] - mb["bound"]) <= 1e-10
    assert ma["snn_train_error"] == mb["snn_train_error"]
    assert_same_report(a, b, skip=lambda key: key.endswith("seconds"))
