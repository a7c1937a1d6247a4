"""The training split a run actually trains on: subset, random labels, confusion set.

Everything is decided by the seed, from CPU generators, so the same (split, config, seed) gives
the same examples and labels on every device. Each kind of draw has its own generator stream,
and every draw is *nested*: with one seed, a larger ``train_subset`` adds examples to a smaller
one, a larger ``random_labels`` fraction corrupts a superset of the labels a smaller one
corrupts (with the same new labels), and a larger ``confusion_size`` adds confusion examples.
Experiments that vary one knob therefore change nothing else.

Where the confusion set comes from (fisher-gamma-local-minima.md §7.1, Scenario I: a random
training subset of 10,000 CIFAR-10 images plus "a confusion set consisting of CIFAR-10 samples
with random labels"): flatcli draws the confusion examples from the *training* split, among
the examples left out of the training subset, and gives each a label drawn uniformly from the
K classes (so about 1/K of them keep their true label; ``info`` counts how many changed). The
test split is never touched, so test error stays an honest estimate. A confusion set therefore
needs ``train_subset``, with ``train_subset + confusion_size`` at most the training split's size.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from flatcli.data import Split
from flatcli.errors import UsageError
from flatcli.train.config import TrainConfig

CONFUSION_SOURCE = "training split, examples outside the training subset, uniform random labels"


def _generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one named stream of draws derived from ``seed``."""
    digest = hashlib.sha256(f"flatcli.train:{int(seed)}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _sha256(indices: torch.Tensor) -> str:
    """Short fingerprint of an index list (int64 little-endian bytes), to check a record."""
    data = indices.to(device="cpu", dtype=torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def prepare_train_split(
    train: Split, num_classes: int, config: TrainConfig, seed: int | None = None
) -> tuple[Split, dict[str, Any]]:
    """Apply ``train_subset``, ``random_labels`` and ``confusion_size`` of ``config`` to ``train``.

    Token targets (N, T) and float targets take only ``train_subset``: random labels and a
    confusion set are class labels (a UsageError for those targets).

    Args:
        train: the dataset's training split (the pool).
        num_classes: K; random labels are uniform over ``0..K-1``.
        config: reads ``train_subset``, ``random_labels``, ``confusion_size``.
        seed: seed of every draw; None uses ``config.seed``.

    Returns:
        ``(split, info)``. ``split`` holds the training subset in rows ``[0, n)`` (its labels
        partly randomised when ``random_labels > 0``) followed by the confusion set in rows
        ``[n, n + C)``. Without ``train_subset`` the subset is the whole pool in stored order.
        ``info`` is a small JSON-ready record: sizes, the rows of each part, how many labels
        were replaced and how many of those actually changed, and sha256 fingerprints (first
        16 hex digits) of the chosen pool indices.

    >>> s = Split(torch.zeros(10, 2), torch.arange(10) % 2)
    >>> out, info = prepare_train_split(s, 2, TrainConfig(train_subset=6, confusion_size=4))
    >>> len(out), info["rows"]
    (10, {'subset': [0, 6], 'confusion': [6, 10]})
    """
    seed = config.seed if seed is None else int(seed)
    k = int(num_classes)
    pool = len(train)
    n = pool if config.train_subset is None else config.train_subset
    c = config.confusion_size
    classes = train.y.ndim == 1 and not train.y.dtype.is_floating_point
    if not classes and (config.random_labels or c):
        kind = "float" if train.y.dtype.is_floating_point else "token"
        raise UsageError(
            f"--random-labels and --confusion-size draw class labels; these are {kind} targets "
            f"of shape {tuple(train.y.shape)}"
        )
    if classes and k < 2:
        raise UsageError(f"random labels need at least 2 classes. Got num_classes={num_classes}.")
    if c and config.train_subset is None:
        raise UsageError(
            f"confusion_size={c} needs train_subset: confusion examples are drawn from the "
            f"training split outside the training subset, e.g. train_subset={max(pool - c, 1)}."
        )
    if n + c > pool:
        what = f"train_subset ({n}) + confusion_size ({c})" if c else f"train_subset ({n})"
        raise UsageError(
            f"{what} exceeds the {pool} examples of the training split; lower it to at most {pool}."
        )

    if config.train_subset is None:
        subset_idx = torch.arange(pool)
        perm = subset_idx
    else:
        perm = torch.randperm(pool, generator=_generator(seed, "subset"))
        subset_idx = perm[:n]
    confusion_idx = perm[n : n + c]

    device = train.y.device
    y_true = train.y.index_select(0, subset_idx.to(device)).cpu()
    y = y_true.clone()
    replaced = int(round(config.random_labels * n))
    changed = confusion_changed = 0
    y_out = y.to(device)
    if classes:  # token and float targets are trained on as stored (refused above otherwise)
        g = _generator(seed, "random_labels")
        positions = torch.randperm(n, generator=g)[:replaced]  # nested in the fraction
        new_labels = torch.randint(0, k, (n,), generator=g)[:replaced]
        y[positions] = new_labels
        changed = int((y != y_true).sum())

        g = _generator(seed, "confusion")
        confusion_true = train.y.index_select(0, confusion_idx.to(device)).cpu()
        confusion_y = torch.randint(0, k, (pool,), generator=g)[:c]  # nested in the size
        confusion_changed = int((confusion_y != confusion_true).sum())
        y_out = torch.cat([y, confusion_y]).to(device)

    idx = torch.cat([subset_idx, confusion_idx]).to(train.x.device)
    x_out = train.x.index_select(0, idx)

    info: dict[str, Any] = {
        "seed": seed,
        "pool_size": pool,
        "size": n + c,
        "rows": {"subset": [0, n], "confusion": [n, n + c]},
        "train_subset": config.train_subset,
        "subset_sha256": None if config.train_subset is None else _sha256(subset_idx),
        "random_labels": config.random_labels,
        "random_labels_replaced": replaced,
        "random_labels_changed": changed,
        "confusion_size": c,
        "confusion_source": CONFUSION_SOURCE if c else None,
        "confusion_changed": confusion_changed,
        "confusion_sha256": _sha256(confusion_idx) if c else None,
    }
    return Split(x_out, y_out), info


def rebuild_train_split(
    train: Split, num_classes: int, record: dict[str, Any], *, clean: bool = False
) -> Split:
    """The exact training data a ``flatcli train`` checkpoint was fitted to, from its record.

    Re-applies the recorded ``train_subset``, ``random_labels`` and ``confusion_size`` draws to
    the dataset's training split (``--split trained``), and checks the result against the
    recorded ``data_info`` (sizes, changed-label counts and index fingerprints).

    Args:
        train: the training split of the dataset the checkpoint records.
        num_classes: K of that dataset.
        record: the checkpoint's ``flatcli.meta`` record.
        clean: keep only the training subset (rows ``[0, n)``), without the confusion set
            (``--split trained-clean``); its labels are as trained (random labels included).

    Raises:
        CheckpointError: the record lacks the training configuration, or the rebuilt data does
            not match it (a different dataset or flatcli version drew other examples).
    """
    from flatcli.errors import CheckpointError

    if not isinstance(record.get("train"), dict):
        raise CheckpointError(
            "--split trained needs a checkpoint written by flatcli train (it records how the "
            "training data were drawn); use --split train for the dataset's own labels"
        )
    config = TrainConfig.from_dict({**record["train"], "device": "cpu"})
    split, info = prepare_train_split(train, num_classes, config, record.get("seed"))
    stored = record.get("data_info")
    if isinstance(stored, dict):
        keys = ("size", "subset_sha256", "random_labels_changed", "confusion_sha256")
        bad = [k for k in keys if stored.get(k) != info.get(k)]
        if bad:
            raise CheckpointError(
                f"the training data rebuilt from the checkpoint's record differ from the "
                f"recorded ones in {bad}; the dataset changed since training"
            )
    if clean:
        start, stop = info["rows"]["subset"]
        split = Split(split.x[start:stop], split.y[start:stop])
    return split
