"""Statistics for the benchmark: means with t-distribution confidence intervals, and paired differences over seeds.

Seeds are the unit of replication: one value per seed. A difference between two learners is *paired* over the
seeds both ran (same seed = same data split, same source subset, same initialisation), which removes the
between-seed variance that both share. The interval is the two-sided Student-t interval of the mean
(``mean ± t_{1-α/2, n-1} · s / √n``); with fewer than two values there is no interval, and no claim.

Several comparisons at once (learners x settings) are corrected for multiple testing with Holm's step-down method
(:func:`holm`): the verdict of a comparison is *better* / *worse* only when its Holm-adjusted p-value of the paired
t-test is below 5% (with one comparison this is exactly "the 95% interval excludes 0").

Power (:func:`power`, :func:`min_detectable_difference`, :func:`seeds_needed`): the exact power of the two-sided
paired t-test from the noncentral t distribution — with ``n`` pairs whose differences have standard deviation
``sd``, a true mean difference ``delta`` gives ``T ~ t'(df = n - 1, ncp = delta · √n / sd)`` and
``power = P(T > t_{1-α/2}) + P(T < -t_{1-α/2})``. The minimum detectable difference (MDD) is the ``delta`` with 80%
power; it is larger than the normal approximation ``(z_{1-α/2} + z_{0.8}) · sd / √n``, much so for few seeds.
Both take the observed ``sd`` as if it were the true one: with few seeds that is itself uncertain, so
:func:`sd_interval` gives the sd's own confidence interval (from ``(n - 1) s^2 / sigma^2 ~ chi^2_{n-1}``) and
:func:`mdd_interval` the minimum detectable difference at its two ends.

Equivalence (:func:`tost`, :func:`equivalence_verdict`): "no significant difference" is not "as good as". Two
one-sided tests (Schuirmann 1987) at a stated margin ``m`` test ``H0: delta <= -m`` and ``H0: delta >= +m``; both
rejected at ``alpha`` (the ``1 - 2 alpha`` interval lies inside ``(-m, +m)``) means *equivalent within ±m*. The
verdict of a comparison is then one of four words: *better* / *worse* (the difference test, above), *equivalent*
(within ±m, the TOST), or *inconclusive* (neither: the data allow a difference as large as the margin).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

from scipy import stats as _scipy_stats
from scipy.optimize import brentq

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # two-sided significance level of the tests
POWER = 0.8  # the power at which the minimum detectable difference is quoted

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no significant difference (CI includes 0)"
NOT_AVAILABLE = "CI not available (fewer than 2 paired seeds)"
NOT_AFTER_HOLM = "no significant difference after Holm correction (raw 95% CI excludes 0)"
#: the two further words of the equivalence verdict (:func:`equivalence_verdict`); BETTER and WORSE are the others
EQUIVALENT = "equivalent"
INCONCLUSIVE = "inconclusive"


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

    @property
    def p_value(self) -> float | None:
        """Two-sided p-value of the paired t-test (mean difference = 0); None with fewer than 2 pairs."""
        return t_test_p(self.interval)


def paired_difference(candidate: Mapping, reference: Mapping, confidence: float = CONFIDENCE) -> PairedDifference:
    """Differences ``candidate[s] - reference[s]`` over the seeds ``s`` in both mappings, with their CI.

    Seeds present in only one mapping are left out (they have no partner); no common seed is an error.
    """
    seeds = tuple(sorted(set(candidate) & set(reference), key=lambda s: (str(type(s)), s)))
    if not seeds:
        raise ValueError("paired_difference: the two sets of runs share no seed")
    diffs = tuple(float(candidate[s]) - float(reference[s]) for s in seeds)
    return PairedDifference(mean_ci(diffs, confidence), seeds, diffs)


def verdict(diff: Interval, p_adjusted: float | None = None, alpha: float = ALPHA) -> str:
    """The words the report uses: a win or a loss only when the interval excludes zero — and, given a
    multiplicity-adjusted p-value (:func:`holm`), only when that is below ``alpha`` too."""
    if not diff.available:
        return NOT_AVAILABLE
    if diff.low > 0:
        raw = BETTER
    elif diff.high < 0:
        raw = WORSE
    else:
        return NO_DIFFERENCE
    if p_adjusted is not None and not p_adjusted < alpha:
        return NOT_AFTER_HOLM
    return raw


def t_test_p(diff: Interval) -> float | None:
    """Two-sided p-value of the one-sample t-test of ``diff`` (the mean of paired differences) against 0.

    ``t = mean / (sd / √n)``, ``p = 2 · P(T_{n-1} > |t|)``; it is below ``1 - confidence`` exactly when the
    interval excludes 0. Zero spread: p = 0 for a non-zero mean, 1 for a zero mean.
    """
    if not diff.available:
        return None
    if diff.sd == 0:
        return 0.0 if diff.mean != 0 else 1.0
    t = diff.mean / (diff.sd / math.sqrt(diff.n))
    return float(2 * _scipy_stats.t.sf(abs(t), df=diff.n - 1))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; ``None`` stays ``None`` and is not
    counted. With ``m`` p-values sorted ascending, ``p_adj(i) = max_{j <= i} min(1, (m - j + 1) · p_(j))``;
    rejecting where ``p_adj < α`` controls the family-wise error rate at ``α``."""
    idx = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    m = len(idx)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


