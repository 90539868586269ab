"""The paired statistics (the demo and pareto_lora.study): t quantiles, intervals and the verdict words."""

import math

import pytest

from pareto_lora.study import stats


def test_t_quantiles_match_tables_and_approach_the_normal():
    assert stats.t_quantile_975(4) == pytest.approx(2.776)
    assert stats.t_quantile_975(40) == pytest.approx(2.021, abs=2e-3)
    assert stats.t_quantile_975(120) == pytest.approx(1.980, abs=2e-3)
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile_975(0)


def test_interval_by_hand():
    iv = stats.paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((3.0, 3.0 - half, 3.0 + half, 5))
    assert stats.word(iv) == "worse" and stats.word(iv, lower_is_better=False) == "better"


def test_words_come_from_the_interval_not_the_mean():
    assert stats.word(stats.paired_interval([-0.1, -0.2, -0.15])) == "better"
    noisy = stats.paired_interval([-0.5, 0.3, -0.4])  # mean < 0 but the interval straddles 0
    assert noisy.mean < 0 and stats.word(noisy) == "no detectable difference"
    one = stats.paired_interval([-1.0])
    assert math.isnan(one.low) and stats.word(one) == "no detectable difference" and "n=1" in one.format()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="diffs"):
        stats.paired_interval([])
    with pytest.raises(ValueError, match="diffs"):
        stats.paired_interval([1.0, math.nan])


def test_t_quantile_at_any_level_agrees_with_the_table_and_known_values():
    for df in range(1, 31):  # the tabulated 95 % values are rounded to 3 decimals
        assert stats.t_quantile(0.95, df) == pytest.approx(stats.t_quantile_975(df), abs=6e-4)
    assert stats.t_quantile(0.99, 5) == pytest.approx(4.032, abs=1e-3)  # standard tables
    assert stats.t_quantile(0.90, 1) == pytest.approx(6.314, abs=1e-3)
    assert stats.t_quantile(0.5, 1) == pytest.approx(1.0, abs=1e-9)  # Cauchy: P(|T| < 1) = 1/2
    # P(|T| < t) from its series against a direct numerical integral of the density
    df, t = 7, 1.7
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    n = 20_000
    xs = [t * i / n for i in range(n + 1)]
    f = [c * (1 + x * x / df) ** (-(df + 1) / 2) for x in xs]
    simpson = t / n / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    assert stats.t_within(t, df) == pytest.approx(2 * simpson, abs=1e-10)


def test_a_wider_level_widens_the_interval_around_the_same_mean():
    xs = [0.3, 0.1, 0.5, 0.2, 0.4]
    iv95, iv99 = stats.paired_interval(xs), stats.paired_interval(xs, level=0.99)
    assert iv99.mean == iv95.mean and iv99.low < iv95.low and iv99.high > iv95.high
    assert stats.word(iv95) == "worse" and stats.word(iv99) == "no detectable difference"


@pytest.mark.parametrize("level", [0.0, 1.0, 95, "0.95", True, math.nan])
def test_t_quantile_refuses_a_level_outside_zero_one(level):
    with pytest.raises(ValueError, match="level"):
        stats.t_quantile(level, 4)
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0.9, 0)


def test_chance_line_counts_what_no_effect_would_give():
    assert stats.chance_line(1, 1) is None and stats.chance_line(0, 0) is None
    line = stats.chance_line(40, 3, "a new run")
    assert line.startswith("Multiplicity: the comparisons above hold 40 paired 95% intervals, 3 of them on the good side")
    assert "about 1.0 would land there by chance" in line and line.endswith("(a new run).")
