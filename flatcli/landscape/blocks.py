"""A grid's blocks evaluated once: taken from a store where finished, shared over ``torchrun``
processes, stored as each finishes.

A killed run leaves every finished block in the store (a resumed one reads them back and
evaluates the rest); under ``torchrun`` every process evaluates its contiguous share of the
blocks (:func:`flatcli.distributed.split_items`) on all the examples, and the shares are
gathered. Values pass through JSON either way, so stored and fresh blocks give the same numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from flatcli import distributed

__all__ = ["BlockStore", "BlockValue", "run_blocks"]

BlockValue = dict[str, list]
"""A finished block: ``{"loss": [mean loss per point], "correct": [correct predictions]}``; a
loss that is not finite is None."""


class BlockStore(Protocol):
    """Where finished blocks are kept between runs (e.g. the CLI's result cache)."""

    def get(self, key: dict[str, Any]) -> BlockValue | None:
        """The value stored under ``key``, or None."""
        ...

    def put(self, key: dict[str, Any], value: BlockValue) -> None:
        """Store ``value`` under ``key``."""
        ...


def run_blocks(
    blocks: Sequence[tuple[int, int]],
    evaluate: Callable[[int, int, Callable[[float], None]], BlockValue],
    *,
    key: dict[str, Any],
    store: BlockStore | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[BlockValue, int]:
    """Every block's value, concatenated in block order, and how many points came from the store.

    Args:
        blocks: ``[start, stop)`` ranges of points, in order.
        evaluate: ``evaluate(start, stop, fraction)`` computes a block, calling ``fraction(f)``
            as it goes (f from 0 to 1).
        key: what identifies the values besides the block (the store's key adds the block).
        store: finished blocks from earlier runs (None: none).
        progress: called with the number of points done (this process's share).
    """
    mine = distributed.split_items(list(blocks)) if distributed.active() else list(blocks)
    done, cached = 0, 0
    values: dict[int, BlockValue] = {}
    for start, stop in mine:
        block_key = {**key, "block": [start, stop]}
        value = store.get(block_key) if store is not None else None
        if value is None:

            def fraction(f: float, base: int = done, size: int = stop - start) -> None:
                if progress is not None:
                    progress(base + int(f * size))

            value = _plain(evaluate(start, stop, fraction))
            if store is not None:
                store.put(block_key, value)
        else:
            cached += stop - start
        values[start] = value
        done += stop - start
        if progress is not None:
            progress(done)
    if distributed.active():
        shares = distributed.gather_objects((values, cached))
        values = {k: v for share, _ in shares for k, v in share.items()}
        cached = sum(c for _, c in shares)
    out: BlockValue = {"loss": [], "correct": []}
    for start, _ in blocks:
        out["loss"] += values[start]["loss"]
        out["correct"] += values[start]["correct"]
    return out, cached


def _plain(value: BlockValue) -> BlockValue:
    """``value`` as it comes back from JSON: floats and ints, a non-finite loss as None."""
    loss = [v if v is not None and math.isfinite(v) else None for v in value["loss"]]
    return json.loads(json.dumps({"loss": loss, "correct": value["correct"]}, allow_nan=False))
