"""Slices of the losses token-ce, mse and bce (CONTRACTS.md, Losses) against an independent
float64 evaluation by torch's own losses at every grid point (:func:`tests.landscape.reference.
reference_loss_slice`): a tiny causal transformer language model with -100 targets and
sequences counting different numbers of positions, MLPs for mse and bce; the gradient and
Hessian directions of the same sample loss against dense float64 truth; the same seed giving
the same directions; the input-layer factoring on integer token inputs; the memory plan; the
gradient over uneven torchrun shards and a resumed grid."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatcli import distributed
from flatcli.curvature.losses import token_cross_entropy
from flatcli.errors import UsageError
from flatcli.landscape import evaluate as evaluate_module
from flatcli.landscape.directions import gradient_direction
from flatcli.landscape.evaluate import _example_bytes, plan
from flatcli.landscape.first_layer import find_first_layer
from flatcli.measures.landscape import LandscapeConfig, compute_landscape, scoring
from tests.landscape.nets import COUNTED, F64, mlp_problem, token_problem
from tests.landscape.reference import flat, reference_loss_slice
from tests.landscape.test_blocks import DictStore

CASES = ("token-ce", "mse", "mse-1d", "bce", "bce-soft")


def _problem(case: str) -> tuple[nn.Module, Tensor, Tensor, str]:
    if case == "token-ce":
        return (*token_problem("gpt"), "token-ce")
    if case == "token-ce-onehot":
        return (*token_problem("onehot"), "token-ce")
    return (*mlp_problem(case), case.split("-")[0] if case != "mse-1d" else "mse")


def _check(result, model, x, y, loss, *, rel=1e-12):
    """Every grid value, the centre and the β = 0 line against the reference."""
    details = result.details()
    alphas, betas = details["alphas"], details.get("betas")
    points = [(a, b) for a in alphas for b in betas] if betas else [(a,) for a in alphas]
    line = [(a, 0.0) for a in details["basin"]["line"]["alphas"]]
    dirs = result.directions.as_list()
    ref_loss, ref_acc = reference_loss_slice(model, x, y, dirs, points + [(0.0, 0.0)] + line, loss)
    n = len(points)
    assert flat(details["loss"]) == pytest.approx(ref_loss[:n], rel=rel, abs=0)
    assert result.center_loss == pytest.approx(ref_loss[n], rel=rel, abs=0)
    assert details["basin"]["line"]["loss"] == pytest.approx(ref_loss[n + 1 :], rel=rel, abs=0)
    metrics = result.metrics()
    assert metrics["min_loss"] == pytest.approx(min(ref_loss[:n]), rel=rel)
    assert metrics["max_loss"] == pytest.approx(max(ref_loss[:n]), rel=rel)
    if ref_acc is None:
        assert details["accuracy"] is None and details["center_accuracy"] is None
        assert details["evaluation"]["accuracy"] is None and details["reasons"]["accuracy"]
    else:
        assert flat(details["accuracy"]) == pytest.approx(ref_acc[:n], rel=1e-15, abs=0)
        assert details["center_accuracy"] == pytest.approx(ref_acc[n], rel=1e-15, abs=0)
    assert details["evaluation"]["loss"] == loss
    return ref_loss[:n]


@pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")
@pytest.mark.parametrize("case", [*CASES, "token-ce-onehot"])
@pytest.mark.parametrize(("dims", "steps", "per_pass"), [(1, 7, None), (2, 4, 1), (2, 3, 3)])
def test_every_grid_point_is_the_sample_loss_of_a_float64_evaluation(case, dims, steps, per_pass):
    model, x, y, loss = _problem(case)
    config = LandscapeConfig(
        loss=loss, dims=dims, steps=steps, range=0.8, points_per_pass=per_pass, batch_size=3, seed=2
    )
    result = compute_landscape(model, x, y, config)
    _check(result, model, x, y, loss)
    evaluation = result.details()["evaluation"]
    if case == "token-ce":
        assert evaluation["positions"] == sum(COUNTED)
        assert evaluation["first_layer"] is None  # an embedding of token ids: not factored
        # the sample loss weighs sequences by their counted positions: not the mean of the
        # per-sequence means (which a per-example head would give)
        with torch.no_grad():
            per_sequence = float(token_cross_entropy(model(x), y).mean())
        assert abs(result.center_loss - per_sequence) > 1e-3
    elif loss != "token-ce":
        assert "positions" not in evaluation
    if case != "token-ce" and len(result.grid.points) > dims + 1:
        assert evaluation["first_layer"] is not None  # the input Linear, factored


@pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")
def test_a_float32_language_model_keeps_its_token_ids_and_agrees_with_float64():
    model, x, y, _ = _problem("token-ce")
    config = LandscapeConfig(dims=2, steps=3, range=0.5, points_per_pass=3, seed=1)
    r64 = compute_landscape(model, x, y, config)
    r32 = compute_landscape(model.float(), x, y, config)  # int64 ids, float32 weights
    assert r32.config.loss == "token-ce"  # inferred from the (N, T) int targets
    assert flat(r32.details()["loss"]) == pytest.approx(flat(r64.details()["loss"]), rel=1e-5)


def _flat_params(model: nn.Module) -> tuple[list[str], Tensor]:
    names = [n for n, _ in model.named_parameters()]
    return names, torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])


def _torch_loss(model: nn.Module, x: Tensor, y: Tensor, loss: str, theta: Tensor) -> Tensor:
    """torch's sample loss at the flat parameter vector ``theta``."""
    params, start = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[start : start + p.numel()].view(p.shape)
        start += p.numel()
    z = functional_call(model, params, (x,))
    if loss == "token-ce":
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)
    if loss == "mse":
        return F.mse_loss(z, y)
    return F.binary_cross_entropy_with_logits(z, y)


