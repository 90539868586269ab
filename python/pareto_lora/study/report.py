"""A study's findings in words: the power line first, then failed and missing runs, the means (a
description, not a ranking), each rule against vanilla and against the reweighting curve, and last
how many intervals that was (so that an isolated good-side one is read as what chance gives).

The words are stats.word's: "better" / "worse" / "no detectable difference", from paired 95%
intervals only; the curve's places are "below" (better than loss reweighting) / "above" / "on"
/ "outside" (beyond the curve's range in every seed: no comparison).
"""

from __future__ import annotations

import statistics

from .stats import chance_line

__all__ = ["report_lines", "multiplicity"]

# A place is in the comparison's own plane; in the (text, image) plane, equal image is a horizontal distance.
_PLACE = {"text": {"below": "BELOW the curve (better than loss reweighting)",
                   "above": "ABOVE the curve (worse than loss reweighting)",
                   "on": "ON the curve (no detectable difference from loss reweighting)"},
          "image": {"below": "LEFT of the curve (better than loss reweighting)",
                    "above": "RIGHT of the curve (worse than loss reweighting)",
                    "on": "ON the curve (no detectable difference from loss reweighting)"}}


def _header(protocol, records, missing) -> str:
    ws = ", ".join(f"{w:g}" for w in protocol.weights)
    seeds = ", ".join(map(str, protocol.seeds))
    n_total = len(protocol.methods) * len(protocol.seeds)
    n_failed = sum(r.failure is not None for r in records)
    return (f"Study: {', '.join(protocol.rules)} against the reweighting curve L_text + w*L_image (w = {ws}; w=1 is "
            f"vanilla LoRA), paired by seed over {len(protocol.seeds)} seed{'s' * (len(protocol.seeds) > 1)} ({seeds}); "
            f"{len(records) - n_failed} of {n_total} runs finished, {n_failed} failed, {len(missing)} not run.")


def _means(protocol, done) -> list[str]:
    metrics = protocol.metrics
    arrow = {m: "" if protocol.lower_is_better_for(m) else " (higher better)" for m in metrics}
    width = max(12, *(len(m.name) for m in protocol.methods))
    head = f"  {'method':<{width}} {'n':>2}" + "".join(f" {m + arrow[m]:>{max(10, len(m + arrow[m]))}}" for m in metrics)
    rows = [head]
    for method in protocol.methods:
        runs = done.get(method.name, {})
        cells = "".join(f" {statistics.fmean(r[m] for r in runs.values()) if runs else float('nan'):>{max(10, len(m + arrow[m]))}.4g}"
                        for m in metrics)
        rows.append(f"  {method.name:<{width}} {len(runs):>2}" + cells)
    return ["Means over the finished seeds (a description, not a ranking: the words below come from paired intervals):",
            *rows]


def _vs_vanilla(protocol, rule: str, rows: dict) -> str:
    if not rows:
        return "  vs vanilla (w=1): no seed where both finished."
    parts = [f"{m} {rows[m]['interval'].format(4)} ({rows[m]['word']})" for m in protocol.metrics if m in rows]
    return f"  vs vanilla (w=1), {rule} minus vanilla: " + "; ".join(parts) + "."


def _vs_curve(c: dict | None, at: str, n_weights: int) -> str:
    other = "image" if at == "text" else "text"
    if n_weights < 2:
        return "  vs reweighting curve: none (it needs two or more weights)."
    if c is None:
        return f"  vs reweighting curve at equal {at}: no seed with the rule and two curve points finished."
    iv, n_out = c["interval"], sum(not v for v in c["inside"].values())
    if c["place"] == "outside":
        return (f"  vs reweighting curve at equal {at}: OUTSIDE the curve's {at} range in every seed, so no comparison "
                f"at equal {at} (more weights widen the curve's range).")
    extra = f"; extrapolated beyond the curve's {at} range in {n_out} of {iv.n} seeds" if n_out else ""
    return f"  vs reweighting curve at equal {at}: {other} {iv.format(4)} -> {_PLACE[at][c['place']]}{extra}."


def multiplicity(comparisons: dict) -> dict:
    """How many paired intervals the rules' comparisons hold, and how many of them land on the good side
    ("better" against vanilla, "below" / "left of" the curve): {"intervals", "good_side", "by_chance"}.
    ``by_chance``: how many good-side intervals 95 % intervals give with no effect anywhere (2.5 % each)."""
    n = good = 0
    for c in comparisons.values():
        for row in c["vs_vanilla"].values():
            if row["interval"].n > 1:
                n, good = n + 1, good + (row["word"] == "better")
        for key in ("curve_at_equal_text", "curve_at_equal_image"):
            d = c.get(key)
            if d is not None and d["place"] != "outside" and d["interval"].n > 1:
                n, good = n + 1, good + (d["place"] == "below")
    return {"intervals": n, "good_side": good, "by_chance": 0.025 * n}


def _multiplicity_line(m: dict) -> str | None:
    return chance_line(m["intervals"], m["good_side"], "a new Study with new seeds and its own log")


def report_lines(protocol, records, missing, done, power: dict, comparisons: dict) -> list[str]:
    lines = [power["line"], _header(protocol, records, missing)]  # the power line first: it says what the rest can mean
    if len(protocol.seeds) < 2:
        lines.append("One seed: there are no intervals, so every comparison below reads 'no detectable difference'.")
    failed = [r for r in records if r.failure is not None]
    if failed:
        lines.append("Failed runs (non-finite metrics; each is left out of the paired comparisons at its seed): "
                     + "; ".join(f"{r.method.name} seed {r.seed} ({r.failure})" for r in failed) + ".")
    if missing:
        lines.append("Not run yet (the study is incomplete; the comparisons use the finished pairs): "
                     + "; ".join(f"{m.name} seed {s}" for m, s in missing) + ".")
    lines += _means(protocol, done)
    for rule in protocol.rules:
        c = comparisons[rule]
        lines.append(f"{rule}:")
        lines.append(_vs_vanilla(protocol, rule, c["vs_vanilla"]))
        lines.append(_vs_curve(c["curve_at_equal_text"], "text", len(protocol.weights)))
        if len(protocol.weights) >= 2:
            lines.append(_vs_curve(c["curve_at_equal_image"], "image", len(protocol.weights)))
    line = _multiplicity_line(multiplicity(comparisons))
    return lines + ([line] if line else [])
