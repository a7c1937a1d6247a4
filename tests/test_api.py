"""The public Python API: ``flatcli.load`` and the measures, against the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import flatcli
import flatcli.io
import flatcli.measures
from flatcli.errors import CheckpointError, UsageError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600
    )


def readme_script() -> str:
    """The README's Python block (its "Call it from Python" use)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("Call it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint trained by ``flatcli train`` on 1,200 three-class blobs (mlp)."""
    tmp = tmp_path_factory.mktemp("api")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1200) % 3
    x = torch.randn(3, 8, generator=g)[y] * 2 + torch.randn(1200, 8, generator=g)
    test = {"x_test": x[:90].clone(), "y_test": y[:90].clone()}
    data = tmp / "blobs.safetensors"
    save_file({"x_train": x, "y_train": y, **test}, str(data))
    ckpt = tmp / "runs" / "m.safetensors"
    args = ["-m", "flatcli", "train", "--model", "mlp", "--dataset", f"tensors:{data}"]
    res = _python(*args, "-o", str(ckpt), "--epochs", "2", "--quiet", cwd=tmp)
    assert res.returncode == 0, res.stderr
    return ckpt


def test_import_flatcli_is_light_and_names_are_lazy():
    code = (
        "import sys, flatcli; assert 'torch' not in sys.modules, 'torch imported'; "
        "print(flatcli.__version__, callable(flatcli.load), 'torch' in sys.modules)"
    )
    res = _python("-c", code, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [flatcli.__version__, "True", "True"]


@pytest.mark.parametrize("module", [flatcli, flatcli.measures, flatcli.io])
def test_curated_all_resolves(module):
    assert module.__all__ and len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert set(module.__all__) <= set(dir(module))


def test_readme_script_matches_the_command_line(trained):
    """The README's ten lines give the numbers of `flatcli gamma` and `flatcli spectrum`."""
    script = readme_script()
    assert "flatcli.load(" in script and len(script.strip().splitlines()) <= 12
    script = script.replace("runs/lenet5.safetensors", str(trained))
    script += 'print(json.dumps({"gamma": gamma.metrics(), "spectrum": spectrum.metrics()}))\n'
    res = _python("-W", "default", "-c", "import json\n" + script, cwd=trained.parent)
    assert res.returncode == 0, res.stderr
    assert "jit.script" not in res.stderr and "Warning" not in res.stderr, res.stderr
    api = json.loads(res.stdout.strip().splitlines()[-1])

    common = [str(trained), "--max-examples", "1000", "--json", "-", "--quiet"]
    cli = {}
    for command, options in [
        ("gamma", ["--samples", "100", "--trials", "20"]),
        ("spectrum", ["--top-k", "5", "--trace"]),
    ]:
        res = _python("-m", "flatcli", command, *common, *options, cwd=trained.parent)
        assert res.returncode == 0, res.stderr
        cli[command] = json.loads(res.stdout)["results"][0]["metrics"]
    assert api == cli
    assert api["gamma"]["gamma_hat"] is not None and api["spectrum"]["trace"] is not None


def test_load_returns_the_run_the_commands_measure(trained):
    run = flatcli.load(trained, max_examples=50, seed=3, dtype="float64")
    assert isinstance(run, flatcli.Run)
    assert run.x.shape == (50, 8) and run.x.dtype == torch.float64 and run.y.shape == (50,)
    assert run.num_classes == 3 and run.split == "train" and run.seed == 3
    assert run.record["dataset"].startswith("tensors:") and run.spec.arch == "mlp"
    assert not run.model.training
    assert run.num_params == sum(p.numel() for p in run.model.parameters())
    again = flatcli.load(trained, max_examples=50, seed=3, dtype="float64")
    assert torch.equal(run.x, again.x) and torch.equal(run.y, again.y)
    assert flatcli.load(trained, split="test").x.shape == (90, 8)


def test_measure_functions_take_config_fields(trained):
    run = flatcli.load(trained, max_examples=30)
    result = flatcli.measures.spectrum(run, top_k=2)
    assert result.config.top_k == 2 and result.config.seed == run.seed
    assert len(result.details()["eigenvalues"]) == 2
    with pytest.raises(UsageError, match="top_k"):
        flatcli.measures.spectrum(run, topk=2)
    sharp = flatcli.measures.sharpness(run, measures=["hessian_trace"], trace_probes=4)
    assert list(sharp.metrics()) == ["hessian_trace", "hessian_trace_stderr"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"split": "valid"}, UsageError, "--split"),
        ({"dtype": "float16"}, UsageError, "--dtype"),
        ({"device": "cuda:99"}, UsageError, "CUDA"),
        ({"max_examples": 10**6}, UsageError, "holds only"),
        ({"model": "nosuchnet"}, UsageError, "nosuchnet"),
    ],
)
def test_load_errors(trained, kwargs, error, message):
    with pytest.raises(error, match=message):
        flatcli.load(trained, **kwargs)


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        flatcli.load(tmp_path / "absent.safetensors")