def _dense(model, x, y, loss) -> tuple[Tensor, Tensor]:
    """The gradient and the Hessian of torch's sample loss, by autograd in float64 (the
    Hessian column by column, double backward)."""
    _, theta = _flat_params(model)
    theta = theta.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        value = _torch_loss(model, x, y, loss, theta)
        (grad,) = torch.autograd.grad(value, theta, create_graph=True)
        cols = [torch.autograd.grad(g, theta, retain_graph=True)[0] for g in grad]
    hess = torch.stack(cols, dim=1)
    assert torch.allclose(hess, hess.T, rtol=0, atol=1e-10)
    return grad.detach(), hess


def _vector(model: nn.Module, d: dict[str, Tensor]) -> Tensor:
    return torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.script:FutureWarning")
@pytest.mark.parametrize("case", ["token-ce", "mse", "bce"])
def test_gradient_and_hessian_directions_are_those_of_the_same_sample_loss(case):
    model, x, y, loss = _problem(case)
    grad, hess = _dense(model, x, y, loss)
    config = LandscapeConfig(loss=loss, directions="gradient", dims=2, steps=3, range=0.3)
    result = compute_landscape(model, x, y, config)
    d1 = _vector(model, result.directions.d1)
    assert torch.allclose(d1, grad / grad.norm(), rtol=0, atol=1e-12)
    info = result.details()["directions"]
    assert info["gradient_norm"] == pytest.approx(float(grad.norm()), rel=1e-11)
    _check(result, model, x, y, loss)
    if case == "token-ce":  # not the gradient of the mean of per-sequence means
        names, theta = _flat_params(model)
        theta = theta.clone().requires_grad_(True)
        params, start = {}, 0
        for name, p in model.named_parameters():
            params[name] = theta[start : start + p.numel()].view(p.shape)
            start += p.numel()
        z = functional_call(model, params, (x,))
        (other,) = torch.autograd.grad(token_cross_entropy(z, y).mean(), theta)
        assert float((d1 - other / other.norm()).norm()) > 1e-3

    lam, vecs = torch.linalg.eigh(hess)
    assert float(lam[-2] - lam[-3]) > 1e-3 * float(lam[-1])  # a gap: eigenvectors well defined
    config = LandscapeConfig(loss=loss, directions="hessian", dims=2, steps=3, range=0.3)
    result = compute_landscape(model, x, y, config)
    info = result.details()["directions"]
    assert info["eigenvalues"] == pytest.approx(lam.flip(0)[:2].tolist(), rel=1e-8)
    for k, d in enumerate(result.directions.as_list()):
        assert abs(float(_vector(model, d) @ vecs[:, -1 - k])) == pytest.approx(1.0, abs=1e-8)
    _check(result, model, x, y, loss)


@pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.script:FutureWarning")
@pytest.mark.parametrize("case", ["token-ce", "mse", "bce-soft"])
@pytest.mark.parametrize("kind", ["random", "gradient", "hessian"])
def test_same_seed_same_directions_and_numbers(case, kind):
    model, x, y, loss = _problem(case)

    def run(seed: int):
        config = LandscapeConfig(
            loss=loss, directions=kind, dims=2, steps=3, range=0.4, seed=seed, batch_size=4
        )
        return compute_landscape(model, x, y, config)

    a, b, c = run(3), run(3), run(4)
    for da, db in zip(a.directions.as_list(), b.directions.as_list(), strict=True):
        assert da.keys() == db.keys() and all(torch.equal(da[n], db[n]) for n in da)
    assert a.details()["loss"] == b.details()["loss"]
    assert a.details()["accuracy"] == b.details()["accuracy"]
    d2a, d2c = a.directions.d2, c.directions.d2  # d₂ is a seeded Gaussian for every kind
    if kind != "hessian":
        assert any(not torch.equal(d2a[n], d2c[n]) for n in d2a)


