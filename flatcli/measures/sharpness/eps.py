"""ε-sharpness (Keskar et al. 2017, Metric 2.1): the largest loss increase in a box.

``100 · (max L(w + δ) − L(w)) / (1 + L(w))`` over ``|δ_k| <= ε (|w_k| + 1)``, L the mean
``config.loss``, maximised by projected sign-gradient ascent from δ = 0
(:func:`._worst_case.eps_sharpness`).
"""

from __future__ import annotations

from flatcli.measures.sharpness._definition import Definition, Outcome, Shared, define
from flatcli.measures.sharpness._worst_case import eps_sharpness, outcome

NAME = "eps_sharpness"


def compute(shared: Shared) -> Outcome:
    """``config.eps_steps`` ascent steps in the box of size ``config.eps``."""
    return outcome(shared, eps_sharpness, eps=shared.config.eps, steps=shared.config.eps_steps)


define(
    Definition(
        name=NAME,
        order=40,
        header="ε-sharpness %",
        label="eps-sharpness",
        source="Keskar et al. 2017, Metric 2.1",
        description="100·(max L(w+δ) − L(w))/(1 + L(w)) over the box |δ| ≤ ε(|w|+1)",
        passes=lambda config, _: config.eps_steps + 1,
        cost="--eps-steps + 1 gradient passes over the examples",
        compute=compute,
    )
)
