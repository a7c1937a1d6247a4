"""TrainConfig: defaults, JSON round trip, and a clear UsageError for every bad value."""

from __future__ import annotations

import json

import pytest
import torch

from flatcli.errors import UsageError
from flatcli.train import DEFAULT_LR, Augment, Optimizer, Schedule, TrainConfig


def test_defaults_are_valid_and_json_serialisable():
    config = TrainConfig()
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert (
        data["optimizer"] == "sgd" and data["schedule"] == "constant" and data["augment"] == "none"
    )
    assert data["lr"] == DEFAULT_LR[Optimizer.SGD]
    assert TrainConfig.from_dict(data) == config


def test_lr_none_resolves_per_optimizer_and_strings_become_enums():
    config = TrainConfig(optimizer="adam", schedule="cosine", augment="crop4-flip")
    assert config.optimizer is Optimizer.ADAM and config.lr == DEFAULT_LR[Optimizer.ADAM]
    assert config.schedule is Schedule.COSINE
    assert config.augment is Augment.CROP4_FLIP and config.augment.padding == 4
    assert Augment("crop1-flip").padding == 1 and Augment("flip").padding == 0
    assert Augment("flip").flip and not Augment("none").flip
    assert TrainConfig(lr=0.3).lr == 0.3


def test_dtype_and_device():
    assert TrainConfig(dtype="float64").torch_dtype is torch.float64
    auto = TrainConfig(device="auto").device
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UsageError, match="Unknown training option.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


BAD = [
    ({"optimizer": "rmsprop"}, "optimizer must be one of 'sgd', 'adam'. Got 'rmsprop'"),
    ({"schedule": "linear"}, "schedule must be one of"),
    ({"augment": "crop8"}, "augment must be one of"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"momentum": 0.0, "nesterov": True}, "nesterov needs a momentum"),
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ({"schedule": "step"}, "schedule 'step' needs milestones"),
    ({"milestones": [10]}, "milestones only apply to schedule 'step'"),
    ({"schedule": "step", "milestones": [20, 10]}, "strictly increasing"),
    ({"schedule": "step", "milestones": [0]}, "positive whole epochs"),
    ({"schedule": "step", "milestones": [5], "gamma": 0}, r"gamma must be in \(0, 1\]"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"epochs": 2.5}, "epochs must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"random_labels": 1.5}, r"random_labels must be a fraction in \[0, 1\]"),
    ({"train_subset": 0}, "train_subset must be"),
    ({"confusion_size": -1}, "confusion_size must be"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"reg_beta": -1}, "reg_beta must be >= 0"),
    ({"reg_alpha": 0}, "reg_alpha must be > 0"),
    ({"reg_subbatches": 0}, "reg_subbatches must be >= 1"),
    ({"fisher_reg": True, "reg_subbatches": 8, "batch_size": 4}, "cannot exceed batch_size"),
    ({"clip": 0}, "clip must be a positive gradient norm"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"dtype": "float16"}, "dtype must be one of"),
    ({"device": "gpu0"}, "device must be"),
    ({"target_train_acc": 1.5}, r"target_train_acc must be an accuracy in \(0, 1\]"),
    ({"log_every": 0}, "log_every must be >= 1"),
    ({"fisher_reg": "yes"}, "fisher_reg must be true or false"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[str(k) for k, _ in BAD])
def test_bad_values_raise_usage_errors_that_name_the_option(kwargs, message):
    with pytest.raises(UsageError, match=message) as info:
        TrainConfig(**kwargs)
    assert info.value.exit_code == 2
