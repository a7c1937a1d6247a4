"""The pacbayes measure on a loaded checkpoint: report keys, ordering, an independent recompute."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq

from flatcli.errors import UsageError
from flatcli.io.load import load
from flatcli.measures.pacbayes import PacBayesConfig, pacbayes_on_run
from flatcli.pacbayes.prior import check_prior_available, resolve_prior
from tests.pacbayes.problem import REPORT_KEYS, write_problem


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_problem(tmp_path_factory.mktemp("pacbayes"))


def _run(paths, **options):
    run = load(paths["trained"], device="cpu")
    options = {"prior": "data-free", **options}
    config = PacBayesConfig(epochs=6, lr=0.01, opt_batch_size=60, mc_samples=64, **options)
    return run, pacbayes_on_run(run, config, lambda *a: None)


def _independent_bound(m: dict, c: float = 0.1) -> tuple[float, float, float]:
    """B_RE, the MC upper bound and the bound, recomputed with scipy's root finder."""

    def kl(q, p):
        return (q * math.log(q / p) if q > 0 else 0.0) + (1 - q) * math.log((1 - q) / (1 - p))

    def inv(q, c):
        if kl(q, 1 - 1e-15) <= c:
            return 1.0
        return brentq(lambda p: kl(q, p) - c, q, 1 - 1e-15, xtol=1e-14)

    n, mm = m["mc_samples"], m["bound_examples"]
    lam = c * math.exp(-m["j"] / 100.0)
    assert m["prior_variance"] == pytest.approx(lam, rel=1e-12)
    bre = (m["kl"] + 2 * math.log(m["j"]) + math.log(math.pi**2 * mm / (6 * m["delta"]))) / (mm - 1)
    upper = inv(m["snn_train_error"], math.log(2 / m["delta_prime"]) / n)
    return bre, upper, inv(upper, bre)


def test_report_has_the_contract_keys_and_recomputes_independently(paths):
    run, result = _run(paths)
    m = result.metrics()
    assert set(m) == REPORT_KEYS
    assert m["num_train"] == m["bound_examples"] == 240 and m["mc_samples"] == 64
    assert m["prior_examples"] == 0 and 0.0 <= m["posterior_mean_test_error"] <= 1.0
    assert m["delta"] == 0.025 and m["delta_prime"] == 0.01
    assert m["bound"] >= m["snn_train_error_upper"] >= m["snn_train_error"]
    bre, upper, bound = _independent_bound(m)
    assert m["b_re"] == pytest.approx(bre, rel=1e-12)
    assert m["snn_train_error_upper"] == pytest.approx(upper, abs=1e-9)
    assert m["bound"] == pytest.approx(bound, abs=1e-9)
    assert m["snn_train_error_upper"] >= upper - 1e-12 and m["bound"] >= bound - 1e-12
    d = result.details()
    assert d["method"] == "vanilla" and d["confidence"] == pytest.approx(0.965)
    assert len(d["curve"]) == 6 and {"objective", "kl", "b_re", "cross_entropy"} <= set(
        d["curve"][0]
    )
    assert d["prior"]["kind"] == "data-free" and d["prior"]["source"].startswith("recorded in")
    assert d["prior"]["prior_examples"] == 0 and d["prior"]["bound_examples"] == 240
    assert 0.0 <= m["test_error"] <= 1.0 and 0.0 <= m["snn_test_error"] <= 1.0


def test_the_kl_is_that_of_the_reported_posterior_and_prior(paths):
    """KL(Q‖P_j) recomputed from the posterior through torch.distributions."""
    from torch.distributions import Normal, kl_divergence

    from flatcli.pacbayes.optimize import optimize_posterior

    run = load(paths["trained"], device="cpu")
    prior, _ = resolve_prior(run.model, run.checkpoint)
    post, _ = optimize_posterior(run.model, run.x, run.y, prior, epochs=2, lr=0.01, batch_size=60)
    from flatcli.pacbayes.bound import best_grid_point, grid_lambda

    j, kl, _ = best_grid_point(*post.kl_terms(prior), post.num_params(), 240, 0.025, b=100.0, c=0.1)
    lam = grid_lambda(j, b=100.0, c=0.1)
    ref = sum(
        float(
            kl_divergence(
                Normal(post.mean[k].double(), post.log_std[k].double().exp()),
                Normal(prior[k].double(), math.sqrt(lam)),
            ).sum()
        )
        for k in post.mean
    )
    assert kl == pytest.approx(ref, rel=1e-9)


def test_hessian_methods_rotate_every_weight(paths):
    for method in ("approx-hessian", "iterative-hessian"):
        _, result = _run(paths, method=method, eta=2)
        d = result.details()
        assert d["method"] == method
        assert d["rotated_layers"] == ["fc1.weight", "fc2.weight"]
        m = result.metrics()
        assert m["bound"] >= m["snn_train_error_upper"] >= m["snn_train_error"]
        assert _independent_bound(m)[2] == pytest.approx(m["bound"], abs=1e-9)


def test_same_seed_same_numbers(paths):
    _, a = _run(paths)
    _, b = _run(paths)
    assert a.metrics() == b.metrics()


def test_refusal_without_initial_weights(paths):
    with pytest.raises(UsageError, match="records no initial weights"):
        check_prior_available(paths["noinit"])
    with pytest.raises(UsageError, match="records no initial weights"):
        check_prior_available(paths["noinit_pt"])
    run = load(paths["noinit"], device="cpu")
    with pytest.raises(UsageError, match="prior must not be chosen from the training data"):
        resolve_prior(run.model, run.checkpoint)
    # the trained weights themselves are no prior
    with pytest.raises(UsageError, match="trained checkpoint itself"):
        resolve_prior(run.model, run.checkpoint, paths["noinit"])


def test_prior_init_file_is_used(paths):
    run = load(paths["noinit"], device="cpu")
    prior, source = resolve_prior(run.model, run.checkpoint, paths["init_pt"])
    init = torch.load(paths["init_pt"], weights_only=True)
    assert source.startswith("--prior-init")
    for k, v in prior.items():
        assert torch.equal(v, init[k])
    assert check_prior_available(paths["noinit"], paths["init_pt"]).startswith("--prior-init")


def test_convergence_note_compares_the_last_tenth_of_the_epochs():
    from flatcli.measures.pacbayes import convergence_note

    def curve(objectives):
        return [{"objective": o, "kl": 100.0} for o in objectives]

    assert convergence_note(curve([1.0])) is None
    assert convergence_note(curve([5.0, 3.0] + [1.0] * 20)) is None  # settled
    assert convergence_note(curve([1.0] * 18 + [1.01, 0.99])) is None  # noise below 2 %
    note = convergence_note(curve([2.0 - 0.05 * i for i in range(20)]))  # 1.15 -> 1.05
    assert note is not None and "9 % over the last 2 epoch(s)" in note
