"""The data-dependent prior: a disjoint split, BatchNorm statistics from the prior's examples only,
the f-quad objective and bounded cross-entropy against hand computations, a certificate on the
bound examples alone, and Monte-Carlo samples that do not depend on the chunking."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import flatcli.measures.pacbayes as measure
import flatcli.pacbayes.data_prior as data_prior
from flatcli.errors import UsageError
from flatcli.io.load import load
from flatcli.measures.pacbayes import PacBayesConfig, check_pacbayes, pacbayes_on_run
from flatcli.pacbayes.bound import union_term
from flatcli.pacbayes.data_prior import (
    indices_sha256,
    recompute_batchnorm,
    split_indices,
    train_data_prior,
)
from flatcli.pacbayes.fquad import bounded_cross_entropy, f_quad, fquad_objective
from flatcli.pacbayes.kl import kl_inverse
from flatcli.pacbayes.montecarlo import sample_weights, snn_errors
from flatcli.pacbayes.optimize import Posterior
from tests.pacbayes.problem import REPORT_KEYS, build, make_data, write_batchnorm, write_problem

F64 = torch.float64
FAST = {"epochs": 2, "prior_epochs": 2, "mc_samples": 16, "test_mc_samples": 4}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_dependent")
    paths = write_problem(folder, steps=100)
    paths["bn"] = write_batchnorm(folder)
    return paths


# --- the split ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "fraction", "seed"), [(10, 0.5, 0), (241, 0.3, 7), (1000, 0.9, 3)])
def test_split_is_disjoint_covering_and_seeded(n, fraction, seed):
    s = split_indices(n, fraction, seed)
    prior, bound = set(s.prior.tolist()), set(s.bound.tolist())
    assert len(prior) == s.prior.numel() == math.floor(fraction * n)
    assert not prior & bound and prior | bound == set(range(n))
    again = split_indices(n, fraction, seed)
    assert torch.equal(again.prior, s.prior) and torch.equal(again.bound, s.bound)
    assert not torch.equal(split_indices(n, fraction, seed + 1).prior, s.prior)


def test_split_too_small_is_a_usage_error():
    with pytest.raises(UsageError, match="at least 2"):
        split_indices(10, 0.95, 0)  # 9 for the prior, 1 for the bound
    with pytest.raises(UsageError, match="at least 1"):
        split_indices(3, 0.2, 0)


def test_bound_sha256_is_that_of_the_sorted_int64_indices():
    idx = torch.tensor([5, 1, 3])
    expected = hashlib.sha256(np.array([1, 3, 5], dtype="<i8").tobytes()).hexdigest()
    assert indices_sha256(idx) == expected


def test_the_prior_trains_on_prior_examples_and_the_certificate_uses_only_bound_examples(
    paths, monkeypatch
):
    """End to end: what the prior's SGD and the Monte-Carlo step received, row by row."""
    seen: dict[str, list[torch.Tensor]] = {"prior": [], "mc": []}
    train, mc = data_prior._train, measure.snn_errors

    def spy_train(net, x, y, **kw):
        seen["prior"].append(x.clone())
        return train(net, x, y, **kw)

    def spy_mc(model, posterior, x, y, **kw):
        if kw.get("description") == "MC train":
            seen["mc"].append(x.clone())
        return mc(model, posterior, x, y, **kw)

    monkeypatch.setattr(data_prior, "_train", spy_train)
    monkeypatch.setattr(measure, "snn_errors", spy_mc)
    run = load(paths["trained"], device="cpu")
    result = pacbayes_on_run(run, PacBayesConfig(**FAST), lambda *a: None)
    split = split_indices(run.x.shape[0], 0.5, 0)
    assert torch.equal(seen["prior"][0], run.x[split.prior])
    assert torch.equal(seen["mc"][0], run.x[split.bound])
    rows = {tuple(r.tolist()) for r in run.x}
    assert len(rows) == run.x.shape[0]  # distinct examples: disjoint rows are disjoint examples
    prior_rows = {tuple(r.tolist()) for r in seen["prior"][0]}
    bound_rows = {tuple(r.tolist()) for r in seen["mc"][0]}
    assert not prior_rows & bound_rows and len(prior_rows | bound_rows) == run.x.shape[0]
    m, prior = result.metrics(), result.details()["prior"]
    assert m["prior_examples"] == 120 and m["bound_examples"] == 120 and m["num_train"] == 240
    assert prior["bound_indices_sha256"] == indices_sha256(split.bound)


