"""The measure registry: complete, consistent with what each measure really reports."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from flatcli.errors import UsageError
from flatcli.measures import registry
from flatcli.measures.registry import (
    Direction,
    Measure,
    Metric,
    all_measures,
    compute,
    find_metric,
    get_measure,
    make_config,
    reported_keys,
)
from tests.cases import make_case


@pytest.fixture()
def run():
    """A Run-like object (what a measure's compute reads) on a tiny float64 problem."""
    model, x, y = make_case("mlp_tanh", n=12)
    return SimpleNamespace(model=model, x=x, y=y, seed=0, batch_size=None)


def test_every_measure_is_registered_with_directions_sources_and_costs():
    curvature = {
        "gamma",
        "spectrum",
        "normalized_sharpness",
        "matrix_normalized_sharpness",
        "hessian_trace",
        "eps_sharpness",
        "adaptive_sharpness",
    }
    assert curvature <= {m.name for m in all_measures()}
    for m in all_measures():
        assert m.cost and m.command and dataclasses.is_dataclass(m.config_type)
        for metric in m.metrics:
            assert isinstance(metric.direction, Direction) and metric.description
            # a flatness measure cites where it comes from; diagnostics may say "-"
            assert metric.source != "-" or metric.direction is Direction.NEUTRAL
        if m.name in curvature:  # the headline number is a sharpness measure with its paper
            assert m.metrics[0].direction is Direction.SHARPER and "20" in m.metrics[0].source


def test_known_sources_and_directions():
    assert find_metric("gamma_hat")[1].source == "Jia & Su 2020, Eq. 5"
    assert find_metric("normalized_sharpness")[1].source == "Tsuzuku et al. 2020, Eq. 17"
    assert find_metric("matrix_normalized_sharpness")[1].source == "Tsuzuku et al. 2020, Eq. 13"
    assert find_metric("hessian_trace")[1].source == "Tsuzuku et al. 2020, Eq. 5"
    assert find_metric("top_eigenvalue")[0].name == "spectrum"
    assert find_metric("gamma_hat_std")[1].direction is Direction.NEUTRAL
    assert find_metric("num_params")[1] is registry.NUM_PARAMS


def test_unknown_names_are_usage_errors_that_list_the_valid_ones():
    with pytest.raises(UsageError, match="gamma") as e:
        get_measure("nosuch")
    assert "spectrum" in str(e.value)
    with pytest.raises(UsageError, match="top_eigenvalue"):
        find_metric("nosuch")
    with pytest.raises(UsageError, match="samples"):
        make_config(get_measure("gamma"), None, sample=3)


def test_register_refuses_duplicates():
    gamma = get_measure("gamma")
    with pytest.raises(ValueError, match="twice"):
        registry.register(gamma)
    clash = dataclasses.replace(
        gamma,
        name="other",
        metrics=(Metric("gamma_hat", Direction.FLATTER, "x", "a different gamma_hat"),),
    )
    with pytest.raises(ValueError, match="gamma_hat"):
        registry.register(clash)
    repeated = dataclasses.replace(gamma, name="other", metrics=(registry.NUM_PARAMS,) * 2)
    with pytest.raises(ValueError, match="twice"):
        registry.register(repeated)
    assert "other" not in {m.name for m in all_measures()}


def test_a_shared_identical_metric_may_be_registered_by_several_measures(monkeypatch):
    monkeypatch.setattr(registry, "_MEASURES", dict(registry._MEASURES))
    extra = Measure(
        name="extra",
        command="extra",
        config_type=get_measure("gamma").config_type,
        compute=lambda run, config, progress: None,
        metrics=(registry.NUM_PARAMS,),
        cost="nothing",
    )
    assert registry.register(extra) is extra
    assert get_measure("extra") is extra


def test_make_config_takes_seed_and_batch_size_from_the_run(run):
    run.seed, run.batch_size = 7, 5
    cfg = make_config(get_measure("spectrum"), run, top_k=2)
    assert (cfg.seed, cfg.batch_size, cfg.top_k) == (7, 5, 2)
    cfg = make_config(get_measure("spectrum"), run, seed=1)
    assert cfg.seed == 1


@pytest.mark.parametrize(
    "name, options",
    [
        ("gamma", {"samples": 6, "trials": 2}),
        ("gamma", {"samples": 6, "trials": 2, "baselines": True}),
        ("spectrum", {"top_k": 2}),
        ("spectrum", {"top_k": 0, "trace": True, "probes": 9}),
        ("spectrum", {"top_k": 1, "trace": True, "probes": 9}),
    ],
)
def test_reported_keys_are_the_metrics_computed(run, name, options):
    measure = get_measure(name)
    config = make_config(measure, run, **options)
    metrics = compute(measure, run, config).metrics()
    reported = reported_keys(measure, config)
    # what the config computes has numbers; other keys are absent or null
    assert set(reported) <= set(metrics) <= set(measure.keys)
    assert all(metrics[k] is not None for k in reported)
    assert all(metrics[k] is None for k in set(metrics) - set(reported))


@pytest.mark.parametrize("diag_method", ["ggn", "hutchinson", "exact"])
def test_sharpness_keys_are_exactly_the_metrics_computed(run, diag_method):
    from flatcli.measures.sharpness import ALL_MEASURES, sharpness_metric_keys

    options = {
        "diag_method": diag_method,
        "probes": 8,
        "probe_groups": 4,
        "trace_probes": 6,
        "eps_steps": 2,
        "adaptive_steps": 2,
    }
    import flatcli.measures

    result = flatcli.measures.sharpness(run, **options)
    config = make_config(get_measure("hessian_trace"), run, **options)
    assert set(result.metrics()) == set(sharpness_metric_keys(config))
    for name in ALL_MEASURES:
        measure = get_measure(name)
        one = compute(measure, run, **options)
        assert set(one.metrics()) == set(reported_keys(measure, config)) <= set(measure.keys)
        assert one.metrics()[name] == pytest.approx(result.metrics()[name], rel=1e-9)
