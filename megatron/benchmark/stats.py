"""Statistics for the benchmark: means with t-distribution confidence intervals, and paired differences over seeds.

Seeds are the unit of replication: one value per seed. A difference between two learners is *paired* over the
seeds both ran (same seed = same data split, same source subset, same initialisation), which removes the
between-seed variance that both share. The interval is the two-sided Student-t interval of the mean
(``mean ± t_{1-α/2, n-1} · s / √n``); with fewer than two values there is no interval, and no claim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

from scipy import stats as _scipy_stats

CONFIDENCE = 0.95

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no significant difference (CI includes 0)"
NOT_AVAILABLE = "CI not available (fewer than 2 paired seeds)"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided confidence interval; ``low``/``high`` are None when ``n < 2``."""

    mean: float
    low: float | None
    high: float | None
    n: int
    sd: float | None  # sample standard deviation (ddof=1)
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def available(self) -> bool:
        return self.low is not None

    def excludes_zero(self) -> bool:
        return self.available and (self.low > 0 or self.high < 0)

    def scaled(self, factor: float) -> "Interval":
        """The same interval in other units (e.g. fractions -> mAP points with ``factor=100``)."""
        s = lambda v: None if v is None else v * factor  # noqa: E731
        return Interval(self.mean * factor, s(self.low), s(self.high), self.n, s(self.sd), self.confidence)

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence interval of ``values`` (NaNs are an error: a missing metric is not a zero)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci: no values")
    if any(math.isnan(x) for x in xs):
        raise ValueError("mean_ci: NaN among the values; drop missing runs before summarising")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n, None, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    half = t * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, confidence)


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - reference`` paired over ``seeds``; ``interval`` is the CI of the mean difference."""

    interval: Interval
    seeds: tuple
    differences: tuple[float, ...]

    @property
    def verdict(self) -> str:
        return verdict(self.interval)


def paired_difference(candidate: Mapping, reference: Mapping, confidence: float = CONFIDENCE) -> PairedDifference:
    """Differences ``candidate[s] - reference[s]`` over the seeds ``s`` in both mappings, with their CI.

    Seeds present in only one mapping are left out (they have no partner); no common seed is an error.
    """
    seeds = tuple(sorted(set(candidate) & set(reference), key=lambda s: (str(type(s)), s)))
    if not seeds:
        raise ValueError("paired_difference: the two sets of runs share no seed")
    diffs = tuple(float(candidate[s]) - float(reference[s]) for s in seeds)
    return PairedDifference(mean_ci(diffs, confidence), seeds, diffs)


def verdict(diff: Interval) -> str:
    """The words the report uses: a win or a loss only when the interval excludes zero."""
    if not diff.available:
        return NOT_AVAILABLE
    if diff.low > 0:
        return BETTER
    if diff.high < 0:
        return WORSE
    return NO_DIFFERENCE
