"""Data-parallel curvature on gloo: world sizes 1, 2, 3 over 7 examples (uneven shards)."""

from __future__ import annotations

import pytest
import torch

from flatcli import distributed
from tests.distributed.launch import result_path, run_world
from tests.distributed.workers import N, failing, operators, problem
from tests.references import dense_exact_fisher, dense_ggn, dense_hessian, dense_mc_fisher

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLDS = (1, 2, 3)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, list[dict]]:
    folder = tmp_path_factory.mktemp("dp")
    out = {}
    for world in WORLDS:
        codes = run_world(operators, world, str(folder))
        assert codes == [0] * world, f"world {world}: exit codes {codes}"
        out[world] = [
            torch.load(result_path(folder, "operators", world, r), weights_only=False)
            for r in range(world)
        ]
    return out


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    model, x, y = problem()
    return {
        "hessian": dense_hessian(model, x, y),
        "ggn": dense_ggn(model, x, y),
        "fisher_exact": dense_exact_fisher(model, x, y),
    }


def test_shards_are_contiguous_and_uneven():
    for world in WORLDS:
        bounds = [distributed.shard_bounds(N, rank=r, world=world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == N
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert distributed.examples_per_rank(7, world=3) == [3, 2, 2]
    assert distributed.examples_per_rank(2, world=3) == [1, 1, 0]


def test_no_process_group_is_a_no_op():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum([t])[0] is t and distributed.broadcast(t) is t
    assert distributed.gather_objects("a") == ["a"]
    assert distributed.shard_bounds(5) == (0, 5)
    assert distributed.environment(5) == {"world_size": 1}


@pytest.mark.parametrize("world", WORLDS)
def test_world_and_shards(results, world):
    for r, res in enumerate(results[world]):
        assert res["world_size"] == world
        assert res["examples_per_rank"] == distributed.examples_per_rank(N, world=world)
        assert tuple(res["shard"]) == distributed.shard_bounds(N, rank=r, world=world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("hessian", "hessian"),
        ("hessian_fwd", "hessian"),
        ("ggn", "ggn"),
        ("ggn_dbl", "ggn"),
        ("fisher_exact", "fisher_exact"),
    ],
)
def test_products_equal_dense_reference(results, references, world, name, ref):
    for res in results[world]:
        assert (res[name] - references[ref]).abs().max() <= 1e-12


@pytest.mark.parametrize("world", WORLDS)
def test_mc_fisher_labels_do_not_depend_on_world_size(results, world):
    labels = results[1][0]["mc_labels"]
    assert labels.shape == (N, 3)
    for res in results[world]:
        assert torch.equal(res["mc_labels"], labels)
    model, x, _ = problem()
    reference = dense_mc_fisher(model, x, labels)
    for res in results[world]:
        assert (res["fisher_mc"] - reference).abs().max() <= 1e-12


@pytest.mark.parametrize("world", WORLDS)
def test_replicated_solvers_agree(results, world):
    one = results[1][0]
    ref = torch.linalg.eigvalsh(dense_hessian(*problem())).flip(0)[:3]
    for res in results[world]:
        assert (res["lanczos"] - ref).abs().max() <= 1e-10
        assert (res["lanczos"] - one["lanczos"]).abs().max() <= 1e-10
        assert abs(res["hutchpp"] - one["hutchpp"]) <= 1e-10 * abs(one["hutchpp"])
        assert (res["ggn_diagonal"] - torch.diagonal(dense_ggn(*problem()))).abs().max() <= 1e-12


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("fisher", ("exact", "mc"))
def test_kfac_factors_do_not_depend_on_world_size(results, world, fisher):
    one = results[1][0][f"kfac_{fisher}"]
    for res in results[world]:
        got = res[f"kfac_{fisher}"]
        assert got.keys() == one.keys()
        for name, (em, exx, mean_x, positions) in got.items():
            em1, exx1, mean1, pos1 = one[name]
            assert positions == pos1
            for a, b in ((em, em1), (exx, exx1), (mean_x, mean1)):
                assert (a - b).abs().max() <= 1e-12 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("world", (2, 3))
def test_one_collective_per_product(results, world):
    collectives, elements, dim = results[world][0]["comm"]
    assert collectives == 1 and elements == 4 * dim  # a 4-column matmat: one buffer of 4 * dim


def test_a_failed_rank_does_not_hang_the_others(tmp_path):
    codes = run_world(failing, 3, str(tmp_path), timeout=120)
    assert codes == [0, 0, 0]
    outcomes = [torch.load(result_path(tmp_path, "failing", 3, r)) for r in range(3)]
    assert outcomes[1][0] == "own: bad checkpoint on rank 1"
    for r in (0, 2):
        assert outcomes[r][0].startswith("peer: rank 1 of 3 failed while loading")
        assert "bad checkpoint on rank 1" in outcomes[r][0]
    assert all(float(o[1].sum()) == 6.0 for o in outcomes)
