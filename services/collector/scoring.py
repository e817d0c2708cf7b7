"""Score formulas (SPEC §7). Pure: functions of a histogram of answers.

NPS = %promoters (9–10) − %detractors (0–6), with a 95% interval from the trinomial variance.
CSAT = % of answers 4–5 (top-two box), with a Wilson score interval.
CES = mean of 1–7, with a Student t interval.
Skipped questions (no score) are not in the denominator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)


@dataclass(frozen=True)
class Score:
    metric: str
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None
    promoters: int = 0
    passives: int = 0
    detractors: int = 0
    top_box: int = 0


def t_quantile(p: float, df: int) -> float:
    """Student t quantile: exact for 1 and 2 degrees of freedom, Cornish–Fisher beyond."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    v = float(df)
    return (
        z
        + (z**3 + z) / (4 * v)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4)
    )


def nps(hist: Mapping[int, int]) -> Score:
    n = sum(hist.values())
    promoters = sum(c for s, c in hist.items() if s >= 9)
    detractors = sum(c for s, c in hist.items() if s <= 6)
    passives = n - promoters - detractors
    if n == 0:
        return Score("nps", 0, None, None, None)
    p, d = promoters / n, detractors / n
    value = 100 * (p - d)
    se = math.sqrt(max(0.0, p + d - (p - d) ** 2) / n)
    half = 100 * Z95 * se
    return Score(
        "nps",
        n,
        value,
        max(-100.0, value - half),
        min(100.0, value + half),
        promoters=promoters,
        passives=passives,
        detractors=detractors,
    )


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def csat(hist: Mapping[int, int]) -> Score:
    n = sum(hist.values())
    top = sum(c for s, c in hist.items() if s >= 4)
    if n == 0:
        return Score("csat", 0, None, None, None)
    low, high = wilson(top, n)
    return Score("csat", n, 100 * top / n, 100 * low, 100 * high, top_box=top)


def ces(hist: Mapping[int, int]) -> Score:
    n = sum(hist.values())
    if n == 0:
        return Score("ces", 0, None, None, None)
    mean = sum(s * c for s, c in hist.items()) / n
    if n == 1:
        return Score("ces", 1, mean, None, None, top_box=sum(c for s, c in hist.items() if s >= 5))
    var = sum(c * (s - mean) ** 2 for s, c in hist.items()) / (n - 1)
    half = t_quantile(0.975, n - 1) * math.sqrt(var / n)
    return Score(
        "ces",
        n,
        mean,
        max(1.0, mean - half),
        min(7.0, mean + half),
        top_box=sum(c for s, c in hist.items() if s >= 5),
    )


FORMULAS = {"nps": nps, "csat": csat, "ces": ces}


def score(metric: str, hist: Mapping[int, int]) -> Score:
    return FORMULAS[metric](hist)
