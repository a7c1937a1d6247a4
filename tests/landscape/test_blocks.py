"""Blocks of grid points: a killed run resumes from the finished ones with identical numbers,
and ``torchrun`` processes share the blocks and agree on the whole grid."""

from __future__ import annotations

import pytest

from flatcli import distributed
from flatcli.measures.landscape import LandscapeConfig, compute_landscape
from tests.cases import make_case


class DictStore:
    """Finished blocks in a dict; ``kill_after`` puts, the next one raises KeyboardInterrupt."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.values: dict = {}
        self.kill_after = kill_after
        self.gets = self.puts = 0

    def _key(self, key):
        return tuple(sorted((k, str(v)) for k, v in key.items()))

    def get(self, key):
        self.gets += 1
        return self.values.get(self._key(key))

    def put(self, key, value):
        if self.kill_after is not None and self.puts >= self.kill_after:
            raise KeyboardInterrupt
        self.puts += 1
        self.values[self._key(key)] = value


def test_a_killed_grid_resumes_from_its_finished_blocks_with_identical_numbers():
    model, x, y = make_case("cnn_bn", n=10)
    config = LandscapeConfig(dims=2, steps=5, range=0.7, batch_size=3, points_per_pass=2)
    fresh = compute_landscape(model, x, y, config).details()
    store = DictStore(kill_after=2)
    with pytest.raises(KeyboardInterrupt):
        compute_landscape(model, x, y, config, store=store)
    assert store.puts == 2  # two rows finished before the kill
    store.kill_after = None
    resumed = compute_landscape(model, x, y, config, store=store)
    assert resumed.cached_points == 10 and store.puts == 5
    details = resumed.details()
    assert details["loss"] == fresh["loss"] and details["accuracy"] == fresh["accuracy"]
    assert details["evaluation"]["cached_points"] == 10
    again = compute_landscape(model, x, y, config, store=store)
    assert again.cached_points == 25 and again.details()["loss"] == fresh["loss"]


def test_other_options_miss_the_store():
    model, x, y = make_case("mlp_tanh", n=6)
    store = DictStore()
    compute_landscape(model, x, y, LandscapeConfig(steps=3), store=store)
    keys = list(store.values)
    assert len(keys) == 1 and ("block", "[0, 3]") in keys[0]


class _Gathered(Exception):
    """Stops the run of a simulated rank once its share is gathered."""


def test_ranks_evaluate_their_share_of_the_blocks_and_return_the_whole_grid(monkeypatch):
    """Two ``torchrun`` ranks, simulated in this process one after the other: each evaluates
    its contiguous share of the rows on all the examples; the gathered shares make the grid."""
    model, x, y = make_case("cnn_bn", n=11)
    config = LandscapeConfig(dims=2, steps=5, range=0.5, points_per_pass=2)
    single = compute_landscape(model, x, y, config).details()
    shares, evaluated = {}, {}

    def as_rank(rank: int) -> None:
        def split(items):
            a, b = distributed.shard_bounds(len(items), rank=rank, world=2)
            return list(items[a:b])

        def gather(obj):
            shares[rank] = obj
            if rank == 1:
                raise _Gathered
            return [shares[0], shares[1]]

        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "split_items", split)
        monkeypatch.setattr(distributed, "gather_objects", gather)

    class Spy(DictStore):
        def put(self, key, value):
            evaluated.setdefault(self.rank, []).append(key["block"])

    for rank in (1, 0):
        as_rank(rank)
        spy = Spy()
        spy.rank = rank
        try:
            result = compute_landscape(model, x, y, config, store=spy)
        except _Gathered:
            continue
    assert evaluated == {0: [[0, 5], [5, 10], [10, 15]], 1: [[15, 20], [20, 25]]}
    assert result.details()["loss"] == single["loss"]
    assert result.details()["accuracy"] == single["accuracy"]
