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


# --- multiple comparisons -------------------------------------------------------------------------------
def test_holm_adjusted_p_values_by_hand():
    # m = 4 (None is not a test): sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04,
    # made monotone: 0.02, 0.03, 0.06, 0.06
    adj = stats.holm([0.01, 0.04, 0.03, None, 0.005])
    assert adj[3] is None
    assert adj[:3] + adj[4:] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.02]) == pytest.approx([0.02])  # one test: unchanged
    assert stats.holm([]) == []


def test_paired_t_p_value_matches_scipy_and_the_interval():
    from scipy import stats as sp

    diffs = [0.10, 0.15, 0.05, 0.12]
    iv = stats.mean_ci(diffs)
    assert stats.t_test_p(iv) == pytest.approx(sp.ttest_1samp(diffs, 0.0).pvalue)
    # p < 5% exactly when the 95% interval excludes 0
    for xs in ([0.1, 0.15, 0.05], [0.1, 0.15, 0.05, 0.12], [0.02, -0.01, 0.03], [-0.2, -0.1, -0.15]):
        iv = stats.mean_ci(xs)
        assert (stats.t_test_p(iv) < 0.05) == iv.excludes_zero()
    assert stats.t_test_p(stats.mean_ci([0.3])) is None
    assert stats.t_test_p(stats.Interval(0.05, 0.05, 0.05, 3, 0.0)) == 0.0  # no spread, non-zero mean
    assert stats.t_test_p(stats.Interval(0.0, 0.0, 0.0, 3, 0.0)) == 1.0
    assert stats.paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 1.5}).p_value == pytest.approx(
        sp.ttest_rel([2.0, 3.0], [1.0, 1.5]).pvalue)


def test_verdict_after_holm():
    raw_better = stats.Interval(1.0, 0.2, 1.8, 5, 0.6)
    assert stats.verdict(raw_better, p_adjusted=0.01) == stats.BETTER
    assert stats.verdict(raw_better, p_adjusted=0.08) == stats.NOT_AFTER_HOLM
    assert stats.verdict(stats.Interval(-1.0, -1.8, -0.2, 5, 0.6), p_adjusted=0.2) == stats.NOT_AFTER_HOLM
    assert stats.verdict(stats.Interval(0.1, -0.5, 0.7, 5, 0.6), p_adjusted=0.9) == stats.NO_DIFFERENCE


# --- power ----------------------------------------------------------------------------------------------
def test_power_matches_textbook_values():
    # the paired t-test at two-sided 5% (Cohen 1988; G*Power): effect d = delta / sd = 1 with 10 pairs has power
    # 0.803, d = 0.5 needs 34 pairs for 80% (33 give less), d = 1 needs 10
    assert stats.power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=5e-4)
    assert stats.power(0.5, 1.0, 34) == pytest.approx(0.8078, abs=5e-4)
    assert stats.power(0.5, 1.0, 33) < 0.8
    assert stats.seeds_needed(0.5, 1.0) == 34
    assert stats.seeds_needed(1.0, 1.0) == 10
    assert stats.seeds_needed(5.0, 10.0) == 34  # only the ratio matters
    assert stats.seeds_needed(-5.0, 10.0) == 34  # two-sided
    # the power of a zero difference is the false-positive rate
    assert stats.power(0.0, 1.0, 8) == pytest.approx(0.05)


def test_power_by_hand_from_the_noncentral_t():
    # n = 5 pairs, sd = 2, delta = 3: df = 4, ncp = 3 sqrt(5) / 2, critical t = t_{0.975, 4} = 2.7764451051977987
    from scipy import stats as sp

    ncp = 3 * math.sqrt(5) / 2
    crit = 2.7764451051977987
    expected = sp.nct.sf(crit, 4, ncp) + sp.nct.cdf(-crit, 4, ncp)
    assert stats.power(3.0, 2.0, 5) == pytest.approx(expected, rel=1e-12)
    assert 0.70 < expected < 0.72  # a 1.5-sd effect with 5 seeds: missed more than 1 time in 4


def test_minimum_detectable_difference():
    # 80% power at the MDD, in the units of sd; t-based, so above the normal approximation (z_.975 + z_.8) sd/sqrt(n)
    z = 1.959963984540054 + 0.8416212335729143
    for n in (2, 3, 5, 10, 30):
        mdd = stats.min_detectable_difference(1.0, n)
        assert stats.power(mdd, 1.0, n) == pytest.approx(0.8, abs=1e-9)
        assert mdd > z / math.sqrt(n)
    assert stats.min_detectable_difference(1.0, 10) == pytest.approx(0.9960, abs=5e-4)  # d = 1 at n = 10: 0.803
    assert stats.min_detectable_difference(1.0, 5) == pytest.approx(1.682, abs=1e-3)
    assert stats.min_detectable_difference(1.0, 2) == pytest.approx(11.55, abs=1e-2)  # two seeds: hopeless
    assert stats.min_detectable_difference(1.0, 400) == pytest.approx(z / 20, rel=0.01)  # large n: the normal one
    assert stats.min_detectable_difference(10.0, 5) == pytest.approx(10 * stats.min_detectable_difference(1.0, 5))
    assert stats.min_detectable_difference(1.0, 1) is None
    assert stats.min_detectable_difference(0.0, 5) == 0.0


