"""megatron.benchmark.stats against hand computations."""
import math

import pytest

from megatron.benchmark import stats


def test_mean_ci_n3_matches_hand_computation():
    # values 1, 2, 3: mean 2, sd 1, t_{0.975, 2} = 4.302652729911275, half = t / sqrt(3)
    iv = stats.mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert iv.mean == pytest.approx(2.0)
    assert iv.sd == pytest.approx(1.0)
    assert iv.low == pytest.approx(2.0 - half)
    assert iv.high == pytest.approx(2.0 + half)
    assert iv.half_width == pytest.approx(half)
    assert iv.n == 3


def test_mean_ci_n5_uses_t_not_normal():
    xs = [0.30, 0.32, 0.35, 0.31, 0.37]
    mean = sum(xs) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4}
    iv = stats.mean_ci(xs)
    assert (iv.low, iv.high) == pytest.approx((mean - half, mean + half))


def test_single_value_has_no_interval_and_no_claim():
    iv = stats.mean_ci([0.4])
    assert iv.mean == 0.4 and iv.low is None and iv.high is None and not iv.available
    assert stats.verdict(iv) == stats.NOT_AVAILABLE


def test_empty_and_nan_are_errors():
    with pytest.raises(ValueError):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="NaN"):
        stats.mean_ci([0.1, float("nan")])


def test_paired_difference_hand_values_and_unpaired_seeds_dropped():
    cand = {0: 0.50, 1: 0.60, 2: 0.55, 7: 0.99}  # seed 7 has no partner
    ref = {0: 0.40, 1: 0.45, 2: 0.50, 9: 0.0}
    d = stats.paired_difference(cand, ref)
    assert d.seeds == (0, 1, 2)
    assert d.differences == pytest.approx((0.10, 0.15, 0.05))
    # diffs 0.10, 0.15, 0.05: mean 0.10, sd 0.05
    half = 4.302652729911275 * 0.05 / math.sqrt(3)
    assert d.interval.mean == pytest.approx(0.10)
    assert (d.interval.low, d.interval.high) == pytest.approx((0.10 - half, 0.10 + half))
    assert d.interval.low < 0 < d.interval.high  # wide with 3 seeds: t makes the honest interval include 0
    assert d.verdict == stats.NO_DIFFERENCE


def test_pairing_removes_shared_seed_variance():
    # big between-seed spread, constant +0.02 advantage: unpaired CIs overlap, the paired one excludes 0
    ref = {0: 0.10, 1: 0.40, 2: 0.70}
    cand = {s: v + 0.02 + 0.001 * s for s, v in ref.items()}
    assert stats.paired_difference(cand, ref).verdict == stats.BETTER
    assert stats.paired_difference(ref, cand).verdict == stats.WORSE
    a, b = stats.mean_ci(cand.values()), stats.mean_ci(ref.values())
    assert a.low < b.high  # the unpaired intervals overlap


def test_no_common_seed_is_an_error():
    with pytest.raises(ValueError, match="no seed"):
        stats.paired_difference({0: 1.0}, {1: 1.0})


def test_verdict_words():
    assert stats.verdict(stats.Interval(1.0, 0.5, 1.5, 3, 0.1)) == "better"
    assert stats.verdict(stats.Interval(-1.0, -1.5, -0.5, 3, 0.1)) == "worse"
    assert stats.verdict(stats.Interval(0.2, -0.5, 0.9, 3, 0.1)) == "no significant difference (CI includes 0)"


def test_scaled_to_points():
    iv = stats.mean_ci([0.1, 0.2, 0.3]).scaled(100)
    assert iv.mean == pytest.approx(20.0) and iv.sd == pytest.approx(10.0)
