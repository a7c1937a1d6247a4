"""The up-front cost line of ``pacbayes`` (issue #22, item 6)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from flatcli.pacbayes import cost
from flatcli.pacbayes.cost import PacBayesCost, announce_cost, count_passes, time_forward


def test_passes_count_every_stage_and_share_the_samples_over_processes():
    run = dict(
        n=100,
        prior_examples=40,
        prior_epochs=2,
        epochs=3,
        bound_examples=60,
        mc_samples=10,
        test_examples=20,
        test_mc_samples=5,
    )
    one = count_passes(**run)
    two = count_passes(**run, processes=2)
    assert one == (3 * 2 * 40, 3 * 3 * 100, 10 * 60, 5 * 20)
    assert two == (one[0], one[1], one[2] / 2, one[3] / 2)


def test_line_names_the_time_the_monte_carlo_share_and_the_cheaper_options():
    c = PacBayesCost(prior=0, posterior=250, monte_carlo=750, test=0, seconds_per_example=0.02)
    assert c.seconds == pytest.approx(20.0)
    line = c.line()
    assert "1,000 example forward passes" in line and "≈ 20 s" in line
    assert "Monte Carlo 75%" in line and "--mc-samples" in line


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_timing_leaves_the_model_as_it_was():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert time_forward(net, torch.randn(32, 4)) > 0
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(("threshold", "warns"), [(0.0, True), (1e9, False)])
def test_warns_only_above_the_threshold(monkeypatch, threshold, warns):
    monkeypatch.setattr(cost, "WARN_SECONDS", threshold)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = announce_cost(
            _net(),
            torch.randn(64, 4),
            prior_examples=32,
            prior_epochs=1,
            epochs=1,
            mc_samples=10,
            test_examples=0,
            test_mc_samples=0,
        )
    lines = [str(w.message) for w in seen if "pacbayes: about" in str(w.message)]
    assert len(lines) == (1 if warns else 0)
    assert got.monte_carlo == 10 * 32 and got.prior == 3 * 32
