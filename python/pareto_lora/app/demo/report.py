"""Numbers out of the demo's runs: the per-method summary, the paired comparisons, the table, the JSON.

Everything is in *excess* loss (held-out loss minus the exact floor of floors.py, 0 = learned)
and image cell accuracy; raw losses are kept in the JSON. Comparisons are paired by seed (same
data and LoRA init) and carry 95% t-intervals (pareto_lora.study.stats).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

from ...training.diagnostics import case_fractions
from ...study.frontier import distance_to_curve
from .methods import frontier_weight
from ...study.stats import paired_interval, word

__all__ = ["summarize", "compare", "format_table", "results_document", "write_json", "BASELINE", "BRACKETS", "METRICS"]

BASELINE = "sum"
BRACKETS = ("text_only", "image_only")  # the controls: compared with each other, not with the curve
METRICS = ("text_excess", "image_excess", "cell_acc", "text", "image")


def _ratio_median(records: list[dict], upto: int) -> float:
    """Median over the first `upto` steps and over groups of ||g_text|| / ||g_image||."""
    vals = [g["ratio"] for r in records[:upto] for g in r["groups"].values()]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def summarize(runs) -> dict[str, dict]:
    """method -> per-seed final metrics, their means, curves, gradient ratios and case fractions."""
    by_rule: dict[str, list] = {}
    for run in runs:
        by_rule.setdefault(run.rule, []).append(run)
    out = {}
    for rule, rs in by_rule.items():
        rs = sorted(rs, key=lambda r: r.seed)
        fractions = case_fractions(rec for r in rs for rec in r.records)
        per_seed = {m: {r.seed: r.final[m] for r in rs} for m in METRICS}
        out[rule] = {
            "seeds": [r.seed for r in rs],
            "per_seed": per_seed,
            "mean": {m: statistics.fmean(v.values()) for m, v in per_seed.items()},
            "eval_steps": rs[0].eval_steps,
            "eval_text_excess_mean": [statistics.fmean(c) for c in zip(*(r.eval_text_excess for r in rs))],
            "eval_image_excess_mean": [statistics.fmean(c) for c in zip(*(r.eval_image_excess for r in rs))],
            "ratio_median_first10": statistics.fmean(_ratio_median(r.records, 10) for r in rs),
            "ratio_median_all": statistics.fmean(_ratio_median(r.records, len(r.records)) for r in rs),
            "case_fractions": fractions,
            "seconds": sum(r.seconds for r in rs),
        }
    return out


def _frontier_points(summary: dict, seed: int) -> list[tuple[float, float]]:
    pts = []
    for rule, s in summary.items():
        if frontier_weight(rule) is not None and seed in s["per_seed"]["text_excess"]:
            pts.append((s["per_seed"]["text_excess"][seed], s["per_seed"]["image_excess"][seed]))
    return pts


def compare(summary: dict) -> dict[str, dict]:
    """method -> paired comparisons: vs vanilla ('sum') per metric, and the distance to the
    reweighting curve at equal text excess (per seed, then a t-interval; below = better)."""
    out = {}
    weights = sorted(w for r in summary if (w := frontier_weight(r)) is not None)
    for rule, s in summary.items():
        row: dict = {}
        if BASELINE in summary and rule != BASELINE:
            base = summary[BASELINE]["per_seed"]
            seeds = [k for k in s["seeds"] if k in base["text_excess"]]
            for m in ("text_excess", "image_excess", "cell_acc"):
                if seeds:
                    iv = paired_interval([s["per_seed"][m][k] - base[m][k] for k in seeds])
                    row[f"vs_sum_{m}"] = {**dataclasses.asdict(iv), "word": word(iv, lower_is_better=m != "cell_acc")}
        if len(weights) >= 2 and frontier_weight(rule) is None and rule not in BRACKETS:
            dists, inside = [], []
            for k in s["seeds"]:
                pts = _frontier_points(summary, k)
                if len({p[0] for p in pts}) >= 2:
                    d, ok = distance_to_curve(pts, (s["per_seed"]["text_excess"][k], s["per_seed"]["image_excess"][k]))
                    dists.append(d)
                    inside.append(ok)
            if dists:
                iv = paired_interval(dists)
                # beyond the curve's text range in every seed the distance is pure extrapolation: no verdict
                place = "outside" if not any(inside) else {"better": "below", "worse": "above"}.get(word(iv), "on")
                row["frontier"] = {**dataclasses.asdict(iv), "place": place, "per_seed": dists,
                                   "inside_fraction": sum(inside) / len(inside)}
        out[rule] = row
    return out


def _iv(d: dict | None) -> str:
    if not d:
        return "-"
    if d["n"] < 2:
        return f"{d['mean']:+.3f} (n=1)"
    return f"{d['mean']:+.3f} [{d['low']:+.3f},{d['high']:+.3f}]"


def format_table(summary: dict, comparison: dict) -> str:
    """Final excess losses and cell accuracy per method (mean over seeds), the paired image-excess
    change vs vanilla and the distance to the reweighting curve, with 95% intervals."""
    head = (f"{'method':<16} {'text exc':>8} {'image exc':>9} {'cell acc':>8}  {'d image exc vs sum [95% CI]':<28} "
            f"{'vs reweighting curve [95% CI]':<34}")
    lines = [head, "-" * len(head)]
    for rule, s in summary.items():
        c = comparison.get(rule, {})
        fr = c.get("frontier")
        where = f"{_iv(fr)} {fr['place']}" if fr else ("(curve point)" if frontier_weight(rule) is not None
                                                       else "(bracket)" if rule in BRACKETS else "-")
        lines.append(f"{rule:<16} {s['mean']['text_excess']:>8.3f} {s['mean']['image_excess']:>9.3f} "
                     f"{s['mean']['cell_acc']:>8.1%}  {_iv(c.get('vs_sum_image_excess')):<28} {where:<34}")
    return "\n".join(lines)


def _finite(x):
    """JSON has no NaN/Infinity: non-finite floats become null (a zero-norm gradient's ratio)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def results_document(result: dict, summary: dict, comparison: dict, verdict_lines: list[str], environment: dict,
                     files: dict) -> dict:
    """Everything the demo measured, as one JSON-ready dict."""
    cfg = result["config"]
    return _finite({
        "config": dataclasses.asdict(cfg),
        "environment": environment,
        "task": {"vocab": dataclasses.asdict(result["vocab"]), "vocab_size": result["vocab"].size,
                 "sequence_length": result["seq_len"]},
        "floors": result["floors"],
        "base": result["base"],
        "timings": result["timings"],
        "summary": summary,
        "comparison": comparison,
        "verdict": verdict_lines,
        "files": files,
        "runs": [dataclasses.asdict(r) for r in result["runs"]],
    })


def write_json(doc: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, allow_nan=False)
