"""``flatcli spectrum`` end to end: options reach the measure, numbers match the dense Hessian."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from flatcli.curvature.linop import to_dense
from flatcli.curvature.operators import make_operator
from flatcli.errors import UsageError
from tests.cases import write_cli_problem
from tests.cli.helpers import invoke_on_problem, report_of
from tests.io.test_report import validate_report


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spectrum")
    ns = write_cli_problem(tmp, 24)
    data = load_file(str(tmp / "data.safetensors"))
    x, y = data["x"], data["y"]
    torch.manual_seed(0)
    model = ns["make"]().double().eval()
    torch.save(model.state_dict(), tmp / "m.pt")
    H = to_dense(make_operator("hessian", model, x, y))
    return tmp, H


def _invoke(tmp, *args):
    return invoke_on_problem("spectrum", tmp, *args)


def test_eigenvalues_trace_and_density_in_the_report(setup):
    tmp, H = setup
    args = ["--top-k", "3", "--tol", "1e-10", "--trace", "--probes", "180", "--density"]
    _, report = report_of("spectrum", tmp, tmp / "r.json", *args, "--lanczos-steps", "40", "-q")
    validate_report(report, "spectrum")
    entry = report["results"][0]
    lam = torch.linalg.eigvalsh(H).flip(0)
    assert entry["details"]["eigenvalues"] == pytest.approx(lam[:3].tolist(), rel=1e-8)
    m = entry["metrics"]
    assert set(m) == {"top_eigenvalue", "trace", "trace_stderr", "num_params", "matvecs"}
    # Hutch++ with probes // 3 = 60 >= dim = 53 sketch columns is exact
    assert m["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-9)
    assert m["num_params"] == 53
    density = entry["details"]["density"]
    assert len(density["grid"]) == len(density["values"]) == 1000
    assert report["config"]["top_k"] == 3 and report["config"]["trace_method"] == "hutchpp"
    assert entry["details"]["hvp_method"] in ("forward-over-reverse", "double-backward")


def test_per_layer_rows_and_layer_selection(setup):
    tmp, H = setup
    res = _invoke(tmp, "--top-k", "1", "--per-layer", "--layer", "3")
    assert res.exit_code == 0, res.output
    assert "λ_max" in res.output and "  3" in res.output
    args = ["--top-k", "1", "--tol", "1e-10", "--layer", "3", "-q"]
    entry = report_of("spectrum", tmp, tmp / "layer.json", *args)[1]["results"][0]
    sub = H[-18:, -18:]  # the last Linear (5 -> 3): weight and bias come last
    assert entry["metrics"]["num_params"] == 18
    assert entry["metrics"]["top_eigenvalue"] == pytest.approx(
        float(torch.linalg.eigvalsh(sub)[-1]), rel=1e-8
    )


def test_save_eigenvectors(setup):
    tmp, H = setup
    folder = tmp / "vecs"
    res = _invoke(tmp, "--top-k", "2", "--tol", "1e-10", "--save-eigenvectors", str(folder), "-q")
    assert res.exit_code == 0, res.output
    saved = load_file(str(folder / "m.eigenvectors.safetensors"))
    assert saved["1.weight"].shape == (2, 5, 6) and saved["3.bias"].shape == (2, 3)
    flat = torch.cat(
        [saved[n].reshape(2, -1) for n in ("1.weight", "1.bias", "3.weight", "3.bias")], dim=1
    )
    torch.testing.assert_close(H @ flat.T, flat.T * saved["eigenvalues"], atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--which", "top"], "top"),
        (["--trace", "--probes", "2"], "probes"),
        (["--head-dtype", "float16"], "head dtype"),
    ],
)
def test_bad_options_exit_2(setup, args, message):
    tmp, _ = setup
    res = _invoke(tmp, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


# ---- requests larger than the model or than memory: exit 2 before any work (issue #22) -----


def _one_error_line(res) -> str:
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.mark.parametrize(
    ("layer", "count", "what"),
    [([], 53, "all trainable parameters"), (["--layer", "3"], 18, "those of --layer 3")],
)
def test_top_k_above_the_parameter_count_exits_2(setup, layer, count, what):
    # before: the whole spectrum (min(k, dim) eigenvalues), silently, exit 0
    tmp, H = setup
    assert H.shape[0] == 53
    res = _invoke(tmp, "--top-k", str(count + 1), *layer)
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert f"--top-k {count + 1}" in line and f"{count} parameters" in line and what in line


def test_top_k_equal_to_the_parameter_count_is_the_whole_spectrum(setup, tmp_path):
    tmp, H = setup
    _, rep = report_of("spectrum", tmp, tmp_path / "r.json", "--top-k", "18", "--layer", "3")
    assert len(rep["results"][0]["details"]["eigenvalues"]) == 18


def test_a_basis_larger_than_memory_exits_2_with_the_estimate(setup, monkeypatch):
    # before: Lanczos allocated its basis and failed with a raw out-of-memory error (exit 1)
    spectrum = importlib.import_module("flatcli.measures.spectrum")  # the module, not the function
    monkeypatch.setattr(spectrum, "available_memory", lambda device: 1000)
    tmp, _ = setup
    res = _invoke(tmp, "--top-k", "5")
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    need = spectrum.lanczos_memory(53, 5, model_params=53, dtype=torch.float64)
    assert f"{need.vectors} float64 vectors of 53 parameters" in line
    assert "1000 bytes available on cpu" in line and "lower --top-k" in line


def test_density_steps_larger_than_memory_name_lanczos_steps(setup, monkeypatch):
    spectrum = importlib.import_module("flatcli.measures.spectrum")  # the module, not the function
    monkeypatch.setattr(spectrum, "available_memory", lambda device: 1000)
    tmp, _ = setup
    res = _invoke(tmp, "--top-k", "0", "--density")
    assert res.exit_code == 2, res.output
    assert "lower --lanczos-steps" in _one_error_line(res)


def test_a_float32_run_is_checked_with_the_float32_basis_lanczos_would_store(monkeypatch):
    # a float64 basis over the memory budget is stored in float32 (lanczos, basis_dtype="auto"):
    # the check before work must not refuse a run that this basis fits
    spectrum = importlib.import_module("flatcli.measures.spectrum")
    model = torch.nn.Linear(40, 10)
    config = spectrum.SpectrumConfig(top_k=5)
    f64 = spectrum.lanczos_memory(410, 5, model_params=410, dtype=torch.float32)
    f32 = spectrum.lanczos_memory(
        410, 5, model_params=410, dtype=torch.float32, basis_dtype="float32"
    )
    monkeypatch.setattr(spectrum, "available_memory", lambda device: (f32.bytes + f64.bytes) // 2)
    assert spectrum.check_spectrum(model, config) is None


def test_a_basis_that_does_not_fit_is_capped_before_the_run_is_refused(monkeypatch):
    """Below the full basis the eigenvalues' Lanczos run thick-restarts with the most vectors
    that fit (down to top_k + 2; float64 ones, as lanczos keeps for so small a model), and the
    result says so; below that, exit 2 as before."""
    spectrum = importlib.import_module("flatcli.measures.spectrum")
    model = torch.nn.Linear(40, 10)
    config = spectrum.SpectrumConfig(top_k=5)
    f32 = spectrum.lanczos_memory(
        410, 5, model_params=410, dtype=torch.float32, basis_dtype="float32"
    )

    def need(cap: int) -> int:
        return spectrum.lanczos_memory(
            410, 5, model_params=410, dtype=torch.float32, basis_dtype="float64", max_basis=cap
        ).bytes

    assert need(30) < f32.bytes  # the full basis: 100 rows (steps of 5 eigenvalues)
    monkeypatch.setattr(spectrum, "available_memory", lambda device: need(30))
    assert spectrum.check_spectrum(model, config) == 30  # the most that fit
    monkeypatch.setattr(spectrum, "available_memory", lambda device: need(7) - 1)
    with pytest.raises(UsageError, match="float32 vectors of 410 parameters"):
        spectrum.check_spectrum(model, config)  # not even top_k + 2 = 7 vectors fit
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    model = model.double()
    cap8 = spectrum.lanczos_memory(
        410, 5, model_params=410, dtype=torch.float64, basis_dtype="float64", max_basis=8
    )
    monkeypatch.setattr(spectrum, "available_memory", lambda device: cap8.bytes)
    capped = spectrum.compute_spectrum(model, x.double(), y, config)
    monkeypatch.setattr(spectrum, "available_memory", lambda device: 1 << 40)
    full = spectrum.compute_spectrum(model, x.double(), y, config)
    assert capped.details()["lanczos"]["max_basis"] == 8
    assert full.details()["lanczos"]["max_basis"] is None
    assert capped.details()["lanczos"]["converged"]
    torch.testing.assert_close(
        capped.eigen.eigenvalues, full.eigen.eigenvalues, rtol=1e-6, atol=1e-8
    )
