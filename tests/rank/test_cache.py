"""The result cache: hits, misses, foreign or broken entries, atomic writes."""

from __future__ import annotations

import torch

from flatcli.rank.cache import ResultCache, data_fingerprint


def _key(cache, **over):
    args = {
        "sha256": "ab" * 32,
        "measure": "toy",
        "config": {"scale": 1.0},
        "fingerprint": "f",
        "device": "cpu",
        "dtype": "float64",
    }
    args.update(over)
    return cache.key(
        args["sha256"],
        args["measure"],
        args["config"],
        args["fingerprint"],
        args["device"],
        args["dtype"],
    )


def test_roundtrip_and_misses(tmp_path):
    cache = ResultCache(tmp_path)
    key = _key(cache)
    assert cache.get(key) is None
    value = {"metrics": {"b": 2.0, "a": 0.1}, "details": {"x": [1, 2]}, "seconds": 0.5}
    cache.put(key, value)
    got = cache.get(key)
    assert got == value and list(got["metrics"]) == ["b", "a"]  # order kept
    assert cache.get(_key(cache, config={"scale": 2.0})) is None
    assert cache.get(_key(cache, fingerprint="g")) is None
    assert cache.get(_key(cache, device="cuda:1")) is None
    assert _key(cache, device="cuda:1") == _key(cache, device="cuda")
    assert (cache.hits, cache.misses) == (1, 4)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_broken_or_foreign_entries_are_misses(tmp_path):
    cache = ResultCache(tmp_path)
    key = _key(cache)
    cache.put(key, {"metrics": {}, "details": {}, "seconds": 0})
    (entry,) = list(tmp_path.rglob("*.json"))
    entry.write_text("{ half a file")
    assert cache.get(key) is None
    entry.write_text('{"key": {"sha256": "other"}, "value": {}}')
    assert cache.get(key) is None
    cache.put(key, {"metrics": {"a": 1}, "details": {}, "seconds": 0})
    assert cache.get(key)["metrics"] == {"a": 1}


def test_no_cache_stores_nothing(tmp_path):
    cache = ResultCache(None)
    key = _key(cache)
    cache.put(key, {"metrics": {}, "details": {}, "seconds": 0})
    assert cache.get(key) is None and cache.misses == 1


def test_data_fingerprint_sees_values_and_split():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    a = data_fingerprint(x, y, "train")
    assert a == data_fingerprint(x.clone(), y.clone(), "train")
    assert a != data_fingerprint(x + 1e-7, y, "train")
    assert a != data_fingerprint(x, y, "test")
    assert a != data_fingerprint(x.double(), y, "train")
