"""Score formulas against values computed by hand or from published tables."""

from __future__ import annotations

import math

import pytest

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
