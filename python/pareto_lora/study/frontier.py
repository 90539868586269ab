"""The reweighting frontier: where a rule lands against ``L_text + w*L_image`` at equal text metric.

For one seed, the fixed-weight runs (w = 1, 2, 3, ...) are points (text excess, image excess) (the
demo; :mod:`pareto_lora.study`: the user's text and image metrics, and also the swapped axes);
joined in order of text excess they form the curve a practitioner gets for free by tuning one
scalar. A rule's paired distance is its image excess minus the curve's image excess at the
rule's text excess (linear interpolation; beyond the curve's ends the end segment is extended
and the point is flagged, since that is extrapolation). Negative = below the curve = a better
trade-off than any reweighting reaches, positive = above = worse.
"""

from __future__ import annotations

__all__ = ["curve_at", "distance_to_curve"]


def curve_at(points, x: float) -> tuple[float, bool]:
    """(y of the piecewise-linear curve through `points` at `x`, whether `x` lies inside the range).

    `points`: (x, y) pairs, at least two with distinct x (sorted here; equal x are averaged).
    """
    merged: dict[float, list[float]] = {}
    for px, py in points:
        merged.setdefault(float(px), []).append(float(py))
    pts = sorted((px, sum(ys) / len(ys)) for px, ys in merged.items())
    if len(pts) < 2:
        raise ValueError(f"points: expected at least two distinct x values, got {list(points)!r}")
    inside = pts[0][0] <= x <= pts[-1][0]
    for i in range(1, len(pts)):
        if x <= pts[i][0] or i == len(pts) - 1:
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), inside
    raise AssertionError("unreachable")


def distance_to_curve(points, rule_point) -> tuple[float, bool]:
    """(rule's y minus the curve's y at the rule's x, inside-range flag)."""
    y, inside = curve_at(points, rule_point[0])
    return float(rule_point[1]) - y, inside
