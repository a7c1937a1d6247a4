"""What each family's builder promises beyond the registry-wide tests."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import model_zoo

from .shapes import batch, num_params


def test_lenet5_bn_follows_table_5() -> None:
    """BatchNorm without affine parameters right after each ReLU (K-FAC paper, Table 5)."""
    model = model_zoo.get_model("lenet5-bn", in_channels=3)
    names = [n for n, _ in model.named_children()]
    assert names == [
        "conv1", "act1", "bn1", "pool1", "conv2", "act2", "bn2", "pool2", "flatten",
        "fc1", "act3", "bn3", "fc2", "act4", "bn4", "fc3",
    ]  # fmt: skip
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert [m.num_features for m in bns] == [6, 16, 120, 84]
    assert all(not m.affine and m.track_running_stats for m in bns)


def test_lenet5_input_sizes() -> None:
    assert model_zoo.get_model("lenet5").conv1.padding == (2, 2)  # MNIST default
    assert model_zoo.get_model("lenet5", in_channels=3).conv1.padding == (0, 0)
    padded = model_zoo.get_model("lenet5", input_size=32).eval()  # MNIST padded to 32x32
    assert padded(batch((1, 32, 32))).shape == (2, 10)
    with pytest.raises(ValueError, match=r"built for \(N, C, 28, 28\) inputs"):
        model_zoo.get_model("lenet5")(batch((1, 32, 32)))
    with pytest.raises(ValueError, match="input_size must be 28 .* Got 30"):
        model_zoo.get_model("lenet5", input_size=30)


@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus", model_zoo.Activation.TANH])
def test_activation_choices(activation) -> None:
    for name in ("mlp", "lenet5"):
        model = model_zoo.get_model(name, activation=activation)
        kinds = {type(m) for m in model.modules()} & {nn.ReLU, nn.Tanh, nn.Softplus}
        assert kinds == {{"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}[activation]}


def test_unknown_activation_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="one of relu, tanh, softplus. Got 'gelu'"):
        model_zoo.get_model("mlp", activation="gelu")


def test_mlp_input_options() -> None:
    assert model_zoo.get_model("mlp").in_features == 784
    assert model_zoo.get_model("mlp", in_channels=3).in_features == 3072
    assert model_zoo.get_model("mlp", input_shape=(2, 5, 5)).in_features == 50
    assert model_zoo.get_model("mlp", in_features=6, hidden=[5, 4]).in_features == 6
    with pytest.raises(ValueError, match="disagrees"):
        model_zoo.get_model("mlp", in_features=6, input_shape=(7,))
    linear = model_zoo.get_model("mlp", hidden=[])
    assert [type(m) for m in linear] == [nn.Flatten, nn.Linear]
    with pytest.raises(ValueError, match="784 features per example"):
        model_zoo.get_model("mlp")(batch((3, 32, 32)))


def test_mlp_batchnorm_follows_the_activation() -> None:
    model = model_zoo.get_model("mlp", hidden=[8, 8], batchnorm=True)
    assert [n for n, _ in model.named_children()] == [
        "flatten", "fc1", "act1", "bn1", "fc2", "act2", "bn2", "fc3",
    ]  # fmt: skip
    assert not model.bn1.affine
    assert num_params(model) == num_params(model_zoo.get_model("mlp", hidden=[8, 8]))


def test_cnn6_is_plain_by_default() -> None:
    model = model_zoo.get_model("cnn6")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 192, 192]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    pools = [n for n, m in model.named_children() if isinstance(m, nn.MaxPool2d)]
    assert pools == ["pool1", "pool2"]
    with_bn = model_zoo.get_model("cnn6", batchnorm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 6


def test_resnet_options() -> None:
    a = model_zoo.get_model("resnet20")
    b = model_zoo.get_model("resnet20", shortcut="B")
    assert num_params(b) - num_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    pre = model_zoo.get_model("resnet20", preact=True).eval()
    assert pre(batch((3, 32, 32))).shape == (2, 10)
    deep = model_zoo.get_model("resnet20", depth=32)
    assert len(deep.layer1) == 5
    with pytest.raises(ValueError, match="6n\\+2 .* Got 21"):
        model_zoo.get_model("resnet20", depth=21)
    with pytest.raises(ValueError, match="'A' or 'B'. Got 'C'"):
        model_zoo.get_model("resnet20", shortcut="C")


def test_wrn_options() -> None:
    model = model_zoo.get_model("wrn", depth=16, widen_factor=4, dropout=0.3)
    assert len(model.block1) == 2 and model.fc.in_features == 256
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 6
    assert not any(isinstance(m, nn.Dropout) for m in model_zoo.get_model("wrn").modules())
    with pytest.raises(ValueError, match="6N\\+4 .* Got 27"):
        model_zoo.get_model("wrn", depth=27)
    with pytest.raises(ValueError, match="dropout must be a number in \\[0, 1\\). Got 1.5"):
        model_zoo.get_model("wrn", dropout=1.5)


def test_densenet_options() -> None:
    model = model_zoo.get_model("densenet-bc", depth=40, growth_rate=12)
    assert len(model.block1) == 6
    assert model.trans1.conv.out_channels == (24 + 6 * 12) // 2
    with pytest.raises(ValueError, match="compression must be a number in \\(0, 1\\]"):
        model_zoo.get_model("densenet-bc", compression=0)


def test_vgg11_refuses_inputs_below_32() -> None:
    model = model_zoo.get_model("vgg11", in_channels=1)
    with pytest.raises(ValueError, match="H, W >= 32; got \\(2, 1, 28, 28\\)"):
        model(batch((1, 28, 28)))
    plain = model_zoo.get_model("vgg11", batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in plain.modules()) == 8
    assert plain.classifier.in_features == 512


@pytest.mark.parametrize(
    ("name", "kwargs", "quoted"),
    [
        ("lenet5", {"num_classes": 0}, "Got 0."),
        ("cnn6", {"in_channels": 0}, "Got 0."),
        ("wrn", {"widen_factor": 2.5}, "Got 2.5."),
        ("mlp", {"hidden": [10, -1]}, "Got -1."),
        ("mlp", {"hidden": "10"}, "Got '10'."),
        ("densenet-bc", {"depth": 99}, "Got 99."),
        ("resnet20", {"num_classes": True}, "Got True."),
    ],
)
def test_bad_values_are_value_errors_quoting_them(name: str, kwargs: dict, quoted: str) -> None:
    with pytest.raises(ValueError, match=re.escape(quoted)):
        model_zoo.get_model(name, **kwargs)


def test_size_agnostic_models_take_other_sizes() -> None:
    for name in ("cnn6", "resnet20", "wrn", "densenet-bc"):
        model = model_zoo.get_model(name, in_channels=1).eval()
        with torch.no_grad():
            assert model(batch((1, 12, 12))).shape == (2, 10)
