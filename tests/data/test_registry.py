"""Names, the data directory and the normalization argument of load_dataset."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import flatcli.data.normalization
import flatcli.data.registry
import flatcli.data.splits
from flatcli.data import default_data_dir, list_datasets, load_dataset
from flatcli.errors import UsageError


def test_list_datasets():
    names = list_datasets()
    assert names == [
        "mnist5k",
        "mnist5k-2",
        "mnist",
        "mnist-2",
        "fashion-mnist",
        "fashion-mnist-2",
        "cifar10",
        "cifar100",
        "svhn",
        "python-license",
    ]
    assert list_datasets(include_patterns=True)[-3:] == [
        "text:PATH",
        "imagefolder:PATH",
        "tensors:PATH",
    ]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UsageError) as info:
        load_dataset("imagenet")
    assert info.value.exit_code == 2
    for name in list_datasets(include_patterns=True):
        assert name in str(info.value)
    with pytest.raises(UsageError, match="needs a path"):
        load_dataset("tensors:")


def test_names_are_forgiving_about_case():
    assert load_dataset("MNIST5K_2", normalization=None).name == "mnist5k-2"


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLATCLI_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("FLATCLI_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "flatcli" / "data"


@pytest.mark.parametrize(
    "bad,match",
    [
        ("usual", "'default', None or a dict"),
        ({"mean": [0.1]}, "exactly the keys"),
        ({"mean": [0.1, 0.2], "std": [0.3, 0.3]}, "2 values but dataset 'mnist5k' has 1"),
        ({"mean": [0.1], "std": [0.0]}, "positive"),
        ({"mean": ["a"], "std": [1.0]}, "numbers"),
        ({"mean": [float("nan")], "std": [1.0]}, "finite"),
    ],
)
def test_bad_normalization(bad, match):
    with pytest.raises(UsageError, match=match):
        load_dataset("mnist5k", normalization=bad)


def test_scalar_normalization_is_accepted():
    ds = load_dataset("mnist5k", normalization={"mean": 0.5, "std": 0.5})
    assert ds.normalization == {"mean": [0.5], "std": [0.5]}


@pytest.mark.parametrize(
    "module", [flatcli.data.splits, flatcli.data.registry, flatcli.data.normalization]
)
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
