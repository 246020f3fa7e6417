"""The default schedule: measure as often as a share of the fit's wall time allows.

A callback given neither ``every_n_train_steps`` nor ``every_n_epochs`` keeps the time it spends
measuring (measurement, figures and logging) to at most ``share`` of the time the fit spends on
everything else (training steps, validation, data loading, other callbacks): after a measurement
that took ``c`` seconds, the next waits until the fit has spent ``c / share`` seconds on other
things, so frames come evenly spaced and never in bursts. The first waits ``estimate / share``
from the start of the fit, ``estimate`` being the callback's guess of its cost before it has
measured once, but never more than ``first_within`` (60 s) of training: a user who trains for a minute sees a
frame. (The callbacks also take the first frame at the end of the first epoch if none came before, and one at the
end of the fit; the budget spaces the rest.)

A callback cannot watch the clock at every step under DDP without a collective per step, so it
*plans*: at a check step it measures if the wait is over, then sets the next check to the step at
which, at the average step time so far, the wait will be over. Checks are rare (about one per
measurement), and under DDP the decision and the plan are rank zero's, broadcast, so all ranks
measure at the same steps.

Over a fit of wall time ``T`` a callback spends about ``share · T``: more by the amount one
measurement costs over the one before it, less by the wait after the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_OVERHEAD", "OverheadBudget"]

#: Share of the fit's wall time that the callbacks on one trainer using the default schedule take together.
DEFAULT_MAX_OVERHEAD = 0.05


@dataclass
class OverheadBudget:
    """When to measure so that measuring costs at most ``share`` of the other wall time.

    Times are seconds from any monotonic clock; steps are optimizer steps. ``others`` is the time
    other measurement callbacks spent in the same fit (it is neither this callback's budget nor
    training time). The caller adds each measurement's cost to ``spent`` and sets ``last_cost``
    (:meth:`measured`).

    Example:
        >>> budget = OverheadBudget(share=0.25)
        >>> budget.start(now=0.0, step=0)
        >>> budget.next_check                       # the first check follows the first step
        1
        >>> budget.should_measure(now=1.0, others=0.0, estimate=1.0)   # 25% of 1 s pays for 0.25 s
        False
        >>> budget.plan(now=1.0, step=1, others=0.0, estimate=1.0)     # 1 s a step: 3 steps more
        4
        >>> budget.should_measure(now=4.0, others=0.0, estimate=1.0)
        True
        >>> budget.measured(now=5.0, others=0.0, cost=1.0)             # it took 1 s
        >>> budget.plan(now=5.0, step=4, others=0.0)                   # the next waits 4 s of training
        8
    """

    share: float
    #: the first measurement waits at most this many seconds of training (a user sees a frame early)
    first_within: float = 60.0
    spent: float = 0.0
    last_cost: float | None = None
    next_check: int = 1
    _t0: float = 0.0
    _step0: int = 0
    _mark: float = 0.0  # other time at the end of the last measurement (or at the start)

    def start(self, now: float, step: int) -> None:
        """Begin a fit at wall time ``now`` and optimizer step ``step``; nothing spent yet."""
        self._t0, self._step0, self.spent, self.next_check, self._mark = now, step, 0.0, step + 1, 0.0

    def due(self, step: int) -> bool:
        """Whether ``step`` is a check step."""
        return step >= self.next_check

    def other_time(self, now: float, others: float) -> float:
        """Seconds of the fit so far not spent measuring by this callback or ``others``."""
        return max(now - self._t0 - self.spent - others, 0.0)

    def _wait(self, estimate: float | None) -> float:
        if self.last_cost is not None:
            return self.last_cost / self.share
        if estimate is None:
            raise ValueError("the first decision needs a cost `estimate`")
        return min(estimate / self.share, self.first_within)

    def should_measure(self, now: float, others: float, estimate: float | None = None) -> bool:
        """Whether the wait after the last measurement (its cost over ``share``; first: ``estimate``'s) is over."""
        return self.other_time(now, others) - self._mark >= self._wait(estimate)

    def measured(self, now: float, others: float, cost: float) -> None:
        """Record a measurement that took ``cost`` seconds and ended at ``now``."""
        self.spent += cost
        self.last_cost = cost
        self._mark = self.other_time(now, others)

    def plan(self, now: float, step: int, others: float, estimate: float | None = None) -> int:
        """Set and return the next check step: where, at the average step time so far, the wait is over."""
        other = self.other_time(now, others)
        remaining = self._wait(estimate) - (other - self._mark)
        per_step = other / max(step - self._step0, 1)
        if remaining <= 0 or per_step <= 0:
            self.next_check = step + 1
        else:
            self.next_check = step + max(1, math.ceil(remaining / per_step))
        return self.next_check
