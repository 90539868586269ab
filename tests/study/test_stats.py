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
