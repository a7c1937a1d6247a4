"""Learning-rate schedules: exact values per epoch."""

from __future__ import annotations

import math

import pytest

from flatcli.train import TrainConfig, lr_at


def test_constant():
    config = TrainConfig(lr=0.2, epochs=5)
    assert [lr_at(config, e) for e in range(5)] == [0.2] * 5


def test_step_drops_at_each_milestone():
    config = TrainConfig(lr=0.1, schedule="step", milestones=[2, 4], gamma=0.5, epochs=6)
    assert [lr_at(config, e) for e in range(6)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-15
    )


def test_step_like_the_fisher_paper():
    """Appendix E: lr 0.01, divided by 10 at epoch 100 and 150, 200 epochs."""
    config = TrainConfig(lr=0.01, schedule="step", milestones=[100, 150], epochs=200)
    assert lr_at(config, 99) == 0.01
    assert lr_at(config, 100) == pytest.approx(1e-3)
    assert lr_at(config, 149) == pytest.approx(1e-3)
    assert lr_at(config, 150) == pytest.approx(1e-4)
    assert lr_at(config, 199) == pytest.approx(1e-4)


def test_cosine():
    config = TrainConfig(lr=1.0, schedule="cosine", epochs=4)
    expected = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert [lr_at(config, e) for e in range(4)] == pytest.approx(expected, rel=1e-15)
    assert expected == pytest.approx([1.0, 0.8535533905932737, 0.5, 0.14644660940672624])


def test_negative_epoch():
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        lr_at(TrainConfig(), -1)
