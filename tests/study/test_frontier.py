"""Distances to the reweighting frontier (piecewise-linear, extrapolation flagged)."""

import pytest

from pareto_lora.study.frontier import curve_at, distance_to_curve

CURVE = [(0.3, 1.0), (0.1, 2.0), (0.2, 1.5)]  # unsorted on purpose: (text excess, image excess)


def test_interpolates_between_points():
    assert curve_at(CURVE, 0.15) == (pytest.approx(1.75), True)
    assert curve_at(CURVE, 0.3) == (pytest.approx(1.0), True)


def test_extrapolates_and_flags_outside_the_range():
    y, inside = curve_at(CURVE, 0.4)
    assert y == pytest.approx(0.5) and not inside
    y, inside = curve_at(CURVE, 0.0)
    assert y == pytest.approx(2.5) and not inside


def test_distance_sign_means_below_or_above():
    assert distance_to_curve(CURVE, (0.2, 1.2))[0] == pytest.approx(-0.3)  # below = better
    assert distance_to_curve(CURVE, (0.2, 1.6))[0] == pytest.approx(0.1)


def test_equal_x_are_averaged_and_too_few_points_rejected():
    assert curve_at([(0.1, 1.0), (0.1, 3.0), (0.2, 0.0)], 0.1)[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="points"):
        curve_at([(0.1, 1.0), (0.1, 2.0)], 0.1)
