"""Every grid value of ``compute_landscape`` against an independent float64 evaluation
(:mod:`tests.landscape.reference`): a plain loop that writes θ* + α d₁ + β d₂ into a copy of
the model and evaluates all examples at once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flatcli.measures.landscape import LandscapeConfig, compute_landscape
from tests.cases import make_case
from tests.landscape.reference import flat, reference_slice
from tests.references import margins, trained_confident_mlp


def _check(result, model, x, y, *, exact=False, rel=1e-12):
    """The report's grids against the reference at the report's own coordinates (row i at
    alphas[i], column j at betas[j]), and the centre and the β = 0 line too."""
    details = result.details()
    alphas, betas = details["alphas"], details.get("betas")
    points = [(a, b) for a in alphas for b in betas] if betas else [(a,) for a in alphas]
    line = [(a, 0.0) for a in details["basin"]["line"]["alphas"]]
    dirs = result.directions.as_list()
    ref_loss, ref_acc = reference_slice(
        model, x, y, dirs, points + [(0.0, 0.0)] + line, exact=exact
    )
    n = len(points)
    assert flat(details["loss"]) == pytest.approx(ref_loss[:n], rel=rel, abs=0)
    assert flat(details["accuracy"]) == ref_acc[:n]
    assert result.center_loss == pytest.approx(ref_loss[n], rel=rel, abs=0)
    assert details["center_accuracy"] == ref_acc[n]
    assert details["basin"]["line"]["loss"] == pytest.approx(ref_loss[n + 1 :], rel=rel, abs=0)
    finite = [v for v in ref_loss[:n]]
    metrics = result.metrics()
    assert metrics["min_loss"] == pytest.approx(min(finite), rel=rel)
    assert metrics["max_loss"] == pytest.approx(max(finite), rel=rel)
    return ref_loss[:n]


@pytest.mark.parametrize("case", ["mlp_tanh", "cnn_bn"])
@pytest.mark.parametrize(("dims", "steps"), [(1, 7), (2, 5), (2, 4)])
@pytest.mark.parametrize("per_pass", [1, 4, None])
def test_every_grid_point_matches_a_float64_evaluation(case, dims, steps, per_pass):
    model, x, y = make_case(case, n=10)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    config = LandscapeConfig(
        dims=dims, steps=steps, range=0.8, points_per_pass=per_pass, batch_size=4, seed=2
    )
    result = compute_landscape(model, x, y, config)
    _check(result, model, x, y)
    alphas = result.details()["alphas"]
    assert alphas == pytest.approx([-0.8 + 1.6 * i / (steps - 1) for i in range(steps)], abs=1e-15)
    longest = max(b - a for a, b in result.grid.blocks)  # a row, a block of a line, the extras
    assert longest == (steps + (steps % 2 == 0) if dims == 2 else min(steps, 8))
    assert result.points_per_pass == min(per_pass or 64, longest)  # 64 = 256 examples / 4
    for n, b in model.named_buffers():  # BatchNorm running statistics untouched
        assert torch.equal(b, buffers[n])
    assert not model.training


@pytest.mark.parametrize("directions", ["hessian", "gradient"])
def test_hessian_and_gradient_slices_match_too(directions):
    model, x, y = make_case("cnn_bn", n=8)
    config = LandscapeConfig(directions=directions, dims=2, steps=3, range=0.5)
    result = compute_landscape(model, x, y, config)
    _check(result, model, x, y)
    info = result.details()["directions"]
    assert info["kind"] == directions
    assert info["norms"][0] == pytest.approx(1.0, rel=1e-12)


def test_the_line_to_another_checkpoint_passes_through_both(tmp_path):
    a, x, y = make_case("cnn", n=10, seed=0)
    b, _, _ = make_case("cnn", n=10, seed=1)
    save_file(b.state_dict(), str(tmp_path / "b.safetensors"))
    config = LandscapeConfig(to=str(tmp_path / "b.safetensors"), steps=4, range=0.5)
    result = compute_landscape(a, x, y, config)
    alphas = result.details()["alphas"]
    assert 0.0 in alphas and 1.0 in alphas and alphas == sorted(alphas)
    loss = result.details()["loss"]
    own = [reference_slice(m, x, y, [], [()])[0][0] for m in (a, b)]
    assert loss[alphas.index(0.0)] == pytest.approx(own[0], rel=1e-12)
    assert loss[alphas.index(1.0)] == pytest.approx(own[1], rel=1e-12)
    assert result.details()["directions"]["to_sha256"]
    _check(result, a, x, y)


def test_a_trained_confident_network_is_exact_where_a_naive_head_rounds_to_zero():
    model, x, y = trained_confident_mlp()
    with torch.no_grad():
        assert float(margins(model(x), y).min()) > 30  # 1 − p_y below 1e-13 for every example
    config = LandscapeConfig(dims=2, steps=5, range=0.05, points_per_pass=3)
    result = compute_landscape(model, x, y, config)
    ref = _check(result, model, x, y, exact=True, rel=1e-9)
    assert 0 < result.center_loss < 1e-13 and min(ref) > 0
    naive = reference_slice(model, x, y, [], [()])[0][0]  # F.cross_entropy: cancellation
    assert abs(naive - result.center_loss) > 0.1 * result.center_loss
    # float32 weights, float64 head: the centre within float32's reach of the exact loss
    exact_center = result.center_loss
    r32 = compute_landscape(model.float(), x.float(), y, LandscapeConfig(steps=3, range=0.05))
    assert r32.center_loss == pytest.approx(exact_center, rel=1e-4)


def test_vmapped_and_single_point_passes_agree():
    model, x, y = make_case("cnn_bn", n=9)
    one = compute_landscape(model, x, y, LandscapeConfig(dims=2, steps=3, points_per_pass=1))
    many = compute_landscape(model, x, y, LandscapeConfig(dims=2, steps=3, points_per_pass=3))
    assert flat(one.details()["loss"]) == pytest.approx(flat(many.details()["loss"]), rel=1e-13)
    assert (one.points_per_pass, many.points_per_pass) == (1, 3)


def test_same_seed_same_numbers():
    model, x, y = make_case("mlp_tanh", n=8)
    config = LandscapeConfig(dims=2, steps=3, seed=4)
    a, b = (compute_landscape(model, x, y, config).details() for _ in range(2))
    assert a["loss"] == b["loss"] and a["accuracy"] == b["accuracy"]
    c = compute_landscape(model, x, y, LandscapeConfig(dims=2, steps=3, seed=5)).details()
    assert c["loss"] != a["loss"]
