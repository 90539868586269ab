"""The study's statistics over its finished runs: each rule against vanilla, against the reweighting
curve, and the power check. Pure Python; every interval is a paired 95% t-interval over seeds
(stats.py) and every word comes from an interval, never from point estimates.

Pairing: a comparison at seed s uses only runs that finished at s (a failed or missing run drops
seed s from the comparisons that need it, and the report says so).
"""

from __future__ import annotations

from .frontier import distance_to_curve
from .protocol import Method, Protocol
from .stats import Interval, paired_interval, word

__all__ = ["finished", "vs_vanilla", "vs_curve", "power_weight", "power"]

VANILLA = Method(None, 1.0).name  # "w=1"


def _point(w: float) -> str:
    return Method(None, w).name


def finished(records) -> dict[str, dict[int, dict]]:
    """method name -> seed -> metrics, of the runs that finished (finite metrics)."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if r.failure is None:
            out.setdefault(r.method.name, {})[r.seed] = r.metrics
    return out


def _paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[Interval, list[int]] | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return paired_interval([a[s][metric] - b[s][metric] for s in seeds]), seeds


def vs_vanilla(protocol: Protocol, done: dict, name: str) -> dict[str, dict]:
    """metric -> {interval, word, seeds}: ``name``'s metric minus vanilla's (w = 1), paired by seed."""
    out = {}
    for m in protocol.metrics:
        got = _paired(done.get(name, {}), done.get(VANILLA, {}), m)
        if got:
            iv, seeds = got
            out[m] = {"interval": iv, "word": word(iv, protocol.lower_is_better_for(m)), "seeds": seeds}
    return out


def vs_curve(protocol: Protocol, done: dict, name: str, at: str = "text") -> dict | None:
    """The paired distance of rule ``name`` to the reweighting curve at equal ``at`` metric.

    Per seed: the curve is the piecewise-linear join of that seed's finished weight points in the
    (``at``, other) plane, sorted by ``at``; the distance is the rule's other metric minus the curve's
    at the rule's ``at`` value (negative: below the curve, a better trade-off than reweighting
    reaches). A rule beyond the curve's ``at`` range is extrapolated from the end segment and flagged.
    Returns None when no seed has both the rule and two curve points of distinct ``at`` values.
    """
    other = "image" if at == "text" else "text"
    rule = done.get(name, {})
    per_seed, inside = {}, {}
    for s in sorted(rule):
        pts = [(done[_point(w)][s][at], done[_point(w)][s][other]) for w in protocol.weights
               if s in done.get(_point(w), {})]
        if len({p[0] for p in pts}) >= 2:
            per_seed[s], inside[s] = distance_to_curve(pts, (rule[s][at], rule[s][other]))
    if not per_seed:
        return None
    iv = paired_interval(per_seed.values())
    # beyond the curve's range in every seed the distance is pure extrapolation: no verdict (as the demo)
    place = "outside" if not any(inside.values()) else {"better": "below", "worse": "above"}.get(word(iv), "on")
    return {"interval": iv, "place": place, "per_seed": per_seed, "inside": inside}


def power_weight(protocol: Protocol) -> float | None:
    """The weight the power check compares with w = 1: 2 if run, else the smallest weight above 1."""
    above = [w for w in protocol.weights if w > 1.0]
    return 2.0 if 2.0 in above else min(above, default=None)


def power(protocol: Protocol, done: dict) -> dict:
    """Can this study tell w = 2 (or the smallest weight > 1) from w = 1 on the image metric?

    {"weight", "interval", "detects", "line"}: the line opens the report, since a study that cannot
    see this difference says little with its "no detectable difference" verdicts. ``detects`` is
    None when the check could not run (no weight > 1, or no seed where both finished)."""
    w = power_weight(protocol)
    if w is None:
        return {"weight": None, "interval": None, "detects": None,
                "line": "Power: not checked; it needs a weight > 1 beside w=1 (e.g. weights=(1, 2, 4, 8))."}
    got = _paired(done.get(_point(w), {}), done.get(VANILLA, {}), "image")
    if got is None:
        return {"weight": w, "interval": None, "detects": None,
                "line": f"Power: not checked; no seed has both w={w:g} and w=1 finished."}
    iv, seeds = got
    detects = iv.excludes_zero()
    head = f"Power: w={w:g} minus w=1 (vanilla), paired image {iv.format()} over {iv.n} seed{'s' * (iv.n > 1)}: "
    if detects:
        tail = f"this study can tell w={w:g} from w=1 (the interval excludes 0)"
        if iv.mean > 0:
            tail += f"; note that w={w:g} made the image metric worse, not better"
        tail += "."
    else:
        tail = (f"this study cannot tell w={w:g} from w=1 apart (the interval "
                f"{'covers 0' if iv.n > 1 else 'needs two or more seeds'}), so its verdicts of "
                "'no detectable difference' say little: more seeds (or a setting where the loss weight moves the "
                "image metric more) are needed.")
    return {"weight": w, "interval": iv, "detects": detects, "line": head + tail}
