"""One operator per checkpoint and matrix: sharpness and spectrum share it, blocks included."""

from __future__ import annotations

import pytest
import torch

import flatcli.curvature.operators as ops
from flatcli.curvature.operators import OperatorCache
from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness
from flatcli.measures.spectrum import SpectrumConfig, compute_spectrum
from tests.cases import make_case


@pytest.fixture()
def builds(monkeypatch):
    """The (kind, loss) of every operator built, by counting make_operator calls."""
    seen: list[tuple] = []
    real = ops.make_operator

    def counting(*args, **kwargs):
        seen.append((args[0], kwargs.get("loss_fn")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "make_operator", counting)
    return seen


HUTCH = dict(
    diag_method="hutchinson",
    probes=8,
    probe_groups=2,
    trace_method="hutchinson",
    trace_probes=6,
    batch_size=12,
)


def test_sharpness_builds_one_hessian_when_the_losses_agree(builds) -> None:
    model, x, y = make_case("mlp_tanh")
    measures = ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace")
    res = compute_sharpness(
        model, x, y, SharpnessConfig(**HUTCH, normalized_loss="ce", loss="ce", measures=measures)
    )
    assert builds == [("hessian", "ce")]
    # the products are still counted per measure
    assert res.info["products"]["diagonal"] == 8
    assert res.info["products"]["hessian_trace"] == res.settings["hessian_trace"]["probes"]
    assert res.info["products"]["matrix_normalized_sharpness"] > 0


def test_sharpness_builds_one_hessian_per_loss(builds) -> None:
    model, x, y = make_case("mlp_tanh")
    measures = ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace")
    compute_sharpness(model, x, y, SharpnessConfig(**HUTCH, measures=measures))
    assert sorted(builds) == [("hessian", "ce"), ("hessian", "nsce")]


def test_exact_diag_and_exact_trace_share_the_operator(builds) -> None:
    model, x, y = make_case("mlp_tanh")
    cfg = SharpnessConfig(
        diag_method="exact",
        normalized_loss="ce",
        loss="ce",
        measures=("normalized_sharpness", "hessian_trace"),
        batch_size=12,
    )
    res = compute_sharpness(model, x, y, cfg)
    assert builds == [("hessian", "ce")]
    dense = ops.make_operator("hessian", model, x, y, loss_fn="ce").to_dense()
    assert res.values["hessian_trace"] == pytest.approx(float(torch.trace(dense)), rel=1e-10)


def test_shared_values_match_separately_built_operators() -> None:
    """The blocks give the numbers the separate per-layer operators gave (to rounding)."""
    from flatcli.curvature.trace import hutchinson

    model, x, y = make_case("mlp_tanh")
    cfg = SharpnessConfig(**HUTCH, measures=("matrix_normalized_sharpness",))
    res = compute_sharpness(model, x, y, cfg)
    traces = res.settings["matrix_normalized_sharpness"]["traces"]
    from flatcli.curvature.diagonal import group_seed

    for i, name in enumerate(traces):
        alone = ops.make_operator(
            "hessian",
            model,
            x,
            y,
            loss_fn="nsce",
            params=[name],
            batch_size=12,
            head_dtype=torch.float64,
        )
        est = hutchinson(alone, cfg.trace_probes, group_seed(cfg.seed, 1000 + i))
        assert traces[name] == pytest.approx(est.value, rel=1e-10, abs=1e-14)


def test_spectrum_per_layer_blocks_and_a_cache_shared_with_sharpness(builds) -> None:
    model, x, y = make_case("mlp_tanh")
    cache = OperatorCache(model, x, y, batch_size=12, seed=0)
    spec = compute_spectrum(
        model,
        x,
        y,
        SpectrumConfig(top_k=2, trace=True, probes=9, per_layer=True, batch_size=12),
        operators=cache,
    )
    assert builds == [("hessian", "ce")]
    dense = cache.get("hessian", loss_fn="ce", head_dtype=torch.float64).to_dense()
    for block in spec.per_layer:
        assert block.matvecs > 0
    top = float(torch.linalg.eigvalsh(dense)[-1])
    assert spec.eigenvalues[0] == pytest.approx(top, rel=1e-8)
    # the blocks count their own products; the full block's count holds the Lanczos products too
    assert spec.matvecs > spec.trace.matvecs + sum(b.matvecs for b in spec.per_layer)
    compute_sharpness(
        model,
        x,
        y,
        SharpnessConfig(**HUTCH, measures=("hessian_trace",)),
        operators=cache,
    )
    assert builds == [("hessian", "ce")]  # the sharpness trace reused the spectrum's operator


def test_spectrum_layers_may_name_frozen_parameters() -> None:
    model, x, y = make_case("mlp_tanh")
    model[1].weight.requires_grad_(False)
    cfg = SpectrumConfig(top_k=1, layers=("1",), batch_size=12)
    spec = compute_spectrum(model, x, y, cfg)
    dense = ops.make_operator("hessian", model, x, y, params=["1"], head_dtype=torch.float64)
    assert spec.num_params == dense.dim == model[1].weight.numel() + model[1].bias.numel()
    top = float(torch.linalg.eigvalsh(dense.to_dense())[-1])
    assert spec.eigenvalues[0] == pytest.approx(top, rel=1e-8)