def test_seeds_needed_is_the_first_n_with_enough_power():
    for delta, sd in ((5.0, 3.0), (5.0, 12.0), (2.0, 7.5)):
        n = stats.seeds_needed(delta, sd)
        assert stats.power(delta, sd, n) >= 0.8 > stats.power(delta, sd, n - 1)
    assert stats.seeds_needed(5.0, 0.0) == 2
    assert stats.seeds_needed(0.0, 3.0) is None
    assert stats.seeds_needed(0.001, 100.0, max_n=1000) is None


# --- equivalence (TOST) and the uncertainty of the MDD (issue 25) ---------------------------------------------
def test_tost_p_values_match_a_hand_computation():
    from scipy.stats import t

    # differences with mean 1, sd 2, n 5; margin 5: t_l = (1 + 5) / (2 / √5), t_u = (1 − 5) / (2 / √5)
    iv = stats.Interval(1.0, 0.0, 2.0, 5, 2.0)  # any bounds: the TOST reads mean, sd and n
    se = 2.0 / math.sqrt(5)
    eq = stats.tost(iv, 5.0)
    assert eq.p_lower == pytest.approx(t.sf(6.0 / se, 4))
    assert eq.p_upper == pytest.approx(t.cdf(-4.0 / se, 4))
    assert eq.p_value == pytest.approx(max(eq.p_lower, eq.p_upper))
    # equivalently: the 90% interval lies inside ±5 exactly when p < 0.05
    half90 = t.ppf(0.95, 4) * se
    assert (eq.p_value < 0.05) == (1.0 - half90 > -5.0 and 1.0 + half90 < 5.0)


def test_each_of_the_four_verdicts_from_its_interval():
    def diff(values):
        return stats.mean_ci(values)

    assert stats.equivalence_verdict(diff([4.0, 5.0, 6.0, 5.5, 4.5]), 2.0) == stats.BETTER
    assert stats.equivalence_verdict(diff([-4.0, -5.0, -6.0, -5.5, -4.5]), 2.0) == stats.WORSE
    assert stats.equivalence_verdict(diff([0.2, -0.1, 0.0, 0.1, -0.2]), 2.0) == stats.EQUIVALENT
    assert stats.equivalence_verdict(diff([3.0, -4.0, 2.0, -1.0, 0.5]), 2.0) == stats.INCONCLUSIVE
    assert stats.equivalence_verdict(stats.mean_ci([0.0]), 2.0) == stats.INCONCLUSIVE  # one pair: no claim


def test_a_small_shown_difference_is_better_and_holm_can_undo_either_claim():
    tight_small = stats.mean_ci([0.5, 0.6, 0.55, 0.52, 0.58])  # +0.55, excludes 0, inside a margin of 2
    assert stats.equivalence_verdict(tight_small, 2.0) == stats.BETTER
    # after Holm the difference is not significant and the equivalence survives
    assert stats.equivalence_verdict(tight_small, 2.0, p_difference=0.2, p_equivalence=0.001) == stats.EQUIVALENT
    # ... or neither survives
    assert stats.equivalence_verdict(tight_small, 2.0, p_difference=0.2, p_equivalence=0.2) == stats.INCONCLUSIVE


def test_tost_with_zero_spread_and_a_bad_margin():
    assert stats.tost(stats.Interval(1.0, 1.0, 1.0, 3, 0.0), 2.0).p_value == 0.0
    assert stats.tost(stats.Interval(3.0, 3.0, 3.0, 3, 0.0), 2.0).p_value == 1.0
    assert stats.tost(stats.mean_ci([1.0]), 2.0) is None
    with pytest.raises(ValueError, match="positive"):
        stats.tost(stats.mean_ci([1.0, 2.0]), 0.0)


def test_sd_interval_and_mdd_interval_match_the_chi_square_by_hand():
    from scipy.stats import chi2

    sd, n = 3.9, 5  # the main comparison of experiment 4
    low, high = stats.sd_interval(sd, n)
    assert low == pytest.approx(sd * math.sqrt(4 / chi2.ppf(0.975, 4)))
    assert high == pytest.approx(sd * math.sqrt(4 / chi2.ppf(0.025, 4)))
    mdd_low, mdd_high = stats.mdd_interval(sd, n)
    assert mdd_low == pytest.approx(stats.min_detectable_difference(low, n))
    assert mdd_high == pytest.approx(stats.min_detectable_difference(high, n))
    # the reading: the MDD of about 6.5 points is anywhere from about 4 to about 19
    assert 6.0 < stats.min_detectable_difference(sd, n) < 7.0
    assert 3.5 < mdd_low < 4.5 and 17.0 < mdd_high < 20.0
    assert stats.sd_interval(sd, 1) is None and stats.mdd_interval(sd, 1) is None
