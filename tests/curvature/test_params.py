"""Parameter selection and flat-vector helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatcli.curvature.params import (
    flatten_columns,
    flatten_params,
    param_slices,
    parameter_shapes,
    select_parameters,
    unflatten,
    unflatten_columns,
)
from flatcli.errors import UsageError


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),  # "features"-like block "0"
        nn.Flatten(),
        nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)),
    )


def test_select_by_module_name_glob_and_parameter_name():
    net = _net()
    all_names = [n for n, _ in net.named_parameters()]
    assert select_parameters(net, None) == all_names
    assert select_parameters(net, "0.0") == ["0.0.weight", "0.0.bias"]
    assert select_parameters(net, "0") == ["0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias"]
    assert select_parameters(net, "2.*") == ["2.0.weight", "2.0.bias", "2.2.weight", "2.2.bias"]
    assert select_parameters(net, "*.bias") == [n for n in all_names if n.endswith("bias")]
    assert select_parameters(net, ["2.2.weight", "0.1"]) == ["0.1.weight", "0.1.bias", "2.2.weight"]
    assert select_parameters(net, "*") == all_names


def test_none_skips_frozen_parameters_but_names_select_them():
    net = _net()
    net[0][0].weight.requires_grad_(False)
    assert "0.0.weight" not in select_parameters(net, None)
    assert select_parameters(net, "0.0") == ["0.0.weight", "0.0.bias"]


def test_unknown_pattern_lists_module_names():
    with pytest.raises(UsageError) as info:
        select_parameters(_net(), ["2.0", "layer9"])
    msg = str(info.value)
    assert "'layer9'" in msg and "modules with parameters: 0.0, 0.1, 2.0, 2.2" in msg
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match="Unknown parameter names"):
        parameter_shapes(_net(), ["2.0.weight", "nope"])


def test_flatten_unflatten_round_trip():
    net = _net()
    names = select_parameters(net, "2")
    shapes = parameter_shapes(net, names)
    named = dict(net.named_parameters())
    flat = flatten_params({n: named[n] for n in names})
    assert flat.shape == (8 * 4 + 4 + 4 * 3 + 3,)
    back = unflatten(flat, shapes)
    assert list(back) == names
    for n in names:
        assert torch.equal(back[n], named[n])
    sl = param_slices(shapes)
    assert sl["2.0.bias"] == slice(32, 36) and sl["2.2.bias"] == slice(48, 51)
    with pytest.raises(ValueError, match=r"shape \(51,\)"):
        unflatten(flat[:-1], shapes)


def test_columns_round_trip():
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    V = torch.arange(30.0).reshape(10, 3)
    cols = unflatten_columns(V, shapes)
    assert cols["a"].shape == (3, 2, 3) and cols["b"].shape == (3, 4)
    assert torch.equal(cols["a"][1].reshape(-1), V[:6, 1])
    assert torch.equal(flatten_columns(cols), V)
