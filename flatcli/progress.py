"""The progress callback that long library computations accept (the CLI draws it as a bar).

:class:`Budget` drives one callback over a computation's stages with a real total (products, or
whatever unit its stages count) and, once the second step has been timed, says the cost up
front: a ``UserWarning`` (``"spectrum: about 230 Hessian-vector products × 0.6 s ≈ 2.3 min;
--max-examples or a smaller --top-k is cheaper"``) when the estimate exceeds
:data:`WARN_SECONDS`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
"""``progress(description, completed, total)``; libraries call it, never print."""

WARN_SECONDS = 10.0
"""A :class:`Budget` whose estimated time exceeds this many seconds says so in a warning."""

clock: Callable[[], float] = time.perf_counter
"""The clock :class:`Budget` times its steps with (tests replace it)."""


def no_progress(description: str, completed: int, total: int) -> None:
    """A :data:`ProgressFn` that does nothing."""


def format_seconds(seconds: float) -> str:
    """A duration for people: ``"40 s"``, ``"3.2 min"``, ``"2.5 h"``."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Budget:
    """One progress callback over stages whose step budgets add up to ``total``.

    ``stage(name, budget)`` returns the stage's own ``(description, done, total)`` callback; its
    ``done`` is offset by the stages before and capped at ``budget``, and a stage that stops early
    (a converged Lanczos run, an adaptive trace) jumps to its budget when the next stage starts or
    at :meth:`finish`. So ``done <= total`` always and the last call is ``(total, total)``.

    The cost is measured on the second reported step (the first may build a cached graph):
    ``seconds per unit × total``. When it exceeds ``warn_seconds`` one ``UserWarning``
    ``"{label}: about {total} {unit} × {per} ≈ {time}; {cheaper} is cheaper"`` is issued and the
    progress descriptions end with ``(≈ time)``.

    Args:
        progress: the caller's callback (None: none).
        label: what is computed (``"spectrum"``); prefixes each description.
        total: the sum of the stages' budgets.
        unit: what the budgets count (``"Hessian-vector products"``).
        cheaper: the options that make it cheaper (``"--max-examples or a smaller --top-k"``).
        warn_seconds: the threshold; default :data:`WARN_SECONDS`.
        may_stop_early: a stage may stop before its budget (a converging Lanczos run): the
            line then says ``"up to {total}"`` and the descriptions ``(≤ time)``.
    """

    def __init__(
        self,
        progress: ProgressFn | None,
        label: str,
        total: int,
        *,
        unit: str,
        cheaper: str,
        warn_seconds: float | None = None,
        may_stop_early: bool = False,
    ) -> None:
        self.progress = progress or no_progress
        self.bound = "up to" if may_stop_early else "about"
        self.label, self.unit, self.cheaper = label, unit, cheaper
        self.total = max(1, int(total))
        self.warn_seconds = WARN_SECONDS if warn_seconds is None else warn_seconds
        self.done = 0
        self.estimate: float | None = None
        self._suffix = ""
        self._name = ""
        self._base = self._budget = 0
        self._timed: list[tuple[float, int]] = []

    def stage(self, name: str, budget: int) -> ProgressFn:
        """Start stage ``name`` of at most ``budget`` steps; returns its callback."""
        self._close()
        self._name, self._base, self._budget = name, self.done, max(0, int(budget))
        self._report(self.done)
        return self._step

    def finish(self) -> None:
        """The last call: ``(total, total)``."""
        self._close()
        self.done = self.total
        self._report(self.total)

    def _step(self, _description: str, done: int, _total: int) -> None:
        self._report(self._base + min(max(0, int(done)), self._budget))

    def _close(self) -> None:
        if self._budget:
            self.done = min(self.total, self._base + self._budget)
            self._budget = 0

    def _report(self, done: int) -> None:
        self.done = done = min(done, self.total)
        if self.estimate is None and done > 0:
            self._time(done)
        self.progress(f"{self.label}: {self._name}{self._suffix}", done, self.total)

    def _time(self, done: int) -> None:
        if self._timed and done <= self._timed[-1][1]:
            return
        self._timed.append((clock(), done))
        if len(self._timed) < 2:
            return
        (t1, d1), (t2, d2) = self._timed[-2:]
        per = (t2 - t1) / (d2 - d1)
        self.estimate = per * self.total
        if self.estimate > self.warn_seconds:
            when = format_seconds(self.estimate)
            self._suffix = f" ({'≤' if self.bound == 'up to' else '≈'} {when})"
            warnings.warn(
                f"{self.label}: {self.bound} {self.total:,} {self.unit} × {format_seconds(per)} ≈ "
                f"{when}; {self.cheaper} is cheaper",
                UserWarning,
                stacklevel=2,
            )
