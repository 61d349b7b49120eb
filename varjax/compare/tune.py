"""Learning-rate tuning for ``python -m varjax compare --tune``: a log-spaced grid per optimizer.

Each optimizer is trained at every rate of a grid centred on its default rate
(``rate / span`` to ``rate * span``, evenly spaced in log); its best rate is the
one with the lowest final validation loss (mean over seeds). A rate whose loss
is not finite (a diverged run) is never the best unless every rate diverged,
when the smallest is kept.

Examples:
  >>> rate_grid(3e-3, points=5, span=10.0)
  [0.0003, 0.000949, 0.003, 0.00949, 0.03]
  >>> points = [GridPoint(r, v, [v], 0.0) for r, v in [(1e-3, 2.5), (3e-3, 2.1), (1e-2, 2.3)]]
  >>> best_point(points).learning_rate
  0.003
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["GridPoint", "Tuning", "best_point", "rate_grid"]


def rate_grid(rate: float, *, points: int, span: float) -> list[float]:
    """``points`` rates from ``rate / span`` to ``rate * span``, evenly spaced in log and
    rounded to 3 significant digits; an odd ``points`` puts ``rate`` itself in the middle.

    Examples:
      >>> rate_grid(1e-3, points=3, span=4.0)
      [0.00025, 0.001, 0.004]
      >>> rate_grid(1e-3, points=1, span=4.0)
      [0.001]
    """
    if points < 1 or not span >= 1 or not rate > 0:
        raise ValueError(f"want points >= 1, span >= 1 and rate > 0, got {points}, {span}, {rate}")
    if points == 1:
        return [float(f"{rate:.3g}")]
    exponents = np.linspace(-1.0, 1.0, points)
    return [float(f"{rate * span**e:.3g}") for e in exponents]


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One learning rate of the grid: the final validation loss (mean over seeds, and
    per seed) and the final training loss (mean over seeds of the last interval's mean)."""

    learning_rate: float
    valid: float
    valid_per_seed: list[float]
    train: float


@dataclasses.dataclass(frozen=True)
class Tuning:
    """An optimizer's grid, with the rate it was built with (the grid's centre) and the
    best rate; ``steps``: the training steps of each grid run; ``initial_valid``: the
    validation loss before training (mean over seeds; the same for every rate)."""

    default_rate: float
    points: list[GridPoint]
    best_rate: float
    steps: int
    initial_valid: float

    @property
    def at_edge(self) -> bool:
        """Whether the best rate is the grid's smallest or largest (then widen the span)."""
        rates = [p.learning_rate for p in self.points]
        return len(rates) > 1 and self.best_rate in (min(rates), max(rates))


def _key(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def best_point(points: Sequence[GridPoint]) -> GridPoint:
    """The point with the lowest finite validation loss (the smallest rate on ties, or
    when every loss is infinite or NaN)."""
    ordered = sorted(points, key=lambda p: p.learning_rate)
    return min(ordered, key=lambda p: _key(p.valid))
