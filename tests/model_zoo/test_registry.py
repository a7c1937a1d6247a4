"""The registry: names, errors that list the valid names, keyword checks, documentation."""

from __future__ import annotations

import doctest
import inspect

import pytest
from torch import nn

import model_zoo
from model_zoo import registry

EXPECTED = {
    "cnn6",
    "densenet-bc",
    "gpt-small",
    "gpt-tiny",
    "lenet5",
    "lenet5-bn",
    "mlp",
    "resnet20",
    "vgg11",
    "wrn",
}
LANGUAGE = {"gpt-small", "gpt-tiny"}  # num_classes is the vocabulary (256 bytes); no in_channels


def test_list_models_sorted_and_complete() -> None:
    names = model_zoo.list_models()
    assert names == sorted(names)
    assert set(names) == EXPECTED


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(model_zoo.UnknownModelError) as info:
        model_zoo.get_model("foo")
    message = str(info.value)
    assert message.startswith("unknown model 'foo'; valid names: ")
    for name in model_zoo.list_models():
        assert name in message
    assert isinstance(info.value, ValueError)
    assert info.value.valid == model_zoo.list_models()


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(model_zoo.UnknownModelError, match="did you mean 'resnet20'"):
        model_zoo.get_model("resnet2")


@pytest.mark.parametrize("alias", ["LeNet5_BN", " lenet5-bn ", "LENET5-BN"])
def test_names_are_case_and_underscore_insensitive(alias: str) -> None:
    assert model_zoo.get_model_builder(alias) is model_zoo.get_model_builder("lenet5-bn")


def test_unknown_kwarg_is_a_type_error_naming_it_and_the_accepted_ones() -> None:
    with pytest.raises(TypeError) as info:
        model_zoo.get_model("lenet5", num_class=10)
    message = str(info.value)
    assert "'num_class'" in message
    assert "accepted: num_classes, in_channels, input_size, activation" in message


def test_two_unknown_kwargs_are_both_named() -> None:
    with pytest.raises(TypeError, match="arguments 'a', 'b'; accepted: "):
        model_zoo.get_model("cnn6", a=1, b=2)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builders_are_keyword_only_and_documented(name: str) -> None:
    builder = model_zoo.get_model_builder(name)
    params = inspect.signature(builder).parameters
    if name in LANGUAGE:
        assert {"num_classes", "input_shape"} <= set(params) and "in_channels" not in params
        assert params["num_classes"].default == 256
    else:
        assert {"num_classes", "in_channels"} <= set(params)
        assert params["num_classes"].default == 10
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    doc = inspect.getdoc(builder) or ""
    assert "Args:" in doc
    for p in params:
        assert f"{p}:" in doc, f"{name}: argument {p} not documented"
    years = ("1998", "2015", "2016", "2017", "2019", "2020", "arXiv")
    assert any(year in doc for year in years), name
    assert model_zoo.model_kwargs(name) == {k: p.default for k, p in params.items()}


def test_register_model_adds_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @model_zoo.register_model("tiny")
    def tiny(*, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
        return nn.Linear(in_channels, num_classes)

    assert "tiny" in model_zoo.list_models()
    assert model_zoo.get_model("tiny", num_classes=3).out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        model_zoo.register_model("tiny")(tiny)


def test_register_model_refuses_positional_arguments_and_bad_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(TypeError, match="keyword-only"):
        model_zoo.register_model("positional")(lambda num_classes=10: nn.Identity())
    with pytest.raises(ValueError, match="lower case"):
        model_zoo.register_model("Bad_Name")(lambda *, num_classes=10: nn.Identity())


def test_package_docstring_examples() -> None:
    result = doctest.testmod(model_zoo, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
