"""Adaptive sharpness (Kwon et al. 2021; worst-case form of Andriushchenko et al. 2023).

``max L(w + δ) − L(w)`` over ``‖δ ⊘ |w|‖_p <= ρ`` (p = ∞ or 2), L the mean
``config.loss``, maximised by projected ascent in δ/|w| from 0
(:func:`._worst_case.adaptive_sharpness`). Unchanged by any positive diagonal rescaling of the
weights that leaves the network's function unchanged (layer-, neuron- and BN-scaling).
"""

from __future__ import annotations

from flatcli.measures.sharpness._definition import Definition, Outcome, Shared, define
from flatcli.measures.sharpness._worst_case import adaptive_sharpness, outcome

NAME = "adaptive_sharpness"


def compute(shared: Shared) -> Outcome:
    """``config.adaptive_steps`` ascent steps in the ball of radius ``config.adaptive_rho``."""
    config = shared.config
    return outcome(
        shared,
        adaptive_sharpness,
        rho=config.adaptive_rho,
        p=config.adaptive_p,
        steps=config.adaptive_steps,
    )


define(
    Definition(
        name=NAME,
        order=50,
        header="adaptive",
        label="adaptive sharpness",
        source="Kwon et al. 2021; Andriushchenko et al. 2023",
        description="max over ‖δ/|w|‖_p ≤ ρ of L(w+δ) − L(w)",
        passes=lambda config, _: config.adaptive_steps + 1,
        cost="--adaptive-steps + 1 gradient passes over the examples",
        compute=compute,
    )
)
