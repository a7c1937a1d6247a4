"""Values of the normalized measures against dense float64 computations, and their error bars.

- Matrix-normalized sharpness (Tsuzuku et al. 2020, Eq. 13), Σ_i sqrt(‖W_i‖_F² · H_i) with H_i
  the trace of weight matrix W_i's Hessian block, against the traces of the dense Hessian
  (``diag_method="exact"``, and Hutchinson within its standard error) and of the dense GGN
  (``"ggn"``) of the NSCE surrogate (their Eq. 20).
- The jackknife standard error of normalized sharpness (Eq. 17 with Hutchinson diagonals, over
  independently seeded probe groups) calibrated over seeds, as tests/curvature/test_trace.py does
  for the trace estimators: the spread of the estimate over 40 seeds must match the jackknife's
  stated stderr.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flatcli.curvature.losses import normalized_cross_entropy
from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness, weight_matrices
from tests.cases import make_case
from tests.references import dense_ggn, dense_hessian

MNS = "matrix_normalized_sharpness"


def _eq13(model, H: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Eq. 13 from a dense matrix over all parameters (model order): value and per-layer terms."""
    names, _ = weight_matrices(model)
    terms, i = {}, 0
    d = H.diagonal()
    for n, p in model.named_parameters():
        k = p.numel()
        if n in names:
            trace = float(d[i : i + k].sum())
            terms[n] = math.sqrt(float(p.detach().double().pow(2).sum()) * max(trace, 0.0))
        i += k
    return sum(terms.values()), terms


@pytest.fixture(scope="module")
def tanh_case():
    model, x, y = make_case("mlp_tanh", n=16)
    H = dense_hessian(model, x, y, loss_fn=normalized_cross_entropy)
    G = dense_ggn(model, x, y, loss_fn=normalized_cross_entropy)
    return model, x, y, H, G


@pytest.mark.parametrize("method", ["exact", "ggn"])
def test_matrix_normalized_sharpness_is_eq_13(tanh_case, method):
    model, x, y, H, G = tanh_case
    want, terms = _eq13(model, H if method == "exact" else G)
    assert all(t > 0 for t in terms.values())  # every layer's block trace is positive here
    res = compute_sharpness(model, x, y, SharpnessConfig(measures=(MNS,), diag_method=method))
    assert math.isclose(res.metrics()[MNS], want, rel_tol=1e-10)
    got = res.details()["per_layer"][MNS]
    for k, v in terms.items():
        assert math.isclose(got[k], v, rel_tol=1e-10)
    # the square root matters: without it the value would be Σ ‖W_i‖² H_i
    assert not math.isclose(want, sum(t * t for t in terms.values()), rel_tol=0.1)


def test_matrix_normalized_sharpness_hutchinson_within_its_stderr(tanh_case):
    model, x, y, H, _ = tanh_case
    want, _ = _eq13(model, H)
    cfg = SharpnessConfig(measures=(MNS,), diag_method="hutchinson", trace_probes=300, seed=2)
    m = compute_sharpness(model, x, y, cfg).metrics()
    se = m[f"{MNS}_stderr"]
    assert 0 < se < 0.1 * want
    assert abs(m[MNS] - want) <= 4 * se


def test_jackknife_stderr_is_calibrated_over_seeds(tanh_case):
    """std over 40 seeds of normalized sharpness vs the rms of its jackknife stderr.

    The sample std of 40 values is itself uncertain by about 1/sqrt(78) = 11%: the band
    [0.7, 1.4] is about 3 of those; a jackknife factor wrong by 2x or more falls outside.
    """
    model, x, y, _, _ = tanh_case
    values, stderrs = [], []
    for seed in range(40):
        cfg = SharpnessConfig(
            measures=("normalized_sharpness",),
            diag_method="hutchinson",
            probes=40,
            probe_groups=10,
            seed=seed,
        )
        m = compute_sharpness(model, x, y, cfg).metrics()
        values.append(m["normalized_sharpness"])
        stderrs.append(m["normalized_sharpness_stderr"])
    spread = float(np.std(values, ddof=1))
    stated = float(np.sqrt(np.mean(np.square(stderrs))))
    assert 0.7 <= spread / stated <= 1.4, (spread, stated)