# ------------------------------------------------------------------------------------------------------ power
def power(delta: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs of spread ``sd`` when the true
    mean difference is ``delta`` (noncentral t; see the module docstring)."""
    if n < 2:
        return 0.0
    if sd <= 0:
        return 1.0 if delta != 0 else alpha
    df = n - 1
    crit = float(_scipy_stats.t.ppf(1 - alpha / 2, df))
    ncp = abs(delta) * math.sqrt(n) / sd
    upper = float(_scipy_stats.nct.sf(crit, df, ncp))
    lower = float(_scipy_stats.nct.cdf(-crit, df, ncp))  # the wrong-sign rejection; tiny, NaN when underflowing
    return min(1.0, upper + (lower if math.isfinite(lower) else 0.0))


def min_detectable_difference(sd: float, n: int, target_power: float = POWER, alpha: float = ALPHA) -> float | None:
    """The smallest true mean difference the paired t-test detects with ``target_power`` (two-sided ``alpha``)
    with ``n`` pairs of spread ``sd``, in the units of ``sd``; None with fewer than 2 pairs."""
    if n < 2 or sd is None:
        return None
    if sd <= 0:
        return 0.0
    z = float(_scipy_stats.norm.ppf(1 - alpha / 2) + _scipy_stats.norm.ppf(target_power))
    hi = z * sd / math.sqrt(n)
    while power(hi, sd, n, alpha) < target_power:
        hi *= 2
    return float(brentq(lambda d: power(d, sd, n, alpha) - target_power, 0.0, hi, xtol=1e-12 * max(1.0, hi)))


def seeds_needed(delta: float, sd: float, target_power: float = POWER, alpha: float = ALPHA,
                 max_n: int = 1_000_000) -> int | None:
    """The fewest pairs (seeds) for which the paired t-test detects a true difference ``delta`` with
    ``target_power`` when the differences have spread ``sd``; None when ``delta`` is 0 or more than ``max_n``
    would be needed."""
    if sd is None or delta == 0:
        return None
    if sd <= 0:
        return 2
    if power(delta, sd, 2, alpha) >= target_power:
        return 2
    lo, hi = 2, 4
    while power(delta, sd, hi, alpha) < target_power:  # power grows with n: bracket, then bisect
        lo, hi = hi, hi * 2
        if hi > max_n:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if power(delta, sd, mid, alpha) >= target_power:
            hi = mid
        else:
            lo = mid
    return hi


def sd_interval(sd: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Two-sided confidence interval of the true standard deviation from a sample sd of ``n`` values (normal
    data: ``(n - 1) s^2 / sigma^2 ~ chi^2_{n-1}``); None with fewer than 2 values."""
    if n < 2 or sd is None:
        return None
    df = n - 1
    upper_q = float(_scipy_stats.chi2.ppf(0.5 + confidence / 2, df))
    lower_q = float(_scipy_stats.chi2.ppf(0.5 - confidence / 2, df))
    return sd * math.sqrt(df / upper_q), sd * math.sqrt(df / lower_q)


def mdd_interval(sd: float, n: int, confidence: float = CONFIDENCE, target_power: float = POWER,
                 alpha: float = ALPHA) -> tuple[float, float] | None:
    """The minimum detectable difference at both ends of :func:`sd_interval`: how uncertain the MDD quoted at
    the observed sd is (the MDD grows with the sd, so the ends map to the ends)."""
    ends = sd_interval(sd, n, confidence)
    if ends is None:
        return None
    return (min_detectable_difference(ends[0], n, target_power, alpha),
            min_detectable_difference(ends[1], n, target_power, alpha))


# ------------------------------------------------------------------------------------------------ equivalence
@dataclass(frozen=True)
class Equivalence:
    """Two one-sided t-tests of a mean paired difference against the margin ``±margin``."""

    margin: float
    p_lower: float  # H0: delta <= -margin
    p_upper: float  # H0: delta >= +margin

    @property
    def p_value(self) -> float:
        """The TOST p-value: equivalence is shown at level alpha when both one-sided tests reject."""
        return max(self.p_lower, self.p_upper)


def tost(diff: Interval, margin: float) -> Equivalence | None:
    """TOST of ``diff`` (the interval of a mean paired difference) at ``±margin``, in ``diff``'s units; None
    with fewer than 2 pairs. ``t_l = (mean + m) / se``, ``p_l = P(T_{n-1} > t_l)``; ``t_u = (mean - m) / se``,
    ``p_u = P(T_{n-1} < t_u)``. Zero spread: each p is 0 when the mean is strictly inside, else 1."""
    if margin <= 0:
        raise ValueError(f"tost: the equivalence margin must be positive, got {margin}")
    if not diff.available:
        return None
    if diff.sd == 0:
        return Equivalence(margin, 0.0 if diff.mean > -margin else 1.0, 0.0 if diff.mean < margin else 1.0)
    se = diff.sd / math.sqrt(diff.n)
    df = diff.n - 1
    return Equivalence(margin, float(_scipy_stats.t.sf((diff.mean + margin) / se, df)),
                       float(_scipy_stats.t.cdf((diff.mean - margin) / se, df)))


def equivalence_verdict(diff: Interval, margin: float, p_difference: float | None = None,
                        p_equivalence: float | None = None, alpha: float = ALPHA) -> str:
    """One of :data:`BETTER`, :data:`WORSE`, :data:`EQUIVALENT` (within ``±margin``) or :data:`INCONCLUSIVE`.

    *better* / *worse*: :func:`verdict` says so (interval excludes 0 and, given one, the multiplicity-adjusted
    p-value ``p_difference`` is below ``alpha``) — a shown difference wins even when it is smaller than the
    margin. Else *equivalent*: the TOST p-value (``p_equivalence`` when given, e.g. Holm-adjusted; else
    :func:`tost`'s own) is below ``alpha``. Else *inconclusive*; with fewer than 2 pairs always inconclusive."""
    if not diff.available:
        return INCONCLUSIVE
    difference = verdict(diff, p_difference, alpha)
    if difference in (BETTER, WORSE):
        return difference
    if p_equivalence is None:
        p_equivalence = tost(diff, margin).p_value
    return EQUIVALENT if p_equivalence < alpha else INCONCLUSIVE
