"""Paired statistics for the verdicts (the demo, pareto_lora.study): mean paired difference, 95% t-interval.

The verdict words come only from the interval: "better" / "worse" when it excludes 0, otherwise
"no detectable difference" -- never from point estimates, which flip at noise level with a
handful of seeds. No scipy dependency: Student's t quantiles at 95 % are tabulated; other levels
(simultaneous intervals over several comparisons, Bonferroni) invert the exact t distribution
function for integer degrees of freedom (:func:`t_quantile`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

__all__ = ["Interval", "t_quantile_975", "t_quantile", "t_within", "paired_interval", "word", "chance_line"]

# t_{0.975, df} for df = 1..30 (standard tables); df > 30 uses the normal-limit expansion below.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student-t critical value with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion in 1/df: within 1e-3 of the exact value beyond df = 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer) degrees of freedom, exactly: the finite series
    of Abramowitz & Stegun 26.7.3 / 26.7.4 in theta = atan(t / sqrt(df))."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2))
        term, total = 1.0, 1.0
        for k in range(2, df, 2):
            term *= c2 * (k - 1) / k
            total += term
        return s * total
    total = theta  # 2/pi (theta + sin cos (1 + 2/3 c^2 + ... up to c^(df-3))); df = 1: 2 theta / pi
    if df > 1:
        term, series = 1.0, 1.0
        for k in range(3, df - 1, 2):
            term *= c2 * (k - 1) / k
            series += term
        total += s * math.cos(theta) * series
    return 2.0 / math.pi * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| < t) = `level` (two-sided) for `df` degrees of freedom, by bisection of
    :func:`t_within` to 1e-12: ``t_quantile(0.95, df)`` is :func:`t_quantile_975`'s value unrounded;
    ``t_quantile(1 - 0.05 / m, df)`` gives Bonferroni-simultaneous 95 % intervals over m comparisons."""
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"level: expected a float in (0, 1), got {level!r}")
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"df: expected an integer >= 1, got {df!r}")
    lo, hi = 0.0, 1.0
    while t_within(hi, df) < level:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_within(mid, df) < level else (lo, mid)
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float  # NaN when there is one value only (no spread estimate)
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (n=1, no interval)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_interval(diffs, level: float = 0.95) -> Interval:
    """Mean of the paired differences `diffs` and its t-interval at `level` (95 % by default)."""
    xs = [float(x) for x in diffs]
    if not xs or not all(math.isfinite(x) for x in xs):
        raise ValueError(f"diffs: expected one or more finite numbers, got {xs!r}")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(m, math.nan, math.nan, 1)
    q = t_quantile_975(len(xs) - 1) if level == 0.95 else t_quantile(level, len(xs) - 1)
    half = q * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(m, m - half, m + half, len(xs))


def word(interval: Interval, lower_is_better: bool = True) -> str:
    """'better', 'worse' or 'no detectable difference', from the interval alone."""
    if not interval.excludes_zero():
        return "no detectable difference"
    return "better" if (interval.high < 0) == lower_is_better else "worse"


def chance_line(intervals: int, good_side: int, confirm: str = "a new study with new seeds") -> str | None:
    """The closing line of a report that holds `intervals` paired 95 % intervals, `good_side` of them on
    the good side: with no effect anywhere, 2.5 % of them land there by chance, so an isolated one is
    a lead to confirm (with `confirm`), not a finding. None for fewer than two intervals."""
    if intervals < 2:
        return None
    return (f"Multiplicity: the comparisons above hold {intervals} paired 95% intervals, {good_side} of them on the "
            f"good side; with no effect anywhere about {0.025 * intervals:.1f} would land there by chance. An isolated "
            f"one is a lead, not a finding: confirm it on fresh seeds with that one comparison named in advance "
            f"({confirm}).")
