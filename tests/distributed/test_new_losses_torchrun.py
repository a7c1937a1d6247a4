"""token-ce, mse and bce data-parallel on gloo: worlds of 1, 2 and 3 processes over 7 examples.

Every product, the loss, its gradient and the top Hessian eigenvalue of a world of 2 or 3
(uneven shards; token sequences with 0 to 5 counted positions) equal the one-process numbers to
1e-12 in float64, and the one-process numbers are torch's own losses (``F.cross_entropy`` over
the flattened tokens with ``ignore_index=-100``, ``F.mse_loss``,
``F.binary_cross_entropy_with_logits``) differentiated by ``torch.func``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, hessian, jacrev

from flatcli import distributed
from tests.distributed.launch import result_path, run_world
from tests.distributed.loss_workers import COUNTED, LOSSES, N, new_losses, problem
from tests.references import flat_logits

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLDS = (1, 2, 3)
TOL = 1e-12


def _reference_loss(loss: str):
    if loss == "token-ce":
        return lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))
    return F.mse_loss if loss == "mse" else F.binary_cross_entropy_with_logits


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, list[dict]]:
    folder = tmp_path_factory.mktemp("dp_losses")
    out = {}
    for world in WORLDS:
        codes = run_world(new_losses, world, str(folder))
        assert codes == [0] * world, f"world {world}: exit codes {codes}"
        out[world] = [
            torch.load(result_path(folder, "new_losses", world, r), weights_only=False)
            for r in range(world)
        ]
    return out


@pytest.fixture(scope="module")
def truth() -> dict[str, dict[str, Tensor | float]]:
    """Loss, gradient, Hessian and GGN of torch's losses by torch.func, per loss."""
    out = {}
    for loss in LOSSES:
        model, x, y = problem(loss)
        ref = _reference_loss(loss)
        theta, logits = flat_logits(model, x)
        z = logits(theta).detach()
        J = jacrev(logits)(theta).reshape(z.numel(), -1)
        Hz = hessian(lambda zz, z=z, y=y, ref=ref: ref(zz.view(z.shape), y))(z.flatten())
        H = hessian(lambda t, y=y, ref=ref, logits=logits: ref(logits(t), y))(theta)
        out[loss] = {
            "loss": float(ref(z, y)),
            "gradient": grad(lambda t, y=y, ref=ref, logits=logits: ref(logits(t), y))(theta),
            "hessian": H,
            "ggn": J.T @ Hz @ J,
            "top": float(torch.linalg.eigvalsh(H)[-1]),
        }
    return out


def _close(a: Tensor | float, b: Tensor | float, scale: float = 1.0) -> bool:
    diff = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return float(diff.abs().max()) <= TOL * max(1.0, scale)


def test_the_token_problem_tells_the_sample_loss_from_averages_of_averages():
    """The targets make a mean of per-rank or per-sequence means differ from the sample loss."""
    model, x, y = problem("token-ce")
    counted = (y != -100).sum(dim=1).tolist()
    assert sorted(counted) == sorted(COUNTED) and 0 in counted
    with torch.no_grad():
        z = model(x)
    sample = float(_reference_loss("token-ce")(z, y))
    for world in (2, 3):
        means = []
        for r in range(world):
            a, b = distributed.shard_bounds(N, rank=r, world=world)
            means.append(float(_reference_loss("token-ce")(z[a:b], y[a:b])))
        assert abs(sum(means) / world - sample) > 1e-3


@pytest.mark.parametrize("world", WORLDS)
def test_shards_are_uneven(results, world):
    for r, res in enumerate(results[world]):
        assert res["world_size"] == world
        for loss in LOSSES:
            assert tuple(res[loss]["shard"]) == distributed.shard_bounds(N, rank=r, world=world)
            assert res[loss]["examples_per_rank"] == distributed.examples_per_rank(N, world=world)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_process_is_torchs_loss(results, truth, loss):
    res, ref = results[1][0][loss], truth[loss]
    assert _close(res["loss"], ref["loss"]) and _close(res["loss_b1"], ref["loss"])
    assert _close(res["gradient"], ref["gradient"]) and _close(res["gradient_b1"], ref["gradient"])
    for name, kind in (("hessian", "hessian"), ("hessian_fwd", "hessian"), ("ggn", "ggn")):
        scale = float(ref[kind].abs().max())
        assert _close(res[name], ref[kind], scale), name
    assert _close(res["ggn_dbl"], ref["ggn"], float(ref["ggn"].abs().max()))
    assert _close(res["top"][0], ref["top"], abs(ref["top"]))
    assert float((ref["hessian"] - ref["ggn"]).abs().max()) > 1e-3  # H and G differ here


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "name", ["hessian", "hessian_fwd", "ggn", "ggn_dbl", "loss", "gradient", "loss_b1", "top"]
)
def test_every_rank_gets_the_one_process_numbers(results, loss, world, name):
    one = results[1][0][loss][name]
    scale = float(torch.as_tensor(one).abs().max())
    for res in results[world]:
        assert _close(res[loss][name], one, scale), (world, loss, name)
