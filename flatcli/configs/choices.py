"""Choices several configs offer: the loss heads."""

from __future__ import annotations

from flatcli.options import choices

__all__ = ["LossName", "CLASS_LOSSES", "ALL_LOSSES"]


LossName = choices(
    "LossName", "ce nsce token-ce mse bce", "Loss heads a user can choose on the command line."
)

CLASS_LOSSES = ("ce", "nsce")
"""The losses over class logits (N, K) with int64 labels (N,): what a measure needing classes
takes, and what a registered measure that declares no losses takes."""

ALL_LOSSES = tuple(m.value for m in LossName)
"""Every loss (docs: "Your model", Losses)."""