# --- the f-quad objective and the bounded cross-entropy ----------------------------------------


def test_f_quad_against_a_hand_computation_and_the_kl_inverse():
    # (sqrt(0.1 + 0.01) + sqrt(0.01))^2 = 0.11 + 0.01 + 2 sqrt(0.0011) = 0.186332...
    assert float(f_quad(0.1, 0.02)) == pytest.approx(0.12 + 2 * math.sqrt(0.0011), abs=1e-15)
    for q in (0.0, 0.05, 0.3):
        for b in (1e-4, 0.01, 0.2):
            assert float(f_quad(q, b)) >= kl_inverse(q, b) - 1e-12  # an upper bound on it
    assert float(f_quad(0.05, 1e-6)) == pytest.approx(kl_inverse(0.05, 1e-6), rel=1e-3)


def test_fquad_objective_is_eq_45_inside_f_quad():
    loss, mds, vs, lvs, rho = 0.07, 0.8, 4.5, 5000 * math.log(9e-4), -3.4
    p, m, delta, b, c = 5000, 2000, 0.025, 100.0, 0.1
    lam = math.exp(2 * rho)
    kl = 0.5 * ((vs + mds) / lam - p + p * math.log(lam) - lvs)
    j = b * math.log(c / lam)
    bre = (kl + 2 * math.log(j) + math.log(math.pi**2 * m / (6 * delta))) / (m - 1)
    expected = (math.sqrt(loss + bre / 2) + math.sqrt(bre / 2)) ** 2
    t = {k: torch.tensor(v, dtype=F64) for k, v in dict(mds=mds, vs=vs, lvs=lvs, rho=rho).items()}
    obj, got_kl, got_bre = fquad_objective(
        torch.tensor(loss, dtype=F64), t["mds"], t["vs"], t["lvs"], t["rho"],
        num_params=p, num_train=m, delta=delta, b=b, c=c,
    )  # fmt: skip
    assert float(got_kl) == pytest.approx(kl, rel=1e-12)
    assert float(got_bre) == pytest.approx(bre, rel=1e-12)
    assert float(obj) == pytest.approx(expected, rel=1e-12)
    assert float(union_term(j, m, delta)) == pytest.approx(bre * (m - 1) - kl, rel=1e-12)


def test_bounded_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [30.0, 0.0, -30.0]], dtype=F64)
    y = torch.tensor([0, 2, 2])
    p_min = 1e-4
    p = torch.softmax(logits, dim=-1)[torch.arange(3), y]
    by_hand = [-math.log(max(float(v), p_min)) / math.log(1 / p_min) for v in p]
    assert by_hand[2] == pytest.approx(1.0, abs=1e-15)  # p_y = e^-60 clipped: the maximum
    got = bounded_cross_entropy(logits, y, p_min)
    assert float(got) == pytest.approx(sum(by_hand) / 3, rel=1e-12)
    z = logits.clone().requires_grad_(True)
    bounded_cross_entropy(z[2:], y[2:], p_min).backward()
    assert torch.count_nonzero(z.grad) == 0  # clipped: no gradient
    assert float(bounded_cross_entropy(z[:2], y[:2], p_min)) < 1.0


# --- BatchNorm statistics ----------------------------------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()


