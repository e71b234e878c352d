"""Statistics over seeds: means, standard deviations and paired differences with Student-t intervals.

For a strategy ``X`` and a baseline ``U`` at one budget, the paired difference over the seeds both ran is
``d_s = top1(X, s) - top1(U, s)``; its mean ``d`` has the 95 % interval ``d +- t_(0.975, n-1) * sd(d) / sqrt(n)``
(``sd`` with ``n - 1`` degrees of freedom). Pairing removes what the seed does to both (fine-tuning order, the
shared float models), so the interval is narrower than the two unpaired spreads suggest. With ``n < 2`` there is no
interval. The interval describes variation over seeds only: the test set is the same for every cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """``mean``, ``sd`` (None for n < 2) and ``n`` of a sample."""

    mean: float
    sd: float | None
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference, its standard deviation, n, and the 95 % interval (None for n < 2)."""

    mean: float
    sd: float | None
    n: int
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        """Whether the 95 % interval lies entirely on one side of 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample standard deviation of ``values`` (non-empty)."""
    if not values:
        raise ValueError("spread of an empty sample")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Spread(mean, sd, n)


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def paired_difference(x: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> PairedDifference | None:
    """The paired difference ``x - baseline`` over the seeds present in both (module docstring); None if none."""
    seeds = sorted(set(x) & set(baseline))
    if not seeds:
        return None
    diffs = [x[s] - baseline[s] for s in seeds]
    s = spread(diffs)
    if s.sd is None:
        return PairedDifference(s.mean, None, s.n, None, None)
    half = t_quantile(0.5 + confidence / 2, s.n - 1) * s.sd / math.sqrt(s.n)
    return PairedDifference(s.mean, s.sd, s.n, s.mean - half, s.mean + half)
