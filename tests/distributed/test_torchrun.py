"""``torchrun --standalone --nproc-per-node 2 -m flatcli ...`` equals the one-process run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.cases import write_cli_problem

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)
pytestmark = pytest.mark.skipif(
    TORCHRUN is None or not torch.distributed.is_available(), reason="needs torchrun"
)

# one rank fails to build the model (a checkpoint that is bad on one rank only)
FLAKY_FACTORY = """
import os
from torch import nn
def make():
    if os.environ.get("RANK") == "1":
        raise RuntimeError("this rank cannot build the model")
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FLATCLI_DIST_TIMEOUT": "60", "NO_COLOR": "1"}


def launch(nproc: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m flatcli ARGS`` for one process, ``torchrun ... -m flatcli ARGS`` for more."""
    launcher = (
        [sys.executable, "-m"]
        if nproc == 1
        else [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m"]
    )
    cmd = [*launcher, "flatcli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=cwd)


def one_and_two(run: Callable[[int, Path], subprocess.CompletedProcess], folder: Path, stem: str):
    """``run(nproc, json_path)`` with 1 and 2 processes; both must succeed.

    Returns (one-process result, two-process result, their two JSON reports).
    """
    procs = [run(n, folder / f"{stem}{n}.json") for n in (1, 2)]
    for proc in procs:
        assert proc.returncode == 0, proc.stderr
    reports = [json.loads((folder / f"{stem}{n}.json").read_text()) for n in (1, 2)]
    return (*procs, *reports)


def _run(tmp: Path, nproc: int, *args: str, factory: str = "nets.py:make"):
    common = ["--model", f"{tmp}/{factory}", "--dataset", f"tensors:{tmp}/data.safetensors"]
    return launch(nproc, *args, *common, cwd=tmp)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    ns = write_cli_problem(tmp, 25)  # 25 examples: uneven shards of 13 and 12
    torch.manual_seed(0)
    torch.save(ns["make"]().double().eval().state_dict(), tmp / "m.pt")
    (tmp / "flaky.py").write_text(FLAKY_FACTORY)
    (tmp / "bad.pt").write_bytes(b"not a checkpoint")
    return tmp


def _strip(report: dict) -> dict:
    """The report without its timing and environment fields."""
    out = {k: v for k, v in report.items() if k not in ("created", "environment")}
    out["results"] = [{k: v for k, v in r.items() if k != "seconds"} for r in out["results"]]
    return out


def _numbers(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if not k.startswith("seconds"):  # timing fields (e.g. kfac's seconds_factors)
                yield from _numbers(v, f"{prefix}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def assert_same_report(a: dict, b: dict, rtol: float = 1e-10, skip=lambda key: False) -> None:
    """Equal structure and strings; floats equal to ``rtol`` (relative, absolute below 1e-12)."""
    na, nb = dict(_numbers(_strip(a))), dict(_numbers(_strip(b)))
    assert na.keys() == nb.keys()
    for key, va in na.items():
        if skip(key):
            continue
        vb = nb[key]
        if isinstance(va, float) or isinstance(vb, float):
            assert abs(va - vb) <= rtol * max(abs(va), abs(vb)) + 1e-12, (key, va, vb)
        else:
            assert va == vb, (key, va, vb)


def test_spectrum_under_torchrun_equals_one_process(problem):
    tmp = problem
    args = ["spectrum", str(tmp / "m.pt"), "--top-k", "3", "--trace", "--dtype", "float64"]
    one, two, a, b = one_and_two(lambda n, out: _run(tmp, n, *args, "--json", str(out)), tmp, "s")
    assert a["environment"]["world_size"] == 1 and "examples_per_rank" not in a["environment"]
    assert b["environment"]["world_size"] == 2
    assert b["environment"]["examples_per_rank"] == [13, 12]
    assert_same_report(a, b)
    # only rank 0 prints: the table appears once
    assert two.stdout.count("flatcli spectrum") == one.stdout.count("flatcli spectrum") == 1


def _failing_spectrum(tmp: Path, name: str, *checkpoints: str, factory: str = "nets.py:make"):
    """``spectrum CHECKPOINTS`` over two processes, which must exit 1: (result, its report)."""
    args = ["spectrum", *(str(tmp / c) for c in checkpoints), "--top-k", "2", "--dtype", "float64"]
    res = _run(tmp, 2, *args, "--json", str(tmp / f"{name}.json"), factory=factory)
    assert res.returncode == 1, res.stderr
    return res, json.loads((tmp / f"{name}.json").read_text())


def test_a_bad_checkpoint_gives_error_rows_and_exit_1(problem):
    _, report = _failing_spectrum(problem, "bad", "bad.pt", "m.pt")
    assert [r["error"] is None for r in report["results"]] == [False, True]


def test_a_rank_that_fails_does_not_hang_the_others(problem):
    # the subprocess timeout catches a hang
    res, report = _failing_spectrum(problem, "flaky", "m.pt", factory="flaky.py:make")
    (entry,) = report["results"]
    assert entry["error"] is not None
    assert "rank 1 of 2 failed" in json.dumps(entry["error"])
    assert "cannot build the model" in res.stderr


def test_gamma_under_torchrun_equals_one_process(problem):
    tmp = problem  # 5 trials over 2 processes: shares of 3 and 2 trials, gathered on every rank
    args = ["gamma", str(tmp / "m.pt"), "--samples", "6", "--trials", "5", "--dtype", "float64"]
    _, _, a, b = one_and_two(lambda n, out: _run(tmp, n, *args, "--json", str(out)), tmp, "g")
    assert b["environment"]["world_size"] == 2
    assert a["results"][0]["metrics"]["gamma_hat"] is not None
    assert_same_report(a, b)


def test_kfac_under_torchrun_equals_one_process(problem):
    tmp = problem  # replicated factors; the exact layer blocks come from data-parallel products
    args = ["kfac", str(tmp / "m.pt"), "--dtype", "float64"]
    _, _, a, b = one_and_two(lambda n, out: _run(tmp, n, *args, "--json", str(out)), tmp, "k")
    assert b["environment"]["world_size"] == 2
    assert a["results"][0]["details"]["layers"]

    def tied(key: str) -> bool:
        # the 3x5 layer's exact block has rank 10 (K - 1 = 2 output directions x 5 inputs):
        # its eigenvectors from index 10 on are a rounding-dependent basis of the null space,
        # so the overlaps there are not compared
        index = key.rsplit("[", 1)[-1].rstrip("]")
        return (
            ("overlap" in key or "correspondence" in key) and index.isdigit() and int(index) >= 10
        )

    assert_same_report(a, b, skip=tied)


def test_rank_sweep_sharded_over_two_workers_equals_one(tmp_path):
    from tests.rank.helpers import write_sweep

    paths = write_sweep(tmp_path)  # 4 checkpoints: 2 per worker

    def rank_run(nproc: int, cache: str, out: Path, *quiet: str):
        args = ["rank", str(tmp_path), "--measures", "top_eigenvalue", "--dtype", "float64"]
        args += ["--bootstrap", "50", "--cache-dir", str(tmp_path / cache)]
        return launch(nproc, *args, "--json", str(out), *quiet)

    _, _, a, b = one_and_two(lambda n, out: rank_run(n, f"c{n}", out, "-q"), tmp_path, "r")
    assert len(b["results"]) == len(paths) and b["environment"]["world_size"] == 2
    assert_same_report(a, b, skip=lambda key: key == ".config.cache_dir")
    # each worker wrote its results into the cache: a rerun computes nothing
    again = rank_run(2, "c2", tmp_path / "r3.json")
    assert again.returncode == 0, again.stderr
    assert re.search(r"cache .*: [1-9]\d* result\(s\) reused, 0 computed", again.stderr)
    assert again.stderr.count("result(s) reused") == 1  # only rank 0 prints
