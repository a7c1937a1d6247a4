"""prepare_train_split: training subset, random labels, confusion set; seeded and nested."""

from __future__ import annotations

import json

import pytest
import torch

from flatcli.data import Split
from flatcli.errors import UsageError
from flatcli.train import CONFUSION_SOURCE, TrainConfig, prepare_train_split

K = 10


def _pool(n: int = 2000) -> Split:
    """Each input row holds its own index, so a test can tell where every example came from."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Split(x, torch.arange(n) % K)


def _rows(split: Split) -> torch.Tensor:
    return split.x[:, 0, 0, 0].long()


def test_defaults_return_the_pool_unchanged():
    pool = _pool(50)
    out, info = prepare_train_split(pool, K, TrainConfig())
    assert torch.equal(out.x, pool.x) and torch.equal(out.y, pool.y)
    assert info["size"] == 50 and info["random_labels_changed"] == 0
    assert info["confusion_size"] == 0 and info["subset_sha256"] is None
    assert json.loads(json.dumps(info)) == info


def test_train_subset_is_seeded_random_and_nested():
    pool = _pool()
    a, info = prepare_train_split(pool, K, TrainConfig(train_subset=300, seed=1))
    b, _ = prepare_train_split(pool, K, TrainConfig(train_subset=300, seed=1))
    c, _ = prepare_train_split(pool, K, TrainConfig(train_subset=300, seed=2))
    big, _ = prepare_train_split(pool, K, TrainConfig(train_subset=600, seed=1))
    assert len(a) == 300 and info["rows"] == {"subset": [0, 300], "confusion": [300, 300]}
    rows = _rows(a)
    assert rows.unique().numel() == 300
    assert torch.equal(a.y, pool.y[rows])  # labels travel with their examples
    assert torch.equal(rows, _rows(b)) and info["subset_sha256"] is not None
    assert not torch.equal(rows, _rows(c))
    assert torch.equal(_rows(big)[:300], rows)  # a larger subset adds examples
    assert rows.tolist() != sorted(rows.tolist())  # not the first 300 of the pool


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_random_labels_replace_the_fraction_and_change_about_1_minus_1_over_k(fraction):
    pool = _pool()
    out, info = prepare_train_split(pool, K, TrainConfig(random_labels=fraction, seed=3))
    n = len(pool)
    replaced = round(fraction * n)
    changed = int((out.y != pool.y).sum())
    assert info["random_labels_replaced"] == replaced
    assert info["random_labels_changed"] == changed
    # each replaced label is uniform over K classes: it changes with probability 1 - 1/K
    mean, std = replaced * (1 - 1 / K), (replaced * (1 / K) * (1 - 1 / K)) ** 0.5
    assert abs(changed - mean) < 5 * std
    assert torch.equal(out.x, pool.x)
    assert int(out.y.min()) >= 0 and int(out.y.max()) < K


def test_random_labels_are_deterministic_and_nested_in_the_fraction():
    pool = _pool()
    small, _ = prepare_train_split(pool, K, TrainConfig(random_labels=0.2, seed=5))
    again, _ = prepare_train_split(pool, K, TrainConfig(random_labels=0.2, seed=5))
    large, _ = prepare_train_split(pool, K, TrainConfig(random_labels=0.6, seed=5))
    other, _ = prepare_train_split(pool, K, TrainConfig(random_labels=0.2, seed=6))
    assert torch.equal(small.y, again.y)
    assert not torch.equal(small.y, other.y)
    changed_small = small.y != pool.y
    assert torch.equal(large.y[changed_small], small.y[changed_small])  # same new labels
    # a different seed for prepare_train_split than config.seed
    explicit, info = prepare_train_split(pool, K, TrainConfig(random_labels=0.2), seed=5)
    assert torch.equal(explicit.y, small.y) and info["seed"] == 5


def test_random_labels_apply_to_the_subset_only_and_leave_its_draw_alone():
    pool = _pool()
    clean, _ = prepare_train_split(pool, K, TrainConfig(train_subset=500, seed=0))
    noisy, info = prepare_train_split(
        pool, K, TrainConfig(train_subset=500, random_labels=0.4, seed=0)
    )
    assert torch.equal(noisy.x, clean.x)
    assert info["random_labels_replaced"] == 200


def test_confusion_set_size_source_and_labels():
    pool = _pool()
    config = TrainConfig(train_subset=1000, confusion_size=800, seed=4)
    out, info = prepare_train_split(pool, K, config)
    assert len(out) == 1800 and info["size"] == 1800
    assert info["rows"] == {"subset": [0, 1000], "confusion": [1000, 1800]}
    assert info["confusion_source"] == CONFUSION_SOURCE
    rows = _rows(out)
    subset_rows, confusion_rows = rows[:1000], rows[1000:]
    assert rows.unique().numel() == 1800  # drawn from the pool outside the subset
    assert set(subset_rows.tolist()).isdisjoint(confusion_rows.tolist())
    # the subset is the same as without a confusion set
    alone, _ = prepare_train_split(pool, K, TrainConfig(train_subset=1000, seed=4))
    assert torch.equal(out.x[:1000], alone.x) and torch.equal(out.y[:1000], alone.y)
    # the subset keeps its true labels; confusion labels are uniform random
    assert torch.equal(out.y[:1000], pool.y[subset_rows])
    changed = int((out.y[1000:] != pool.y[confusion_rows]).sum())
    assert info["confusion_changed"] == changed
    assert abs(changed - 800 * 0.9) < 5 * (800 * 0.09) ** 0.5
    # nested in the size
    fewer, _ = prepare_train_split(
        pool, K, TrainConfig(train_subset=1000, confusion_size=300, seed=4)
    )
    assert torch.equal(fewer.x, out.x[:1300]) and torch.equal(fewer.y, out.y[:1300])
    assert json.loads(json.dumps(info)) == info


def test_confusion_needs_a_subset_that_leaves_room():
    pool = _pool(100)
    with pytest.raises(UsageError, match="confusion_size=10 needs train_subset.*train_subset=90"):
        prepare_train_split(pool, K, TrainConfig(confusion_size=10))
    with pytest.raises(UsageError, match=r"train_subset \(95\) \+ confusion_size \(10\) exceeds"):
        prepare_train_split(pool, K, TrainConfig(train_subset=95, confusion_size=10))
    with pytest.raises(UsageError, match=r"train_subset \(101\) exceeds the 100 examples"):
        prepare_train_split(pool, K, TrainConfig(train_subset=101))
    with pytest.raises(UsageError, match="at least 2 classes"):
        prepare_train_split(pool, 1, TrainConfig(random_labels=0.5))
