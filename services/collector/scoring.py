"""Score formulas (SPEC §7). Pure: functions of histograms ``{score: count}`` of the counted
answers (a score given, not a suspected bot). Skipped questions are not in the denominator.

NPS = %promoters (9–10) − %detractors (0–6), on −100…100. Each answer is +1, 0 or −1, so the
  per-answer variance is the trinomial ``p + d − (p − d)²``; the 95% interval is the Wald
  interval ``value ± z·100·√(var/n)`` clipped to −100…100.
CSAT = % of answers 4–5 (top-two box), with a Wilson score interval.
CES = mean of 1–7, with a Student t interval on n − 1 degrees of freedom, clipped to 1…7.

The change from the previous period carries a two-sided p-value:
- NPS: z-test of the difference with the two periods' trinomial variances (Wald);
- CSAT: two-proportion z-test with the pooled proportion (the null hypothesis: no change);
- CES: Welch's t-test, Welch–Satterthwaite degrees of freedom.

Edge cases (what a caller sees):
- n = 0: value, interval and p-value are None.
- Zero variance (every NPS answer a detractor, say, or every CES answer the same): the Wald and
  t intervals collapse to the value itself (``ci_low == ci_high == value``); such groups are
  small in practice, and ``n`` and ``low_n`` say how much the interval is worth. Wilson's
  interval (CSAT) never collapses.
- CES with n = 1: the value, no interval (a variance needs two answers); no p-value either.
- When both periods have zero variance but different values, the Wald and Welch standard errors
  are 0 and the test would claim certainty. Then the standard error is taken from both periods
  together, as the null hypothesis (no change) assumes — the same rule the CSAT test always
  uses — which keeps p finite and honest for tiny groups. Identical periods give p = 1.

The Student t distribution is computed exactly from the regularized incomplete beta function
(a continued fraction, pure Python): no SciPy at runtime.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from statistics import NormalDist
from typing import NamedTuple

NORMAL = NormalDist()
Z95 = NORMAL.inv_cdf(0.975)
SQRT2 = math.sqrt(2.0)
RANGES = {"nps": (-100.0, 100.0), "csat": (0.0, 100.0), "ces": (1.0, 7.0)}


class Score(NamedTuple):
    """A group's score, with what the comparison with another period needs (``variance``: the
    sample variance of CES answers), so that each histogram is scored once. (Named tuples:
    ``/v1/scores`` makes one or two per group, tens of thousands at a time.)"""

    metric: str
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None
    promoters: int = 0
    passives: int = 0
    detractors: int = 0
    top_box: int = 0
    variance: float = 0.0


class Change(NamedTuple):
    """The previous period's value, the change (current − previous, in the score's own unit:
    NPS points, CSAT percentage points, CES scale points) and its two-sided p-value."""

    previous: float | None
    change: float | None
    p_value: float | None


# --- The Student t distribution -------------------------------------------------------------


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if not (a > 0 and b > 0):
        raise ValueError("a and b must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| ≥ |t|) of Student's t with ``df`` (possibly fractional) degrees."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    tail = t_sf2(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def _t_pdf(t: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The quantile of Student's t: Newton's method on the exact CDF, kept inside a bisection
    bracket, from the normal quantile."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    t = min(max(NORMAL.inv_cdf(p), low), high)
    for _ in range(200):
        f = t_cdf(t, df) - p
        if f < 0:
            low = t
        else:
            high = t
        step = f / _t_pdf(t, df)
        nxt = t - step
        if not low < nxt < high:
            nxt = (low + high) / 2
        if abs(nxt - t) <= 1e-13 * max(1.0, abs(t)):
            return nxt
        t = nxt
    return t


def _normal_p(z: float) -> float:
    """Two-sided tail 2·Φ(−|z|) of the standard normal, as erfc(|z|/√2): the same value, exact
    out in the far tail too."""
    return math.erfc(abs(z) / SQRT2)


# --- Scores --------------------------------------------------------------------------------


def _counted(hist: Mapping[int, int]) -> int:
    return sum(hist.values())


def nps(hist: Mapping[int, int]) -> Score:
    n = promoters = detractors = 0
    for s, c in hist.items():
        n += c
        if s >= 9:
            promoters += c
        elif s <= 6:
            detractors += c
    passives = n - promoters - detractors
    if n == 0:
        return Score("nps", 0, None, None, None)
    p, d = promoters / n, detractors / n
    value = 100 * (p - d)
    half = 100 * Z95 * math.sqrt(_trinomial_var(p, d) / n)
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


def _trinomial_var(p: float, d: float) -> float:
    """Variance of one answer scored +1 (promoter), 0 (passive) or −1 (detractor)."""
    return max(0.0, p + d - (p - d) ** 2)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def csat(hist: Mapping[int, int]) -> Score:
    n = _counted(hist)
    top = sum(c for s, c in hist.items() if s >= 4)
    if n == 0:
        return Score("csat", 0, None, None, None)
    low, high = wilson(top, n)
    return Score("csat", n, 100 * top / n, 100 * low, 100 * high, top_box=top)


def _moments(hist: Mapping[int, int]) -> tuple[int, float, float]:
    """n, mean and the sample variance (n − 1 in the denominator; 0 when n < 2)."""
    n = _counted(hist)
    mean = sum(s * c for s, c in hist.items()) / n
    var = sum(c * (s - mean) ** 2 for s, c in hist.items()) / (n - 1) if n > 1 else 0.0
    return n, mean, var


def ces(hist: Mapping[int, int]) -> Score:
    n = _counted(hist)
    if n == 0:
        return Score("ces", 0, None, None, None)
    top = sum(c for s, c in hist.items() if s >= 5)
    _, mean, var = _moments(hist)
    if n == 1:
        return Score("ces", 1, mean, None, None, top_box=top)
    half = t_quantile(0.975, n - 1) * math.sqrt(var / n)
    return Score(
        "ces", n, mean, max(1.0, mean - half), min(7.0, mean + half), top_box=top, variance=var
    )


FORMULAS = {"nps": nps, "csat": csat, "ces": ces}


def score(metric: str, hist: Mapping[int, int]) -> Score:
    return FORMULAS[metric](hist)


# --- Change from the previous period -------------------------------------------------------


def _merged(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    out = dict(a)
    for s, c in b.items():
        out[s] = out.get(s, 0) + c
    return out


def _nps_p(a: Score, b: Score) -> float | None:
    """Two-sided p of the NPS difference: z = Δ / √(var₁/n₁ + var₂/n₂), trinomial variances."""
    if a.value is None or b.value is None:
        return None
    diff = (a.value - b.value) / 100
    var_a = _trinomial_var(a.promoters / a.n, a.detractors / a.n)
    var_b = _trinomial_var(b.promoters / b.n, b.detractors / b.n)
    se = math.sqrt(var_a / a.n + var_b / b.n)
    if se == 0.0:  # both periods all one kind: the null hypothesis' common variance
        n = a.n + b.n
        var = _trinomial_var((a.promoters + b.promoters) / n, (a.detractors + b.detractors) / n)
        se = math.sqrt(var * (1 / a.n + 1 / b.n))
    if se == 0.0:
        return 1.0
    return _normal_p(diff / se)


def _csat_p(a: Score, b: Score) -> float | None:
    """Two-sided p of the two-proportion z-test with the pooled proportion."""
    if a.n == 0 or b.n == 0:
        return None
    pooled = (a.top_box + b.top_box) / (a.n + b.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / a.n + 1 / b.n))
    if se == 0.0:  # everyone in both periods satisfied (or nobody): no change
        return 1.0
    return _normal_p((a.top_box / a.n - b.top_box / b.n) / se)


def _ces_p(
    a: Score, b: Score, current: Mapping[int, int], previous: Mapping[int, int]
) -> float | None:
    """Two-sided p of Welch's t-test (Welch–Satterthwaite degrees of freedom); None when
    either period has fewer than two answers."""
    if a.n < 2 or b.n < 2 or a.value is None or b.value is None:
        return None
    n1, m1, v1 = a.n, a.value, a.variance
    n2, m2, v2 = b.n, b.value, b.variance
    if m1 == m2:
        return 1.0
    q1, q2 = v1 / n1, v2 / n2
    if q1 + q2 == 0.0:  # no spread in either period: Student's test on both taken together
        _, _, v = _moments(_merged(current, previous))
        return t_sf2((m1 - m2) / math.sqrt(v * (1 / n1 + 1 / n2)), n1 + n2 - 2)
    df = (q1 + q2) ** 2 / (q1 * q1 / (n1 - 1) + q2 * q2 / (n2 - 1))
    return t_sf2((m1 - m2) / math.sqrt(q1 + q2), df)


def nps_p_value(current: Mapping[int, int], previous: Mapping[int, int]) -> float | None:
    return _nps_p(nps(current), nps(previous))


def csat_p_value(current: Mapping[int, int], previous: Mapping[int, int]) -> float | None:
    return _csat_p(csat(current), csat(previous))


def ces_p_value(current: Mapping[int, int], previous: Mapping[int, int]) -> float | None:
    return _ces_p(ces(current), ces(previous), current, previous)


def _p_value(
    metric: str, a: Score, b: Score, current: Mapping[int, int], previous: Mapping[int, int]
) -> float | None:
    if metric == "nps":
        return _nps_p(a, b)
    if metric == "csat":
        return _csat_p(a, b)
    return _ces_p(a, b, current, previous)


def compare(
    metric: str,
    now: Score,
    before: Score,
    current: Mapping[int, int],
    previous: Mapping[int, int],
) -> Change:
    """``change`` from the two periods' scores already computed (``now`` of ``current``,
    ``before`` of ``previous``): what ``/v1/scores`` uses, scoring each group once."""
    if before.value is None:
        return Change(None, None, None)
    if now.value is None:
        return Change(before.value, None, None)
    return Change(
        before.value, now.value - before.value, _p_value(metric, now, before, current, previous)
    )


def change(metric: str, current: Mapping[int, int], previous: Mapping[int, int]) -> Change:
    """The change from ``previous`` to ``current``; all None when the previous period has no
    counted answers, change without p when a test needs more answers (CES: two per period)."""
    return compare(metric, score(metric, current), score(metric, previous), current, previous)
