"""Every progress call has a real total, ``done <= total``; a long run says its cost up front."""

from __future__ import annotations

import warnings

import pytest

from flatcli import progress as progress_module
from flatcli.measures.gamma import GammaConfig, compute_gamma
from flatcli.measures.kfac import KfacConfig, compute_kfac
from flatcli.measures.sharpness import SharpnessConfig, compute_sharpness
from flatcli.measures.sharpness import _cost as sharpness_cost
from flatcli.measures.spectrum import SpectrumConfig, compute_spectrum
from flatcli.progress import Budget, format_seconds
from tests.cases import make_case


def _check(calls: list[tuple[str, int, int]]) -> None:
    assert calls
    for description, done, total in calls:
        assert total is not None and total > 0, description
        assert 0 <= done <= total, (description, done, total)


@pytest.mark.parametrize(
    "config",
    [
        SpectrumConfig(top_k=2, trace=True, probes=12, density=True, lanczos_steps=20),
        SpectrumConfig(top_k=1, trace=True, trace_method="hutchinson", probes=6, per_layer=True),
        SpectrumConfig(top_k=0, trace=True, probes=9, trace_rel_stderr=0.5),
    ],
)
def test_spectrum_progress_has_totals(config: SpectrumConfig) -> None:
    model, x, y = make_case("mlp_tanh", n=16)
    calls: list[tuple[str, int, int]] = []
    compute_spectrum(model, x, y, config, progress=lambda *a: calls.append(a))
    _check(calls)
    assert calls[-1][1] == calls[-1][2]  # ends full, even when a stage stopped early
    assert len({c[2] for c in calls}) == 1  # one total for the whole run


@pytest.mark.parametrize(
    "config",
    [
        SharpnessConfig(diag_method="hutchinson", probes=20, trace_probes=10, batch_size=12),
        SharpnessConfig(diag_method="exact", measures=("hessian_trace", "eps_sharpness")),
    ],
)
def test_sharpness_progress_has_totals(config: SharpnessConfig) -> None:
    model, x, y = make_case("mlp_relu")
    calls: list[tuple[str, int, int]] = []
    compute_sharpness(model, x, y, config, progress=lambda *a: calls.append(a))
    _check(calls)
    if config.diag_method == "hutchinson":
        assert ("hutchinson diagonal", 20, 20) in calls


def test_gamma_progress_has_totals() -> None:
    model, x, y = make_case("mlp_tanh", n=16)
    calls: list[tuple[str, int, int]] = []
    config = GammaConfig(samples=4, trials=2, baselines=True)
    compute_gamma(model, x, y, config, progress=lambda *a: calls.append(a))
    _check(calls)


def _fake_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    ticks = iter(range(10**6))
    monkeypatch.setattr(progress_module, "clock", lambda: seconds * next(ticks))


def test_a_long_spectrum_says_its_cost_once(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_clock(monkeypatch, 0.5)  # every timed product takes 0.5 s
    model, x, y = make_case("mlp_tanh", n=16)
    calls: list[tuple[str, int, int]] = []
    config = SpectrumConfig(top_k=2, trace=True, probes=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_spectrum(model, x, y, config, progress=lambda *a: calls.append(a))
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert said == [
        "spectrum: up to 104 Hessian-vector products × 0.5 s ≈ 52 s; --max-examples, "
        "a smaller --top-k, fewer --probes or a smaller --lanczos-steps is cheaper"
    ]
    assert calls[-1][0].endswith("(≤ 52 s)")  # Lanczos may converge before its budget


def test_a_short_run_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_clock(monkeypatch, 0.01)
    model, x, y = make_case("mlp_tanh", n=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_spectrum(model, x, y, SpectrumConfig(top_k=2, density=True))
    assert not [w for w in caught if issubclass(w.category, UserWarning)]


def test_budget_caps_done_and_warns_above_its_threshold() -> None:
    calls: list[tuple[str, int, int]] = []
    budget = Budget(
        lambda *a: calls.append(a), "x", 10, unit="products", cheaper="less", warn_seconds=-1.0
    )
    step = budget.stage("a", 4)
    with pytest.warns(UserWarning, match=r"x: about 10 products × .* ≈ .*; less is cheaper"):
        for i in range(1, 7):
            step("inner", i, 4)
    budget.stage("b", 6)("inner", 2, 6)  # a stops early or overshoots: b starts at 4
    budget.finish()
    assert [c[1] for c in calls] == [0, 1, 2, 3, 4, 4, 4, 4, 6, 10]
    assert all(c[2] == 10 for c in calls)


def test_a_long_sharpness_run_says_its_cost_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults on 3 classes: the NSCE GGN diagonal (1.5 passes per logit), the trace (its CE
    diagonal and 10 probes of a Hessian- and a GGN-vector product), 21 + 21 ascent passes."""
    monkeypatch.setattr(sharpness_cost, "_pass_seconds", lambda *a: 1.0)
    model, x, y = make_case("mlp_relu", n=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = compute_sharpness(model, x, y, SharpnessConfig())
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    expected = 1.5 * 3 + (1.5 * 3 + 10 * 4.5) + 21 + 21
    assert said == [
        f"sharpness: about {expected:.0f} gradient passes over 16 examples × 1 s ≈ "
        f"{format_seconds(expected)}; --max-examples, fewer --trace-probes, --eps-steps or "
        "--adaptive-steps, or fewer --measure is cheaper"
    ]
    assert res.info["estimated_seconds"] == pytest.approx(expected)
    monkeypatch.setattr(sharpness_cost, "_pass_seconds", lambda *a: 0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_sharpness(model, x, y, SharpnessConfig(measures=("eps_sharpness",)))
    assert not [w for w in caught if issubclass(w.category, UserWarning)]


def test_kfac_times_each_layer_block_before_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed product takes 0.5 s: the line counts each layer's Lanczos budget (its
    dimension here) plus its default 10 probes, and says it once, before the layers run."""
    _fake_clock(monkeypatch, 0.5)
    model, x, y = make_case("mlp_tanh", n=16)
    calls: list[tuple[str, int, int]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_kfac(model, x, y, KfacConfig(), progress=lambda *a: calls.append(a))
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    products = (30 + 20 + 12) + 3 * 10  # the 6-5-4-3 MLP's weight blocks, then the probes
    assert said == [
        f"kfac: up to {products} hessian layer-block products ≈ {format_seconds(0.5 * products)} "
        "(each layer's product timed); --max-examples, --layers, a smaller --top-k or fewer "
        "--probes is cheaper"
    ]
    assert calls[-1][1:] == (products, products)
