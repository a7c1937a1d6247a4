"""The invariance audit as a measure of its own (``flatcli.measures.invariance``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatcli.reparam
from flatcli.errors import UsageError
from flatcli.measures import invariance
from flatcli.measures.invariance import (
    InvarianceConfig,
    audit_invariance,
    compute_invariance,
    default_rtol,
)
from flatcli.measures.registry import get_measure, reported_keys
from flatcli.measures.sharpness import SharpnessConfig

FAST = dict(trace_probes=20, eps_steps=3, adaptive_steps=3, diag_method="exact")


def _relu_mlp(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    return model.to(dtype).eval(), x.to(dtype), y


def test_reparam_leaves_the_audit_to_the_measures() -> None:
    # reparam is the lower layer: the audit (which computes sharpness) imports it, not the
    # other way round, so it is not importable from flatcli.reparam
    assert not hasattr(flatcli.reparam, "audit_invariance")
    assert invariance.audit_invariance is audit_invariance


def test_compute_invariance_equals_the_audit() -> None:
    model, x, y = _relu_mlp()
    sharp = SharpnessConfig(**FAST, measures=("normalized_sharpness", "hessian_trace"))
    config = InvarianceConfig(sharpness=sharp, transform="neuron-scale", alpha=4.0, seed=2)
    res = compute_invariance(model, x, y, config)
    ref = audit_invariance(model, x, y, sharp, "neuron_scale", 4.0, 2, rtol=1e-6)
    assert res.metrics() == ref.metrics()
    assert res.transform == "neuron_scale" and res.alpha == 4.0
    rows = {r.measure: r for r in res.rows}
    assert rows["normalized_sharpness"].invariant and rows["normalized_sharpness"].rel_change < 1e-6
    assert not rows["hessian_trace"].invariant
    assert res.max_logit_difference < 1e-10
    assert set(res.metrics()) == set(reported_keys(get_measure("invariance"), config))


def test_progress_names_the_model_being_measured() -> None:
    model, x, y = _relu_mlp()
    sharp = SharpnessConfig(**FAST, measures=("hessian_trace",))
    seen: list[str] = []
    audit_invariance(model, x, y, sharp, progress=lambda d, *_: seen.append(d))
    assert any(d.startswith("original:") for d in seen)
    assert any(d.startswith("transformed:") for d in seen)


def test_registered_with_every_rel_change_key() -> None:
    measure = get_measure("invariance")
    assert measure.config_type is InvarianceConfig
    assert measure.command == "sharpness --invariance"
    keys = set(measure.keys)
    assert "max_logit_difference" in keys and "normalized_sharpness_rel_change" in keys
    assert len(keys) == 1 + 5


def test_default_rtol_follows_the_dtype() -> None:
    assert default_rtol(_relu_mlp(torch.float64)[0]) == 1e-6
    assert default_rtol(_relu_mlp(torch.float32)[0]) == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transform": "rotate"}, "Unknown transform"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"neurons": 0}, "neurons"),
        ({"rtol": -1.0}, "rtol"),
        ({"k_stderr": 0.0}, "k_stderr"),
        ({"sharpness": {"measures": ()}}, "SharpnessConfig"),
    ],
)
def test_config_validation(kwargs, message) -> None:
    with pytest.raises(UsageError, match=message):
        InvarianceConfig(**kwargs)


def test_config_to_dict_is_json_ready() -> None:
    import json

    d = InvarianceConfig(transform="bn-scale").to_dict()
    assert d["transform"] == "bn_scale" and d["sharpness"]["measures"][0] == "normalized_sharpness"
    json.dumps(d)
