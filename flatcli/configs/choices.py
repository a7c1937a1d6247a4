"""Choices several configs offer: the loss heads."""

from __future__ import annotations

from flatcli.options import choices

__all__ = ["LossName"]


LossName = choices("LossName", "ce nsce", "Loss heads a user can choose on the command line.")
