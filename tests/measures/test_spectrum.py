"""compute_spectrum end to end on tiny models, against the dense float64 Hessian / GGN."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from flatcli.curvature.operators import make_operator
from flatcli.errors import UsageError
from flatcli.measures.spectrum import SpectrumConfig, compute_spectrum
from tests.cases import make_case
from tests.references import dense_ggn, dense_hessian, extreme_eigenvalues


def _eig(res) -> torch.Tensor:
    return torch.tensor(res.eigenvalues, dtype=torch.float64)


def _dense(kind: str, model, x, y, params=None) -> torch.Tensor:
    """The dense float64 matrix from torch.func (independent of the operators under test)."""
    return {"hessian": dense_hessian, "ggn": dense_ggn}[kind](model, x, y, params)


@pytest.fixture(scope="module")
def mlp():
    model, x, y = make_case("mlp_tanh", n=16)
    return model, x, y, _dense("hessian", model, x, y)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_eigenvalues_match_the_dense_hessian(mlp, which):
    model, x, y, H = mlp
    res = compute_spectrum(model, x, y, SpectrumConfig(top_k=5, which=which, tol=1e-10))
    lam = torch.linalg.eigvalsh(H)
    assert bool((lam < -1e-6).any())  # a Hessian with negative eigenvalues
    torch.testing.assert_close(_eig(res), extreme_eigenvalues(lam, which, 5), rtol=1e-8, atol=1e-12)
    m = res.metrics()
    assert m["top_eigenvalue"] == res.eigenvalues[0]
    assert m["num_params"] == H.shape[0] == 74
    assert m["trace"] is None and m["trace_stderr"] is None
    assert m["matvecs"] == res.eigen.matvecs
    assert res.details()["lanczos"]["converged"]


def test_ggn_spectrum_and_exact_trace(mlp):
    model, x, y, _ = mlp
    G = _dense("ggn", model, x, y)
    # Hutch++ whose sketch (probes // 3 = dim columns) spans the space is exact
    cfg = SpectrumConfig(matrix="ggn", top_k=3, tol=1e-10, trace=True, probes=3 * 74)
    res = compute_spectrum(model, x, y, cfg)
    lam = torch.linalg.eigvalsh(G)
    assert float(lam.min()) > -1e-10  # PSD
    torch.testing.assert_close(_eig(res), lam.flip(0)[:3], rtol=1e-8, atol=0)
    assert res.metrics()["trace"] == pytest.approx(float(torch.trace(G)), rel=1e-10)


def test_trace_within_its_stderr_and_density_moments(mlp):
    model, x, y, H = mlp
    cfg = SpectrumConfig(
        top_k=0,
        trace=True,
        trace_method="hutchinson",
        probes=60,
        density=True,
        density_runs=20,
        lanczos_steps=12,
        seed=3,
    )
    res = compute_spectrum(model, x, y, cfg)
    exact = float(torch.trace(H))
    m = res.metrics()
    assert m["top_eigenvalue"] is None and res.details()["eigenvalues"] is None
    assert abs(m["trace"] - exact) <= 3 * m["trace_stderr"]
    d = res.density
    assert abs(float(torch.trapezoid(d.values, d.grid)) - 1.0) < 1e-6
    assert abs(d.mean - exact / 74) <= 3 * d.mean_stderr
    assert m["matvecs"] == 60 + 20 * 12


def test_per_layer_blocks_are_the_dense_diagonal_blocks(mlp):
    model, x, y, H = mlp
    cfg = SpectrumConfig(top_k=2, tol=1e-10, trace=True, probes=3 * 35, per_layer=True)
    res = compute_spectrum(model, x, y, cfg)
    op = make_operator("hessian", model, x, y)
    layers = res.details()["per_layer"]
    assert [b["name"] for b in layers] == ["1", "3", "5"]
    assert [b["num_params"] for b in layers] == [35, 24, 15]
    for block in layers:
        idx = torch.cat(
            [
                torch.arange(op.slices[n].start, op.slices[n].stop)
                for n in (f"{block['name']}.weight", f"{block['name']}.bias")
            ]
        )
        sub = H[idx][:, idx]
        assert block["top_eigenvalue"] == pytest.approx(
            float(torch.linalg.eigvalsh(sub)[-1]), rel=1e-8
        )
        assert block["trace"] == pytest.approx(float(torch.trace(sub)), rel=1e-9, abs=1e-12)
    # total products: the full operator's plus every block's
    assert res.metrics()["matvecs"] == res.eigen.matvecs + 3 * 35 + sum(
        b["matvecs"] for b in layers
    )


def test_layers_restrict_the_operator(mlp):
    model, x, y, H = mlp
    res = compute_spectrum(model, x, y, SpectrumConfig(top_k=2, tol=1e-10, layers=("5",)))
    sub = H[-15:, -15:]  # the last Linear's weight and bias come last in the flat vector
    assert res.num_params == 15
    torch.testing.assert_close(_eig(res), torch.linalg.eigvalsh(sub).flip(0)[:2], rtol=1e-8, atol=0)
    with pytest.raises(UsageError, match="nonexistent"):
        compute_spectrum(model, x, y, SpectrumConfig(layers=("nonexistent",)))


def test_eigenvectors_are_kept_on_request(mlp):
    model, x, y, H = mlp
    res = compute_spectrum(model, x, y, SpectrumConfig(top_k=3, tol=1e-10, eigenvectors=True))
    X = res.eigenvectors
    assert X.shape == (74, 3) and X.dtype == torch.float64
    torch.testing.assert_close(H @ X, X * _eig(res), atol=1e-8, rtol=0)
    assert res.slices["1.weight"] == slice(0, 30)
    assert compute_spectrum(model, x, y, SpectrumConfig(top_k=1)).eigenvectors is None


def test_report_is_json_and_names_the_mode(mlp):
    model, x, y, _ = mlp
    trained = copy.deepcopy(model).train()
    cfg = SpectrumConfig(top_k=2, trace=True, probes=12, density=True, lanczos_steps=10)
    res = compute_spectrum(trained, x, y, cfg)
    details = res.details()
    json.dumps({"metrics": res.metrics(), "details": details, "config": cfg.to_dict()})
    assert details["mode"] == "train"
    assert details["hvp_method"] == details["operator"]["hvp_method"]
    assert details["hvp_method"] in ("forward-over-reverse", "double-backward")
    assert set(details) >= {"eigenvalues", "residuals", "density", "per_layer", "mode"}
    assert set(details["density"]) >= {"grid", "values"} and details["per_layer"] is None
    assert compute_spectrum(model, x, y, SpectrumConfig(top_k=1)).details()["mode"] == "eval"


def test_float32_model_with_a_float64_head(mlp):
    model, x, y, H = mlp
    res = compute_spectrum(
        copy.deepcopy(model).float(), x.float(), y, SpectrumConfig(top_k=2, head_dtype="float64")
    )
    assert res.operator["dtype"] == "float32" and res.operator["head_dtype"] == "float64"
    torch.testing.assert_close(_eig(res), torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-4, atol=0)


def test_progress_counts_products_out_of_the_whole_budget(mlp):
    model, x, y, _ = mlp
    calls = []
    cfg = SpectrumConfig(top_k=1, trace=True, probes=6, per_layer=True)
    compute_spectrum(model, x, y, cfg, progress=lambda *a: calls.append(a))
    total = calls[0][2]
    # Lanczos step budgets (min(dim, 100)) plus 6 probes: all 74 parameters, then each layer
    assert {c[2] for c in calls} == {total} and total == 74 + 6 + (35 + 6) + (24 + 6) + (15 + 6)
    done = [c[1] for c in calls]
    assert done == sorted(done) and done[-1] == total and calls[0][1] == 0
    assert calls[0][0] == "spectrum: eigenvalues" and calls[-1][0].startswith("spectrum: layer")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"matrix": "jacobian"}, "matrix 'jacobian'"),
        ({"which": "top"}, "which 'top'"),
        ({"trace_method": "exact"}, "trace method 'exact'"),
        ({"head_dtype": "float16"}, "head dtype"),
        ({"top_k": -1}, "top_k"),
        ({"probes": 2}, "probes"),
        ({"tol": 0.0}, "tol"),
        ({"density_runs": 0}, "density_runs"),
    ],
)
def test_bad_options_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        SpectrumConfig(**kwargs)


@pytest.mark.parametrize("case", ["mlp_relu", "cnn_bn"])
def test_other_cases_match_their_dense_hessian(case):
    model, x, y = make_case(case, n=10)
    H = _dense("hessian", model, x, y)
    cfg = SpectrumConfig(top_k=3, which="magnitude", tol=1e-10, trace=True, probes=3 * H.shape[0])
    res = compute_spectrum(model, x, y, cfg)
    lam = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(
        _eig(res), extreme_eigenvalues(lam, "magnitude", 3), rtol=1e-8, atol=1e-12
    )
    assert res.metrics()["trace"] == pytest.approx(float(torch.trace(H)), rel=1e-9, abs=1e-12)
    assert res.details()["mode"] == "eval"


# ---- refused before any work: more eigenvalues than parameters, more memory than there is ----


def test_top_k_above_the_parameter_count_is_refused(mlp):
    model, x, y, H = mlp
    dim = H.shape[0]
    with pytest.raises(UsageError, match=rf"--top-k {dim + 1} is more than the {dim} parameters"):
        compute_spectrum(model, x, y, SpectrumConfig(top_k=dim + 1))


def test_a_basis_larger_than_memory_is_refused_before_any_product(mlp, monkeypatch):
    import importlib

    spectrum = importlib.import_module("flatcli.measures.spectrum")
    monkeypatch.setattr(spectrum, "available_memory", lambda device: 100)
    monkeypatch.setattr(spectrum, "OperatorCache", None)  # building an operator would fail
    model, x, y, _ = mlp
    with pytest.raises(
        UsageError, match=r"more than the 100 bytes available on cpu; lower --top-k"
    ):
        compute_spectrum(model, x, y, SpectrumConfig(top_k=2))


def test_the_registered_check_marks_its_refusal_as_before_work(mlp):
    from flatcli.measures.registry import BEFORE_WORK, check, get_measure
    from flatcli.measures.spectrum import SpectrumConfig as Config

    model, x, y, H = mlp

    class _Run:
        pass

    run = _Run()
    run.model = model
    with pytest.raises(UsageError) as info:
        check(get_measure("spectrum"), run, Config(top_k=H.shape[0] + 1))
    assert getattr(info.value, BEFORE_WORK) is True
