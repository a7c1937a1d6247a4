"""What a ``pacbayes`` run will cost, said before it starts.

The run is a sequence of passes over examples: the data-dependent prior's SGD epochs, the
posterior's epochs (a sampled forward and a backward per example), and the Monte-Carlo
estimates, one forward of every certified (and test) example per weight sample. Counted in
example forward passes and timed on one forward of the run's own examples, the estimate is
``passes × seconds per example``; the Monte-Carlo steps run at about the forward-pass floor
(docs/benchmarks.md), so it is tight where they dominate.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatcli.curvature.operators import eval_mode
from flatcli.progress import WARN_SECONDS, format_seconds

__all__ = ["PacBayesCost", "announce_cost", "count_passes", "time_forward"]

BACKWARD_FACTOR = 3.0
"""A training step (forward and backward) in forward passes: the usual 1 + 2."""

TIMING_EXAMPLES = 512
"""Examples in the timed forward."""


@dataclass(frozen=True)
class PacBayesCost:
    """Example forward passes per stage and the time per example forward."""

    prior: float
    posterior: float
    monte_carlo: float
    test: float
    seconds_per_example: float

    @property
    def passes(self) -> float:
        """All stages' example forward passes."""
        return self.prior + self.posterior + self.monte_carlo + self.test

    @property
    def seconds(self) -> float:
        """The estimated time of the whole run."""
        return self.passes * self.seconds_per_example

    def line(self) -> str:
        """One line for the user: the count, the time, the dominant stage, what is cheaper."""
        share = self.monte_carlo / max(self.passes, 1.0)
        per = self.seconds_per_example * 1e6
        return (
            f"pacbayes: about {self.passes:,.0f} example forward passes × {per:.3g} µs ≈ "
            f"{format_seconds(self.seconds)} (Monte Carlo {share:.0%}); fewer --mc-samples "
            "(a looser certificate), fewer --epochs/--prior-epochs or --max-examples is cheaper"
        )


def count_passes(
    *,
    n: int,
    prior_examples: int,
    prior_epochs: int,
    epochs: int,
    bound_examples: int,
    mc_samples: int,
    test_examples: int,
    test_mc_samples: int,
    processes: int = 1,
) -> tuple[float, float, float, float]:
    """Example forward passes of (prior, posterior, Monte Carlo, test Monte Carlo) per process.

    Training steps count :data:`BACKWARD_FACTOR` forwards per example; the Monte-Carlo samples
    are shared out over ``processes`` (torchrun), the training is not.

    >>> count_passes(n=4000, prior_examples=2000, prior_epochs=20, epochs=20,
    ...              bound_examples=2000, mc_samples=1000, test_examples=1000,
    ...              test_mc_samples=100)
    (120000.0, 240000.0, 2000000.0, 100000.0)
    """
    prior = BACKWARD_FACTOR * prior_epochs * prior_examples
    posterior = BACKWARD_FACTOR * epochs * n
    mc = mc_samples * bound_examples / max(1, processes)
    test = test_mc_samples * test_examples / max(1, processes)
    return float(prior), float(posterior), float(mc), float(test)


def time_forward(model: nn.Module, x: Tensor, repeats: int = 2) -> float:
    """Seconds per example of a no-grad forward over the first :data:`TIMING_EXAMPLES` of
    ``x``, the best of ``repeats`` timed runs after one warm-up."""
    xb = x[:TIMING_EXAMPLES]
    best = float("inf")
    with torch.no_grad(), eval_mode(model):
        model(xb)
        for _ in range(repeats):
            start = time.perf_counter()
            model(xb)
            best = min(best, time.perf_counter() - start)
    return best / max(1, xb.shape[0])


def announce_cost(
    model: nn.Module,
    x: Tensor,
    *,
    prior_examples: int,
    prior_epochs: int,
    epochs: int,
    mc_samples: int,
    test_examples: int,
    test_mc_samples: int,
    processes: int = 1,
) -> PacBayesCost:
    """Time one forward of ``x``'s first examples, count the run's passes, and issue
    :meth:`PacBayesCost.line` as a ``UserWarning`` when the estimate exceeds
    :data:`~flatcli.progress.WARN_SECONDS`. ``x`` holds all n training examples; the bound
    gets the ``n - prior_examples`` that the prior does not."""
    n = int(x.shape[0])
    counts = count_passes(
        n=n,
        prior_examples=prior_examples,
        prior_epochs=prior_epochs if prior_examples else 0,
        epochs=epochs,
        bound_examples=n - prior_examples,
        mc_samples=mc_samples,
        test_examples=test_examples,
        test_mc_samples=test_mc_samples,
        processes=processes,
    )
    cost = PacBayesCost(*counts, seconds_per_example=time_forward(model, x))
    if cost.seconds > WARN_SECONDS:
        warnings.warn(cost.line(), UserWarning, stacklevel=2)
    return cost
