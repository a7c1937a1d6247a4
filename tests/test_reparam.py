"""Function-preserving reparametrisations, and which sharpness measures they leave unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flatcli.errors import UsageError
from flatcli.measures.invariance import audit_invariance
from flatcli.measures.sharpness import SharpnessConfig
from flatcli.reparam import (
    apply_transform,
    bn_scale,
    default_layer_alphas,
    layer_scale,
    max_logit_difference,
    neuron_scale,
    trace_chain,
    weight_layers,
)
from tests.cases import make_case, randomize_batchnorm


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3),
    )


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )


class _Functional(nn.Module):
    """A LeNet-style forward written with functional calls and a view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x + F.relu(self.a(x)))


def _build(factory, seed: int = 0):
    torch.manual_seed(seed)
    model = factory().double()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_batchnorm(m, g)
    model.eval()
    shape = (6,) if factory is _mlp or factory is _Residual else (2, 4, 4)
    x = torch.randn((24, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, x, y


NETS = {"mlp": _mlp, "cnn": _cnn, "bn": _bn_net, "functional": _Functional}


def _transforms(name: str):
    out = [
        ("layer_scale", lambda m: layer_scale(m, default_layer_alphas(m, 7.0))),
        ("neuron_scale", lambda m: neuron_scale(m, 5.0, seed=1)),
        ("neuron_scale_per_unit", lambda m: neuron_scale(m, [0.1, 3.0], neurons=[0, 2], layer=0)),
        (
            "neuron_scale_last",
            lambda m: neuron_scale(m, 4.0, layer=len(weight_layers(m)) - 2, neurons=2),
        ),
    ]
    if name == "bn":
        out.append(("bn_scale", lambda m: bn_scale(m, 13.0)))
    return out


@pytest.mark.parametrize("net", list(NETS))
def test_transforms_preserve_the_logits(net: str) -> None:
    model, x, y = _build(NETS[net])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, fn in _transforms(net):
        other = fn(model)
        assert other is not model
        diff = max_logit_difference(model, other, x)
        assert diff < 1e-10, (name, diff)
        changed = any(not torch.equal(before[k], v) for k, v in other.state_dict().items())
        assert changed, name
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(before[k], v)


def test_layer_scale_biases_follow_dinh_appendix_b() -> None:
    model, x, _ = _build(_mlp)
    other = layer_scale(model, [2.0, 3.0, 1 / 6])
    torch.testing.assert_close(other[1].weight, 2 * model[1].weight)
    torch.testing.assert_close(other[1].bias, 2 * model[1].bias)
    torch.testing.assert_close(other[3].weight, 3 * model[3].weight)
    torch.testing.assert_close(other[3].bias, 6 * model[3].bias)  # product of the alphas so far
    torch.testing.assert_close(other[5].bias, model[5].bias)
    assert max_logit_difference(model, other, x) < 1e-12
    by_name = layer_scale(model, {"1": 4.0, "5": 0.25})
    assert max_logit_difference(model, by_name, x) < 1e-12


def test_neuron_scale_matches_eqs_15_16() -> None:
    model, _, _ = _build(_mlp)
    other = neuron_scale(model, 10.0, layer="1", neurons=[0, 3])
    w1, w2 = model[1].weight, model[3].weight
    torch.testing.assert_close(other[1].weight[[0, 3]], w1[[0, 3]] / 10)
    torch.testing.assert_close(other[1].weight[[1, 2, 4]], w1[[1, 2, 4]])
    torch.testing.assert_close(other[1].bias[[0, 3]], model[1].bias[[0, 3]] / 10)
    torch.testing.assert_close(other[3].weight[:, [0, 3]], w2[:, [0, 3]] * 10)
    torch.testing.assert_close(other[3].weight[:, [1, 2, 4]], w2[:, [1, 2, 4]])


def test_neuron_scale_through_batchnorm_scales_its_affine_rows() -> None:
    model, x, _ = _build(_bn_net)
    other = neuron_scale(model, 6.0, layer=0, neurons=[1])
    torch.testing.assert_close(other[0].weight, model[0].weight)  # the conv is untouched
    torch.testing.assert_close(other[1].weight[1], model[1].weight[1] / 6)
    torch.testing.assert_close(other[4].weight[:, 1], model[4].weight[:, 1] * 6)
    assert max_logit_difference(model, other, x) < 1e-10


def test_bn_scale_keeps_eps_and_sets_running_var() -> None:
    model, x, _ = _build(_bn_net)
    other = bn_scale(model, 3.0)
    torch.testing.assert_close(other[0].weight, 3 * model[0].weight)
    eps = model[1].eps
    assert other[1].eps == eps  # a checkpoint can store the result
    torch.testing.assert_close(other[1].running_var, 9 * (model[1].running_var + eps) - eps)
    torch.testing.assert_close(other[1].running_mean, 3 * model[1].running_mean)
    assert max_logit_difference(model, other, x) < 1e-10  # eval mode


def test_bn_scale_refuses_a_negative_running_var() -> None:
    model, _, _ = _build(_bn_net)
    with torch.no_grad():
        model[1].running_var.fill_(1e-8)
    with pytest.raises(UsageError, match="negative"):
        bn_scale(model, 0.01)


def test_chain_tracing() -> None:
    kinds = [op.kind for op in trace_chain(_Functional())]
    assert kinds == [
        "layer",
        "homogeneous",
        "homogeneous",
        "flatten",
        "layer",
        "homogeneous",
        "layer",
    ]
    assert weight_layers(_cnn()) == ["0", "3", "6"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: layer_scale(_build(_Residual)[0], [2.0, 0.5]), "residual"),
        (lambda: neuron_scale(_build(_Residual)[0], 2.0), "residual"),
        (
            lambda: layer_scale(make_case("mlp_tanh")[0], [2.0, 0.5, 1.0]),
            "not positively homogeneous",
        ),
        (lambda: default_layer_alphas(make_case("mlp_tanh")[0], 2.0), "smooth activation"),
        (lambda: neuron_scale(make_case("mlp_tanh")[0], 2.0), "homogeneous"),
        (
            lambda: neuron_scale(make_case("mlp_tanh")[0], 2.0, layer="1"),
            "not positively homogeneous",
        ),
        (lambda: layer_scale(_build(_bn_net)[0], [2.0, 0.5, 1.0]), "BatchNorm"),
        (lambda: layer_scale(_build(_mlp)[0], [2.0, 1.0, 1.0]), "multiply to 1"),
        (lambda: layer_scale(_build(_mlp)[0], [2.0, 0.5]), "one per layer"),
        (lambda: layer_scale(_build(_mlp)[0], [-1.0, -1.0, 1.0]), "positive"),
        (lambda: bn_scale(_build(_mlp)[0], 2.0), "no BatchNorm"),
        (lambda: neuron_scale(_build(_mlp)[0], 2.0, neurons=[9]), "distinct indices"),
        (lambda: apply_transform(_build(_mlp)[0], "rotate", 2.0), "Unknown transform"),
    ],
)
def test_refusals(call, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        call()


# --------------------------------------------------------------------------- invariance audit

FAST = dict(trace_probes=20, eps_steps=5, adaptive_steps=5, batch_size=24, diag_method="exact")


def _rows(audit):
    return {r.measure: r for r in audit.rows}


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_audit_layer_and_neuron_scale(net: str) -> None:
    model, x, y = _build(NETS[net])
    config = SharpnessConfig(**FAST)
    layer = _rows(audit_invariance(model, x, y, config, "layer_scale", alpha=10.0))
    neuron = _rows(audit_invariance(model, x, y, config, "neuron_scale", alpha=10.0, seed=2))
    for rows in (layer, neuron):
        assert rows["normalized_sharpness"].rel_change < 1e-6
        assert rows["normalized_sharpness"].invariant
        assert rows["adaptive_sharpness"].rel_change < 1e-9  # elementwise-adaptive: invariant too
        assert not rows["hessian_trace"].invariant and rows["hessian_trace"].rel_change > 0.1
        assert not rows["eps_sharpness"].invariant and rows["eps_sharpness"].rel_change > 1e-3
    # §5.1: per-matrix normalisation survives layer scaling but not neuron scaling
    assert layer["matrix_normalized_sharpness"].rel_change < 1e-6
    assert neuron["matrix_normalized_sharpness"].rel_change > 0.01
    assert not neuron["matrix_normalized_sharpness"].invariant


def test_audit_bn_net() -> None:
    model, x, y = _build(_bn_net)
    measures = ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace")
    config = SharpnessConfig(**FAST, measures=measures)
    bn = audit_invariance(model, x, y, config, "bn_scale", alpha=0.1)
    assert bn.max_logit_difference < 1e-10
    rows = _rows(bn)
    assert rows["normalized_sharpness"].rel_change < 1e-6
    assert rows["matrix_normalized_sharpness"].rel_change < 1e-6
    assert not rows["hessian_trace"].invariant
    config = SharpnessConfig(**FAST, measures=("normalized_sharpness",))
    neuron = _rows(audit_invariance(model, x, y, config, "neuron_scale", alpha=10.0))
    assert neuron["normalized_sharpness"].rel_change < 1e-6
    metrics = bn.metrics()
    assert "max_logit_difference" in metrics and "normalized_sharpness_rel_change" in metrics
    assert bn.details()["rows"][0]["threshold"].startswith("rel_change <=")


def _tied() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    net[2].weight = net[0].weight
    return net


@pytest.mark.parametrize(
    "call",
    [
        lambda net: layer_scale(net, [2.0, 0.5, 1.0]),
        lambda net: neuron_scale(net, 2.0),
        lambda net: apply_transform(net, "layer-scale", 2.0),
    ],
)
def test_tied_weights_are_refused(call) -> None:
    # Scaling layer 0 would also scale layer 2 through the shared weight: not the same function.
    with pytest.raises(UsageError, match=r"ties 2\.weight to 0\.weight"):
        call(_tied())
