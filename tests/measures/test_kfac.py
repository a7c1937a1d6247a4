"""The kfac measure: report entries equal their definitions on dense float64 matrices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatcli.curvature.kfac import kron_eigenvectors
from flatcli.errors import UsageError
from flatcli.measures.kfac import KfacConfig, compute_kfac, cross_overlaps
from flatcli.measures.registry import get_measure, reported_keys
from tests.curvature.test_kfac import (
    confident_problem,
    conv_head_data,
    conv_head_net,
    conv_head_truth,
    data,
    dense_param_hessian,
    layer_inputs,
    relu_mlp,
    tiny_cnn,
)

F64 = torch.float64
CONTRACT_KEYS = {
    "name",
    "kind",
    "shape",
    "positions",
    "em_eigenvalues",
    "exx_eigenvalues",
    "kron_eigenvalues",
    "exact_eigenvalues",
    "overlap",
    "spectral_ratio",
    "mean_alignment",
    "rank1_scores",
    "decoupling_error",
    "decoupling_error_stderr",
}


def _dense_top(H: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(H)
    return vals.flip(0)[:k], vecs.flip(1)[:, :k]


def test_entries_match_dense_definitions():
    model = relu_mlp()
    x, y = data(40, (5,))
    k = 4
    res = compute_kfac(model, x, y, KfacConfig(top_k=k, tol=1e-10, probes=400, lanczos_steps=20))
    layers = {e["name"]: e for e in res.details()["layers"]}
    assert list(layers) == ["0", "2", "4"]
    for name, e in layers.items():
        assert CONTRACT_KEYS <= set(e)
        f = res.blocks[name].factors
        H = dense_param_hessian(model, x, y, f"{name}.weight")
        vals, vecs = _dense_top(H, k)
        assert torch.allclose(torch.tensor(e["exact_eigenvalues"], dtype=F64), vals, rtol=1e-7)
        kvals, kvecs = _dense_top(f.dense(), k)
        assert torch.allclose(torch.tensor(e["kron_eigenvalues"], dtype=F64), kvals, rtol=1e-9)
        b = res.blocks[name]
        kron = kron_eigenvectors(b.U, b.V, b.kron_i, b.kron_j)
        for j in range(1, k + 1):  # Eq. 7 on the dense eigenvectors
            want = float(torch.linalg.matrix_norm(vecs[:, :j].T @ kron[:, :j]) ** 2) / j
            assert math.isclose(e["overlap"][j - 1], want, rel_tol=1e-5, abs_tol=1e-7)
        m, n = f.shape
        for j in range(k):
            s = torch.linalg.svdvals(vecs[:, j].reshape(m, n))
            assert math.isclose(e["rank1_scores"][j], float(s[0] / s.norm()), rel_tol=1e-5)
            Mat = vecs[:, j].reshape(m, n)
            u0, v0 = b.U[:, 0], b.V[:, 0]
            assert math.isclose(
                e["correspondence"]["exact_vs_em"][0][j],
                float((Mat.T @ u0).square().sum()),
                rel_tol=1e-5,
                abs_tol=1e-9,
            )
            assert math.isclose(
                e["correspondence"]["exact_vs_exx"][0][j],
                float((Mat @ v0).square().sum()),
                rel_tol=1e-5,
                abs_tol=1e-9,
            )
        dense_err = float(torch.linalg.matrix_norm(H - f.dense()) / torch.linalg.matrix_norm(H))
        assert abs(e["decoupling_error"] - dense_err) < 4 * e["decoupling_error_stderr"]
        # Eq. 26: the bias block of a ReLU net is E[M]
        assert e["bias_block_vs_em"] < 1e-12
        assert e["em_eigenvalues"] == sorted(e["em_eigenvalues"], reverse=True)
    metrics = res.metrics()
    assert set(metrics) == set(reported_keys(get_measure("kfac"), res.config))
    assert metrics["decoupling_error_max"] == max(e["decoupling_error"] for e in layers.values())
    assert metrics["overlap_at_10_min"] == min(e["overlap"][-1] for e in layers.values())


def test_single_example_decoupling_is_exact():
    model = relu_mlp()
    x, y = data(1, (5,))
    res = compute_kfac(model, x, y, KfacConfig(top_k=3, tol=1e-10, lanczos_steps=20))
    for e in res.details()["layers"]:
        assert e["decoupling_error"] < 1e-6
        assert e["overlap"][0] > 1 - 1e-6


def test_conv_net_and_compare():
    model = tiny_cnn()
    x, y = data(10, (2, 6, 6))
    res = compute_kfac(model, x, y, KfacConfig(top_k=3, probes=8), compare_model=model)
    e = {d["name"]: d for d in res.details()["layers"]}
    assert e["0"]["kind"] == "conv2d" and e["0"]["positions"] == 36 and e["0"]["shape"] == [3, 18]
    cmp = e["0"]["compare"]
    # the same model: every top-k eigenspace coincides and (Ê[x]ᵀÊ[x])² = 1
    assert all(v > 1 - 1e-6 for v in cmp["exact_overlap"])
    assert all(v > 1 - 1e-9 for v in cmp["kron_overlap"])
    assert math.isclose(cmp["predicted_overlap_at_m"], 1.0, rel_tol=1e-12)
    assert "compare_overlap_at_m_min" in res.metrics()
    assert "Eq. 35" in res.details()["conventions"]["conv"]


def test_overlap_at_m_null_only_with_its_reason():
    """m > --top-k: the overlaps at k = m are null, and details say why, naming m and --top-k;
    with every layer so, the metric is null with its reason too (issue #22, item 8)."""
    a, b = relu_mlp(0), relu_mlp(1)  # layers 0, 2, 4 with m = 4, 4, 3
    x, y = data(12, (5,))
    res = compute_kfac(a, x, y, KfacConfig(top_k=3, probes=4), compare_model=b)
    cmp = {e["name"]: e["compare"] for e in res.details()["layers"]}
    for name in ("0", "2"):
        assert cmp[name]["exact_overlap_at_m"] is None and cmp[name]["kron_overlap_at_m"] is None
        why = cmp[name]["reasons"]["exact_overlap_at_m"]
        assert why.startswith("m > top-k:") and "m = 4 exceeds --top-k 3" in why
        assert "--top-k 4 or more" in why
        assert cmp[name]["reasons"]["kron_overlap_at_m"] == why
    assert cmp["4"]["exact_overlap_at_m"] is not None and cmp["4"]["reasons"] == {}
    assert res.metrics()["compare_overlap_at_m_min"] == cmp["4"]["exact_overlap_at_m"]
    assert "nonfinite" not in res.details()
    res = compute_kfac(a, x, y, KfacConfig(top_k=2, probes=4), compare_model=b)
    assert res.metrics()["compare_overlap_at_m_min"] is None
    why = res.details()["nonfinite"]["compare_overlap_at_m_min"]
    assert why.startswith("m > top-k:") and "--top-k 2 (smallest m = 3)" in why


def _mean_input(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's mean input in float64: over examples, and over positions for a convolution
    (the mean unfolded patch)."""
    module = dict(model.named_modules())[layer]
    a = layer_inputs(model, x, layer).to(F64)
    if isinstance(module, nn.Conv2d):
        X = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return X.mean(dim=(0, 2))  # (n,): over examples and the P positions
    return a.mean(0)


@pytest.mark.parametrize(("make", "shape"), [(relu_mlp, (5,)), (tiny_cnn, (2, 6, 6))])
def test_compare_predicts_the_squared_cosine_of_two_different_models(make, shape):
    """Two networks with different weights: per layer, predicted_overlap_at_m is
    (Ê[x]₁ᵀÊ[x]₂)² (Wu et al. 2020, §5.1, Thm. E.1), from the layers' own mean inputs."""
    a, b = make(0), make(1)
    x, y = data(10, shape)
    cfg = KfacConfig(top_k=3, probes=4)
    res = compute_kfac(a, x, y, cfg, compare_model=b)
    res_b = compute_kfac(b, x, y, cfg)
    cross = cross_overlaps(res, res_b)
    informative = 0
    for e in res.details()["layers"]:
        name = e["name"]
        mu1, mu2 = _mean_input(a, x, name), _mean_input(b, x, name)
        cos = float(mu1 @ mu2) / (float(mu1.norm()) * float(mu2.norm()))
        got = e["compare"]["predicted_overlap_at_m"]
        assert math.isclose(got, cos**2, rel_tol=1e-10)
        # ... which is what the two layers' factors' mean inputs imply
        f1, f2 = res.blocks[name].factors, res_b.blocks[name].factors
        assert torch.allclose(f1.mean_x, mu1, rtol=1e-12, atol=1e-15)
        assert torch.allclose(f2.mean_x, mu2, rtol=1e-12, atol=1e-15)
        implied = float(f1.mean_x / f1.mean_x.norm() @ (f2.mean_x / f2.mean_x.norm())) ** 2
        assert math.isclose(got, implied, rel_tol=1e-10)
        assert math.isclose(cross[name]["predicted_overlap_at_m"], got, rel_tol=1e-12)
        informative += abs(cos) < 0.99  # here the square changes the number
    # the first layer sees the same x in both models (cos = 1); the later ones must not
    assert informative >= 2


def test_conv_report_keys_carry_the_one_over_p():
    """The report of a tiny conv net against the position-by-position construction of
    tests/curvature (Wu et al. 2020, Eqs. 35, 37, 8; Table 7)."""
    model = conv_head_net()
    x, y = conv_head_data()
    want = conv_head_truth(model, x)
    res = compute_kfac(model, x, y, KfacConfig(layers=("0",), top_k=3, probes=4))
    (e,) = res.details()["layers"]
    assert e["kind"] == "conv2d" and e["positions"] == want["P"] == 9 and e["shape"] == [2, 9]
    em = torch.linalg.eigvalsh(want["em"]).flip(0)
    exx = torch.linalg.eigvalsh(want["exx"]).flip(0)
    assert torch.allclose(torch.tensor(e["em_eigenvalues"], dtype=F64), em, rtol=1e-10)
    assert torch.allclose(
        torch.tensor(e["exx_eigenvalues"], dtype=F64), exx, rtol=1e-10, atol=1e-12 * exx[0]
    )
    kron = (em.unsqueeze(1) * exx.unsqueeze(0)).flatten().sort(descending=True).values[:3]
    assert torch.allclose(torch.tensor(e["kron_eigenvalues"], dtype=F64), kron, rtol=1e-10)
    assert math.isclose(e["spectral_ratio"], want["spectral_ratio"], rel_tol=1e-10)
    assert math.isclose(e["mean_alignment"], want["mean_alignment"], rel_tol=1e-10)


def test_batchnorm_affine_is_reported_not_factored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    model = model.double().eval()
    x, y = data(12, (5,))
    res = compute_kfac(model, x, y, KfacConfig(top_k=2, probes=4))
    assert res.details()["not_factored"] == ["1.weight", "1.bias"]
    assert res.details()["mode"] == "eval"


def test_confident_net_shows_the_failure():
    """The conjecture fails where the curvature-carrying examples have atypical inputs."""
    model, x, y = confident_problem()
    m = compute_kfac(model, x, y, KfacConfig(top_k=2, probes=64, tol=1e-8)).metrics()
    assert m["overlap_at_10_min"] < 0.3
    assert m["decoupling_error_max"] > 0.8


def test_bad_options():
    with pytest.raises(UsageError, match="top_k"):
        KfacConfig(top_k=0)
    with pytest.raises(UsageError, match="matrix"):
        KfacConfig(matrix="fisher")
    with pytest.raises(UsageError, match="fisher"):
        KfacConfig(fisher="nope")