def test_scoring_per_loss():
    _, _, y = token_problem()
    s = scoring("token-ce", y)
    assert (s.counted, s.positions, s.reason) == (sum(COUNTED), sum(COUNTED), None)
    _, _, y = mlp_problem("bce")
    assert scoring("bce", y).counted == y.numel()
    _, _, y = mlp_problem("bce-soft")
    assert scoring("bce", y).correct_fn is None and "0 or 1" in scoring("bce", y).reason
    _, _, y = mlp_problem("mse")
    assert scoring("mse", y).correct_fn is None and scoring("mse", y).counted is None


def test_token_targets_with_no_counted_position_are_refused_before_work():
    model, x, y = token_problem()
    y = torch.full_like(y, -100)
    with pytest.raises(UsageError, match="every target is -100"):
        compute_landscape(model, x, y, LandscapeConfig(steps=3))


def test_first_layer_on_token_inputs():
    gpt, x, _ = token_problem("gpt")
    assert find_first_layer(gpt, x) is None  # the token embedding: another kind of layer
    onehot, x, _ = token_problem("onehot")
    assert find_first_layer(onehot, x).name == "inp"  # a Linear on the model's own one-hot


def test_the_plan_counts_a_language_models_token_logits(monkeypatch):
    model, x, _ = token_problem("gpt")
    x = x.repeat(100, 1)  # 700 sequences
    per_example = _example_bytes(model, x, F64)
    logits = 5 * 6 * 8  # T × V in float64, per sequence
    assert per_example >= evaluate_module.HEAD_COPIES * logits
    size = sum(p.numel() for p in model.parameters()) * 8
    budget = 2 * size + 10 * per_example  # 2 points of 5 sequences, or 1 of 10 + size/pe
    monkeypatch.setattr(
        evaluate_module, "available_memory", lambda device: budget / evaluate_module.BUDGET_FRACTION
    )
    how = plan(model, x, None, None, 8, F64)
    assert how.batch_size == (budget - size) // per_example and how.points_per_pass == 1
    assert how.batch_size < 256  # the CPU target, capped by memory
    how = plan(model, x[:5], None, None, 8, F64)
    assert how.batch_size == 5 and how.points_per_pass == 2


class _Partial(Exception):
    """Carries one simulated rank's partial gradient sums out of ``gradient_direction``."""


def test_the_gradient_over_uneven_shards_is_the_single_process_gradient(monkeypatch):
    """Three ``torchrun`` ranks, simulated one after the other, hold 3, 2 and 2 sequences
    (8, 5 and 7 counted positions): their summed shares are the single-process gradient of
    the mean over ALL counted positions, never an average of per-rank averages."""
    model, x, y = token_problem()
    head = scoring("token-ce", y, F64).loss_fn
    unit, gnorm = gradient_direction(model, x, y, head, batch_size=2)
    bounds = distributed.shard_bounds
    partial = []
    for rank in range(3):
        monkeypatch.setattr(
            distributed, "shard_bounds", lambda n, rank=rank: bounds(n, rank=rank, world=3)
        )

        def reduce(sums):
            partial.append(sums)
            raise _Partial

        monkeypatch.setattr(distributed, "all_reduce_sum", reduce)
        with pytest.raises(_Partial):
            gradient_direction(model, x, y, head, batch_size=2)
    total = _vector(model, {n: sum(p[n] for p in partial) for n in partial[0]})
    assert gnorm == pytest.approx(float(total.norm()) / len(x), rel=1e-13)
    assert torch.allclose(_vector(model, unit), total / total.norm(), rtol=0, atol=1e-14)
    grad, _ = _dense(model, x, y, "token-ce")
    assert torch.allclose(total / len(x), grad, rtol=0, atol=1e-13)


@pytest.mark.filterwarnings("ignore:.*batching rule:UserWarning")
def test_a_killed_language_model_grid_resumes_with_identical_numbers():
    model, x, y = token_problem()
    config = LandscapeConfig(dims=2, steps=3, range=0.6, batch_size=3, points_per_pass=2)
    fresh = compute_landscape(model, x, y, config).details()
    store = DictStore(kill_after=1)
    with pytest.raises(KeyboardInterrupt):
        compute_landscape(model, x, y, config, store=store)
    store.kill_after = None
    resumed = compute_landscape(model, x, y, config, store=store)
    assert resumed.cached_points == 3
    details = resumed.details()
    assert details["loss"] == fresh["loss"] and details["accuracy"] == fresh["accuracy"]