def test_batchnorm_statistics_come_from_the_prior_examples_only():
    net = _bn_net()
    data = make_data(n_train=200)
    x, y = data["x_train"].double(), data["y_train"]
    prior = train_data_prior(net, x, y, fraction=0.5, epochs=1, lr=0.05, batch_size=32, seed=3)
    split = split_indices(200, 0.5, 3)
    # recomputed in one batch of the 100 prior examples at the prior's mean: exact statistics
    probe = data_prior.with_tensors(net, prior.mean)
    pre = probe[0](x[split.prior])
    assert torch.allclose(prior.buffers["1.running_mean"], pre.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(prior.buffers["1.running_var"], pre.var(0), rtol=1e-12, atol=1e-12)
    assert int(prior.buffers["1.num_batches_tracked"]) == 1
    assert "100 prior examples" in prior.info["batchnorm"]
    # bound examples changed: same prior and statistics; one prior example changed: others
    x_bound = x.clone()
    x_bound[split.bound] += 5.0
    again = train_data_prior(
        net, x_bound, y, fraction=0.5, epochs=1, lr=0.05, batch_size=32, seed=3
    )
    for k, v in prior.buffers.items():
        assert torch.equal(again.buffers[k], v), k
    x_prior = x.clone()
    x_prior[split.prior[0]] += 5.0
    moved = train_data_prior(net, x_prior, y, fraction=0.5, epochs=0, seed=3)
    assert not torch.equal(moved.buffers["1.running_mean"], prior.buffers["1.running_mean"])


def test_recompute_batchnorm_leaves_eval_mode_and_momentum():
    net = _bn_net()
    net[1].momentum = 0.3
    x = torch.randn(50, 6, dtype=F64)
    assert recompute_batchnorm(net, x, batch_size=50) == 1
    assert not net.training and not net[1].training and net[1].momentum == 0.3
    assert torch.allclose(net[1].running_mean, net[0](x).mean(0))
    assert recompute_batchnorm(nn.Linear(2, 2), x) == 0


def test_a_batchnorm_model_is_certified_with_a_data_dependent_prior(paths):
    run = load(paths["bn"], device="cpu")
    check_pacbayes(run, PacBayesConfig(**FAST))  # accepted
    with pytest.raises(UsageError, match="--prior data-dependent"):
        check_pacbayes(run, PacBayesConfig(prior="data-free"))
    result = pacbayes_on_run(run, PacBayesConfig(**FAST), lambda *a: None)
    assert (
        "recomputed at the prior's mean on the 120 prior examples"
        in (result.details()["prior"]["batchnorm"])
    )
    assert 0.0 <= result.metrics()["bound"] <= 1.0


# --- defaults, refusals, report ----------------------------------------------------------------


def test_default_prior_is_data_dependent_with_the_f_quad_recipe():
    c = PacBayesConfig()
    assert (c.prior, c.method, c.prior_fraction, c.prior_epochs) == (
        "data-dependent",
        "f-quad",
        0.5,
        20,
    )
    assert (c.epochs, c.lr, c.opt_batch_size, c.sigma0, c.p_min) == (20, 1e-3, 250, 0.03, 1e-4)
    assert (c.mc_samples, c.delta, c.delta_prime, c.test_mc_samples) == (1000, 0.025, 0.01, 100)
    assert c.c * math.exp(-1 / c.b) == pytest.approx(0.03**2, rel=1e-14)  # λ₁ = σ₀²
    d = PacBayesConfig(prior_init="init.pt")
    assert (d.prior, d.method, d.epochs, d.lr, d.opt_batch_size) == (
        "data-free",
        "vanilla",
        40,
        0.01,
        64,
    )
    e = PacBayesConfig(prior="data-free", method="f-quad")
    assert (e.epochs, e.lr, e.opt_batch_size) == (20, 1e-3, 250)
    assert PacBayesConfig(method="vanilla", epochs=3).epochs == 3


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prior": "data-dependent", "prior_init": "x.pt"}, "cannot be combined"),
        ({"prior_fraction": 1.0}, "--prior-fraction"),
        ({"prior_fraction": 0.0}, "--prior-fraction"),
        ({"prior_lr": 0.0}, "--prior-lr"),
        ({"sigma0": -1.0}, "--sigma0"),
        ({"p_min": 1.0}, "--p-min"),
        ({"prior": "nope"}, "--prior"),
        ({"prior_start": "nope"}, "--prior-start"),
    ],
)
def test_bad_prior_options_are_usage_errors(options, match):
    with pytest.raises(UsageError, match=match):
        PacBayesConfig(**options)


