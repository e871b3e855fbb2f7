"""Confidence intervals: a percentile bootstrap over sequences, and Student's t over traces.

Hit rates of one trace are ratios of sums over its sequences (generate calls), which are the
independent units: a long answer weighs more than a short one, as in the pooled hit rate. The
bootstrap resamples whole sequences with replacement and recomputes the ratio (Efron and
Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13: the percentile interval). One set
of draws serves every policy and pool size of a trace, so the intervals of two rows (and of a
row's ratio to ``opt``) come from the same resamples: a paired comparison. Seeded: the same
trace gives the same intervals.

Across traces (say, several prompt sets), ``mean_ci`` gives mean +- t(0.975, n-1) * s / sqrt(n).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

LEVEL = 0.95
DEFAULT_RESAMPLES = 2000
# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30 (larger: 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


class Bootstrap:
    """``resamples`` draws of ``units`` indices with replacement, fixed at construction."""

    def __init__(self, units: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> None:
        if units < 1 or resamples < 1:
            raise ValueError(f"need units >= 1 and resamples >= 1, got {units}, {resamples}")
        rng = random.Random(seed)
        population = range(units)
        self.units, self.resamples = units, resamples
        self.draws = [rng.choices(population, k=units) for _ in range(resamples)]

    def ratio_ci(self, numerators: Sequence[float], denominators: Sequence[float],
                 level: float = LEVEL) -> tuple[float, float] | None:
        """Percentile interval of ``sum(numerators) / sum(denominators)`` over the resampled
        units; None when there are fewer than 2 units or a denominator sum is 0."""
        ratios = self._ratios(numerators, denominators)
        return None if ratios is None else percentile_interval(ratios, level)

    def difference_ci(self, numerators_a: Sequence[float], denominators_a: Sequence[float],
                      numerators_b: Sequence[float], denominators_b: Sequence[float],
                      level: float = LEVEL) -> tuple[float, float] | None:
        """Percentile interval of ratio a - ratio b, both taken on the same resamples (a paired
        comparison: two policies replayed on one trace's sequences); None as ``ratio_ci``.
        An interval that excludes 0 says which is higher at this level."""
        a = self._ratios(numerators_a, denominators_a)
        b = self._ratios(numerators_b, denominators_b)
        if a is None or b is None:
            return None
        return percentile_interval([x - y for x, y in zip(a, b)], level)

    def _ratios(self, numerators: Sequence[float], denominators: Sequence[float]
                ) -> list[float] | None:
        if self.units < 2:
            return None
        if len(numerators) != self.units or len(denominators) != self.units:
            raise ValueError(f"expected {self.units} values per unit")
        ratios = []
        for draw in self.draws:
            den = sum(map(denominators.__getitem__, draw))
            if not den:
                return None
            ratios.append(sum(map(numerators.__getitem__, draw)) / den)
        return ratios


def percentile_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles of ``values`` (nearest rank)."""
    ordered = sorted(values)
    n = len(ordered)
    low = ordered[max(0, math.ceil(n * (1 - level) / 2) - 1)]
    high = ordered[min(n - 1, math.ceil(n * (1 + level) / 2) - 1)]
    return low, high


def mean_ci(values: Sequence[float]) -> tuple[float, tuple[float, float] | None]:
    """Mean and 95% Student t interval; no interval for fewer than 2 values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)
