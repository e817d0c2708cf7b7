"""Score formulas against values computed by hand, from published tables, or by SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from services.collector import scoring


def test_nps_value_and_trinomial_interval() -> None:
    hist = {10: 30, 9: 20, 8: 20, 7: 10, 5: 15, 0: 5}  # 50 promoters, 30 passives, 20 detractors
    s = scoring.nps(hist)
    assert (s.n, s.promoters, s.passives, s.detractors) == (100, 50, 30, 20)
    assert s.value == pytest.approx(30.0)
    half = 1.959964 * 100 * math.sqrt((0.5 + 0.2 - 0.3**2) / 100)
    assert (s.ci_low, s.ci_high) == (
        pytest.approx(30 - half, abs=1e-4),
        pytest.approx(30 + half, abs=1e-4),
    )


def test_nps_all_detractors_and_empty() -> None:
    s = scoring.nps({3: 4, 6: 6})
    assert (s.value, s.detractors, s.ci_low, s.ci_high) == (-100.0, 10, -100.0, -100.0)
    empty = scoring.nps({})
    assert (empty.n, empty.value, empty.ci_low) == (0, None, None)


def test_csat_top_two_box_with_wilson_interval() -> None:
    s = scoring.csat({5: 5, 4: 3, 3: 1, 1: 1})
    assert (s.n, s.top_box, s.value) == (10, 8, 80.0)
    # Wilson 95% for 8/10: 0.4902 to 0.9433 (Newcombe 1998, table I method 3).
    assert s.ci_low == pytest.approx(49.02, abs=0.01)
    assert s.ci_high == pytest.approx(94.33, abs=0.01)


@pytest.mark.parametrize(
    ("df", "expected"),
    [
        (1, 12.706205),
        (2, 4.302653),
        (3, 3.182446),
        (5, 2.570582),
        (10, 2.228139),
        (30, 2.042272),
        (120, 1.979930),
    ],
)
def test_t_quantiles_match_the_tables(df: int, expected: float) -> None:
    assert scoring.t_quantile(0.975, df) == pytest.approx(expected, rel=2e-3)


def test_ces_mean_with_t_interval() -> None:
    s = scoring.ces({7: 2, 6: 3, 5: 3, 4: 1, 2: 1})  # n = 10
    values = [7] * 2 + [6] * 3 + [5] * 3 + [4, 2]
    mean = sum(values) / 10
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 9)
    half = 2.262157 * sd / math.sqrt(10)
    assert s.value == pytest.approx(mean)
    assert s.ci_low == pytest.approx(mean - half, rel=1e-3)
    assert s.ci_high == pytest.approx(mean + half, rel=1e-3)


# --- Against SciPy: the exact t distribution, the intervals and the p-values ------------------
# SciPy is a test-only dependency; the expected values below are computed by it (or by hand)
# from the expanded samples, independently of the histogram code under test.


def sample(hist: dict[int, int]) -> np.ndarray:
    return np.repeat(np.array(list(hist), dtype=float), list(hist.values()))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 30, 99, 120, 1000, 50_000, 1.3, 2.7, 17.42])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.975, 0.995, 0.025, 0.0005])
def test_t_quantile_equals_scipy(df: float, p: float) -> None:
    assert scoring.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 5, 9.5, 33.3, 400, 20_000])
@pytest.mark.parametrize("t", [0.0, 0.01, 0.5, 1.96, 2.5, -3.1, 8.0, 40.0])
def test_two_sided_t_tail_equals_scipy(df: float, t: float) -> None:
    expected = 2 * stats.t.sf(abs(t), df)
    assert scoring.t_sf2(t, df) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert scoring.t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(
    ("a", "b", "x"),
    [(0.5, 0.5, 0.3), (3, 7, 0.2), (7, 3, 0.9), (50, 0.5, 0.99), (0.5, 50, 0.01), (2.5, 0.5, 1e-6)],
)
def test_incomplete_beta_equals_scipy(a: float, b: float, x: float) -> None:
    assert scoring.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10)


NPS_HISTS = [
    {10: 30, 9: 20, 8: 20, 7: 10, 5: 15, 0: 5},
    {10: 1, 3: 1},
    {9: 3, 8: 2, 6: 4, 2: 1},
    {10: 400, 7: 250, 4: 350},
    {8: 5, 7: 5},  # all passives: NPS 0 with variance 0
    {0: 7},  # all detractors
]


@pytest.mark.parametrize("hist", NPS_HISTS)
def test_nps_interval_is_wald_with_the_trinomial_variance(hist: dict[int, int]) -> None:
    x = sample(hist)
    per_answer = np.where(x >= 9, 1.0, np.where(x <= 6, -1.0, 0.0))
    value = 100 * per_answer.mean()
    half = 100 * stats.norm.ppf(0.975) * per_answer.std(ddof=0) / math.sqrt(len(x))
    s = scoring.nps(hist)
    assert s.value == pytest.approx(value)
    assert s.ci_low == pytest.approx(max(-100, value - half), abs=1e-9)
    assert s.ci_high == pytest.approx(min(100, value + half), abs=1e-9)


CSAT_HISTS = [{5: 5, 4: 3, 3: 1, 1: 1}, {5: 1}, {1: 1}, {2: 40, 4: 9}, {5: 900, 3: 100}]


@pytest.mark.parametrize("hist", CSAT_HISTS)
def test_csat_interval_is_wilson(hist: dict[int, int]) -> None:
    n = sum(hist.values())
    k = sum(c for s, c in hist.items() if s >= 4)
    z = stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    s = scoring.csat(hist)
    assert (s.n, s.top_box, s.value) == (n, k, pytest.approx(100 * p))
    assert s.ci_low == pytest.approx(100 * max(0, centre - half), abs=1e-9)
    assert s.ci_high == pytest.approx(100 * min(1, centre + half), abs=1e-9)
    assert s.ci_low is not None and s.ci_high is not None and s.ci_low < s.ci_high


CES_HISTS = [
    {7: 2, 6: 3, 5: 3, 4: 1, 2: 1},
    {1: 1, 7: 1},
    {3: 2, 4: 1},
    {5: 120, 6: 80, 2: 15, 7: 40},
    {4: 3000, 5: 2999, 6: 1},
]


@pytest.mark.parametrize("hist", CES_HISTS)
def test_ces_interval_equals_scipy_t_interval(hist: dict[int, int]) -> None:
    x = sample(hist)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    s = scoring.ces(hist)
    assert s.value == pytest.approx(x.mean())
    assert s.ci_low == pytest.approx(max(1.0, low), rel=1e-9)
    assert s.ci_high == pytest.approx(min(7.0, high), rel=1e-9)
    assert s.top_box == int((x >= 5).sum())


PAIRS = [
    # (metric, current, previous)
    ("nps", {10: 60, 9: 10, 7: 20, 3: 10}, {10: 40, 8: 30, 2: 30}),
    ("nps", {10: 5, 0: 5}, {9: 1, 8: 1, 1: 3}),
    ("nps", {10: 1}, {10: 1, 0: 1}),
    ("nps", {9: 300, 7: 500, 5: 200}, {9: 290, 7: 505, 5: 205}),
    ("csat", {5: 40, 4: 30, 2: 30}, {5: 20, 4: 30, 1: 50}),
    ("csat", {5: 1}, {1: 1, 4: 1}),
    ("csat", {4: 700, 3: 300}, {4: 650, 3: 350}),
    ("ces", {7: 2, 6: 3, 5: 3, 4: 1, 2: 1}, {5: 4, 4: 4, 3: 2}),
    ("ces", {1: 1, 7: 1}, {4: 2, 5: 3}),
    ("ces", {6: 200, 5: 100, 2: 10}, {6: 150, 5: 150, 1: 30}),
]


def expected_p(metric: str, current: dict[int, int], previous: dict[int, int]) -> float:
    a, b = sample(current), sample(previous)
    if metric == "ces":
        result = stats.ttest_ind_from_stats(
            a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b), equal_var=False
        )
        return float(result.pvalue)
    if metric == "csat":
        table = [[(a >= 4).sum(), (a < 4).sum()], [(b >= 4).sum(), (b < 4).sum()]]
        return float(stats.chi2_contingency(table, correction=False).pvalue)  # = z-test²
    ya = np.where(a >= 9, 1.0, np.where(a <= 6, -1.0, 0.0))
    yb = np.where(b >= 9, 1.0, np.where(b <= 6, -1.0, 0.0))
    se = math.sqrt(ya.var() / len(ya) + yb.var() / len(yb))
    return float(2 * stats.norm.sf(abs(ya.mean() - yb.mean()) / se))


@pytest.mark.parametrize(("metric", "current", "previous"), PAIRS)
def test_change_and_p_value_equal_scipy(
    metric: str, current: dict[int, int], previous: dict[int, int]
) -> None:
    moved = scoring.change(metric, current, previous)
    now, before = scoring.score(metric, current), scoring.score(metric, previous)
    assert now.value is not None and before.value is not None
    assert moved.previous == pytest.approx(before.value)
    assert moved.change == pytest.approx(now.value - before.value)
    assert moved.p_value == pytest.approx(expected_p(metric, current, previous), rel=1e-8)


def test_welch_degrees_of_freedom_are_fractional() -> None:
    current, previous = {7: 2, 6: 3, 5: 3, 4: 1, 2: 1}, {5: 4, 4: 4, 3: 2}
    a, b = sample(current), sample(previous)
    qa, qb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (qa + qb) ** 2 / (qa**2 / (len(a) - 1) + qb**2 / (len(b) - 1))
    t = (a.mean() - b.mean()) / math.sqrt(qa + qb)
    assert df != round(df)
    assert scoring.ces_p_value(current, previous) == pytest.approx(
        2 * stats.t.sf(abs(t), df), rel=1e-10
    )


@pytest.mark.parametrize("metric", ["nps", "csat", "ces"])
def test_empty_groups(metric: str) -> None:
    hist = {"nps": {10: 3, 2: 1}, "csat": {5: 3, 2: 1}, "ces": {6: 3, 2: 1}}[metric]
    empty = scoring.score(metric, {})
    assert (empty.n, empty.value, empty.ci_low, empty.ci_high) == (0, None, None, None)
    assert scoring.change(metric, {}, {}) == scoring.Change(None, None, None)
    assert scoring.change(metric, hist, {}) == scoring.Change(None, None, None)
    gone = scoring.change(metric, {}, hist)
    assert gone.previous == scoring.score(metric, hist).value
    assert (gone.change, gone.p_value) == (None, None)


@pytest.mark.parametrize(
    ("metric", "hist"),
    [("nps", {9: 2, 4: 5, 8: 1}), ("csat", {5: 3, 2: 4}), ("ces", {6: 3, 2: 4, 4: 1})],
)
def test_identical_periods_change_nothing(metric: str, hist: dict[int, int]) -> None:
    assert scoring.change(metric, hist, dict(hist)) == scoring.Change(
        scoring.score(metric, hist).value, 0.0, 1.0
    )


def test_one_answer() -> None:
    nps = scoring.nps({10: 1})
    assert (nps.n, nps.value, nps.ci_low, nps.ci_high) == (1, 100.0, 100.0, 100.0)
    csat = scoring.csat({5: 1})
    assert csat.value == 100.0 and csat.ci_low == pytest.approx(100 * 0.2065, abs=0.01)
    ces = scoring.ces({6: 1})
    assert (ces.n, ces.value, ces.ci_low, ces.ci_high, ces.top_box) == (1, 6.0, None, None, 1)
    # CES needs two answers per period for a variance: the change comes without a p-value.
    assert scoring.change("ces", {6: 1}, {3: 4, 4: 1}).p_value is None
    assert scoring.change("ces", {6: 1}, {3: 4, 4: 1}).change == pytest.approx(6 - 3.2)


def test_zero_variance_groups() -> None:
    """All detractors: the Wald interval collapses to the value (documented in scoring.py).
    Two zero-variance periods with different values are tested with the variance of both
    periods together (what "no change" assumes), never with a standard error of 0."""
    down = scoring.nps({0: 20, 6: 30})
    assert (down.value, down.ci_low, down.ci_high) == (-100.0, -100.0, -100.0)
    # 50 detractors before, 50 promoters now: pooled p = d = 1/2, variance 1.
    p = scoring.nps_p_value({10: 50}, {0: 50})
    assert p == pytest.approx(2 * stats.norm.sf(2 / math.sqrt(1 * (1 / 50 + 1 / 50))))
    # One promoter against one detractor: pooled, z = 2/√2, nowhere near significant.
    assert scoring.nps_p_value({10: 1}, {0: 1}) == pytest.approx(
        2 * stats.norm.sf(math.sqrt(2)), rel=1e-12
    )
    # CSAT: the two-proportion test is pooled anyway.
    assert scoring.csat_p_value({5: 3}, {1: 3}) == pytest.approx(
        stats.chi2_contingency([[3, 0], [0, 3]], correction=False).pvalue
    )
    # CES all 7s against all 1s: Student's t on both periods taken together, df n1 + n2 − 2.
    both = sample({7: 3, 1: 4})
    t = 6 / math.sqrt(both.var(ddof=1) * (1 / 3 + 1 / 4))
    assert scoring.ces_p_value({7: 3}, {1: 4}) == pytest.approx(2 * stats.t.sf(t, 5), rel=1e-10)
    flat = scoring.ces({4: 5})
    assert (flat.ci_low, flat.ci_high) == (4.0, 4.0)