def test_report_of_a_data_dependent_run_recomputes(paths):
    from tests.pacbayes.test_measure import _independent_bound

    run = load(paths["trained"], device="cpu")
    result = pacbayes_on_run(run, PacBayesConfig(**FAST), lambda *a: None)
    m, d = result.metrics(), result.details()
    assert set(m) == REPORT_KEYS
    assert m["bound_examples"] + m["prior_examples"] == m["num_train"] == 240
    c = 0.03**2 * math.exp(1 / 100)  # f-quad's grid: λ₁ = σ₀²
    assert PacBayesConfig(**FAST).c == pytest.approx(c, rel=1e-15)
    bre, upper, bound = _independent_bound(m, c)
    assert m["b_re"] == pytest.approx(bre, rel=1e-12)
    assert m["bound"] == pytest.approx(bound, abs=1e-9) and m["bound"] >= bound - 1e-12
    assert 0.0 <= m["posterior_mean_test_error"] <= 1.0
    prior = d["prior"]
    for key in ("kind", "fraction", "epochs", "seed", "start", "bound_indices_sha256"):
        assert key in prior, key
    assert prior["kind"] == "data-dependent" and prior["start"].startswith("recorded")
    assert 0.0 <= prior["prior_test_error"] <= 1.0 and prior["distance_to_trained"] > 0
    assert d["method"] == "f-quad" and len(d["curve"]) == 2
    again = pacbayes_on_run(load(paths["trained"], device="cpu"), PacBayesConfig(**FAST), print)
    assert again.metrics() == m  # same seed, same certificate


def test_a_fresh_start_and_a_recorded_one(paths):
    run = load(paths["noinit"], device="cpu")
    with pytest.raises(UsageError, match="records no initial weights"):
        check_pacbayes(run, PacBayesConfig(prior_start="recorded"))
    net, start = data_prior.prior_start(run.model, run.spec, run.checkpoint, "auto", seed=4)
    assert start == "fresh initialisation (seed 4)"
    fresh = dict(net.named_parameters())
    trained = dict(run.model.named_parameters())
    assert not any(torch.equal(fresh[k], trained[k]) for k in fresh)
    again, _ = data_prior.prior_start(run.model, run.spec, run.checkpoint, "fresh", seed=4)
    assert all(torch.equal(p, fresh[k]) for k, p in again.named_parameters())


# --- Monte-Carlo chunking ----------------------------------------------------------------------


def test_weight_samples_and_errors_do_not_depend_on_the_chunking():
    model = build().double()
    data = make_data()
    x, y = data["x_train"].double(), data["y_train"]
    g = torch.Generator().manual_seed(1)
    mean = {k: v.detach().clone() for k, v in model.named_parameters()}
    log_std = {
        k: -1.2 + 0.3 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in mean.items()
    }
    post = Posterior(mean, log_std, -3.0)
    whole = sample_weights(post, range(0, 9), seed=5)
    part = sample_weights(post, range(4, 7), seed=5)
    for k in whole:
        assert torch.equal(part[k], whole[k][4:7])
    ref = snn_errors(model, post, x, y, samples=9, seed=5, sample_chunk=1, data_chunk=240)
    assert float(ref.std()) > 0  # the samples differ
    for s_chunk, d_chunk in [(2, 7), (4, 100), (9, 13), (None, None)]:
        got = snn_errors(
            model, post, x, y, samples=9, seed=5, sample_chunk=s_chunk, data_chunk=d_chunk
        )
        assert torch.equal(got, ref), (s_chunk, d_chunk)
    other = snn_errors(model, post, x, y, samples=9, seed=6)
    assert not torch.equal(other, ref)


def test_a_vacuous_data_dependent_bound_names_what_would_help():
    from tests.pacbayes.test_data_free import _certificate

    noisy = _certificate(0.62, kl=3.0, b_re=0.01, snn_train_error=0.5, num_train=2000)
    note = measure.vacuity_note(noisy, 0.5, data_dependent=True, method="f-quad")
    assert note is not None and "errs on 0.5 of the bound's examples" in note
    assert "--prior-epochs" in note and "--mc-samples" in note and "initialisation" not in note
    wide = _certificate(0.7, kl=900.0, b_re=0.6, snn_train_error=0.05, num_train=120)
    note = measure.vacuity_note(wide, 0.5, data_dependent=True, method="vanilla")
    assert "B_RE 0.6 (KL 900 against m = 120 bound examples) dominates" in note
    assert "--prior-fraction" in note and "--method f-quad" in note
    assert measure.vacuity_note(_certificate(0.2), 0.5, data_dependent=True) is None
