"""Numbers out of the digits world's runs: summary, paired comparisons, the table and the verdict.

No exact floors exist for real digits, so metrics are raw held-out losses and accuracies. Every
comparison is paired by seed with a 95% t-interval (pareto_lora.study.stats) and the verdict words come from the
interval only. Three distances to the reweighting curve (pareto_lora.study.frontier, per seed, then an interval):

* ``image_at_text``: image loss minus the curve's at the method's text loss (< 0 = below = better);
* ``gen_at_text``: generation accuracy (temperature-sampled) minus the curve's at equal text loss
  (> 0 = better);
* ``text_at_gen``: text loss minus the curve's at the method's generation accuracy (< 0 = better):
  the distance at equal generation accuracy (the curve's points are ordered by generation
  accuracy, which along w need not be monotone: the interpolation joins them in that order).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from ....training.diagnostics import case_fractions
from ....study.frontier import distance_to_curve
from ..methods import frontier_weight
from ..report import BASELINE, BRACKETS
from ....study.stats import chance_line, paired_interval, word

__all__ = ["METRICS", "HIGHER_IS_BETTER", "DISTANCES", "summarize", "compare", "format_table", "verdict",
           "ratio_values", "BASELINE", "BRACKETS"]

METRICS = ("text", "image", "und_acc", "gen_acc_greedy", "gen_acc_sampled")
HIGHER_IS_BETTER = {"und_acc", "gen_acc_greedy", "gen_acc_sampled"}
#: name -> (x metric, y metric): the distance is y minus the curve's y at the method's x
DISTANCES = {"image_at_text": ("text", "image"), "gen_at_text": ("text", "gen_acc_sampled"),
             "text_at_gen": ("gen_acc_sampled", "text")}


def ratio_values(records: list[dict], level: str = "layers") -> list[float]:
    """Every finite, non-zero ||g_text|| / ||g_image|| of `records`, per layer (or group) and step."""
    return [g["ratio"] for r in records for g in r[level].values()
            if g.get("ratio") is not None and math.isfinite(g["ratio"]) and g["ratio"] > 0]


def summarize(runs) -> dict[str, dict]:
    """method -> per-seed final metrics, their means, case fractions and the median gradient ratio."""
    by_rule: dict[str, list] = {}
    for run in runs:
        by_rule.setdefault(run.rule, []).append(run)
    out = {}
    for rule, rs in by_rule.items():
        rs = sorted(rs, key=lambda r: r.seed)
        ratios = [v for r in rs for v in ratio_values(r.records)]
        out[rule] = {
            "seeds": [r.seed for r in rs],
            "per_seed": {m: {r.seed: r.final[m] for r in rs} for m in METRICS},
            "mean": {m: statistics.fmean(r.final[m] for r in rs) for m in METRICS},
            "case_fractions": case_fractions(rec for r in rs for rec in r.records),
            "ratio_median": statistics.median(ratios) if ratios else math.nan,
            "diverged": [r.seed for r in rs if r.diverged],
            "seconds": sum(r.seconds for r in rs),
        }
    return out


def _iv_dict(values, higher_is_better: bool, level: float = 0.95) -> dict:
    iv = paired_interval(values, level)
    return {**dataclasses.asdict(iv), "word": word(iv, lower_is_better=not higher_is_better)}


def compare(summary: dict) -> dict[str, dict]:
    """method -> {vs_sum_<metric>: interval, <distance>: interval + place} (module docstring)."""
    out = {}
    curve = [r for r in summary if frontier_weight(r) is not None]
    for rule, s in summary.items():
        row: dict = {}
        if BASELINE in summary and rule != BASELINE:
            base = summary[BASELINE]["per_seed"]
            seeds = [k for k in s["seeds"] if k in base["text"]]
            for m in METRICS:
                if seeds:
                    row[f"vs_sum_{m}"] = _iv_dict([s["per_seed"][m][k] - base[m][k] for k in seeds], m in HIGHER_IS_BETTER)
        if len(curve) >= 2 and rule not in curve and rule not in BRACKETS:
            for name, (xm, ym) in DISTANCES.items():
                dists, inside = [], []
                for k in s["seeds"]:
                    pts = [(summary[c]["per_seed"][xm][k], summary[c]["per_seed"][ym][k]) for c in curve
                           if k in summary[c]["per_seed"][xm]]
                    if len({p[0] for p in pts}) >= 2:
                        d, ok = distance_to_curve(pts, (s["per_seed"][xm][k], s["per_seed"][ym][k]))
                        dists.append(d)
                        inside.append(ok)
                if dists and all(math.isfinite(d) for d in dists):
                    iv = _iv_dict(dists, ym in HIGHER_IS_BETTER)
                    place = "outside" if not any(inside) else {"better": "better", "worse": "worse"}.get(iv["word"], "on")
                    row[name] = {**iv, "place": place, "per_seed": dists, "inside_fraction": sum(inside) / len(inside)}
        out[rule] = row
    return out


def _iv(d: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not d:
        return "-"
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.{digits}f}")
    return f"{f(d['mean'])} (n=1)" if d["n"] < 2 else f"{f(d['mean'])} [{f(d['low'])},{f(d['high'])}]"


def format_table(summary: dict, comparison: dict) -> str:
    """Means over seeds and the paired intervals vs vanilla and vs the curve (accuracies in points)."""
    head = (f"{'method':<16} {'text':>6} {'image':>6} {'und%':>5} {'gen%g':>5} {'gen%s':>5}  {'d image vs sum':<24} "
            f"{'d gen%s vs sum':<20} {'image @ equal text':<24} {'text @ equal gen%s':<24}")
    lines = [head, "-" * len(head)]
    for rule, s in summary.items():
        c, m = comparison.get(rule, {}), s["mean"]
        tag = "(curve)" if frontier_weight(rule) is not None else "(bracket)" if rule in BRACKETS else ""
        at_text = f"{_iv(c.get('image_at_text'))} {c['image_at_text']['place']}" if "image_at_text" in c else tag or "-"
        at_gen = f"{_iv(c.get('text_at_gen'))} {c['text_at_gen']['place']}" if "text_at_gen" in c else tag or "-"
        lines.append(f"{rule:<16} {m['text']:>6.3f} {m['image']:>6.3f} {100 * m['und_acc']:>5.1f} {100 * m['gen_acc_greedy']:>5.1f} "
                     f"{100 * m['gen_acc_sampled']:>5.1f}  {_iv(c.get('vs_sum_image')):<24} "
                     f"{_iv(c.get('vs_sum_gen_acc_sampled'), pct=True):<20} {at_text:<24} {at_gen:<24}")
    return "\n".join(lines)


def verdict(summary: dict, comparison: dict, base_info: dict) -> list[str]:
    """Findings in words from the intervals (nothing fixed in advance)."""
    clf, ft = base_info["classifier"], base_info["finetune_world_test"]
    lines = [f"No exact floors exist for real digits: losses are raw nats/token; the brackets and the long "
             f"image-only run are the references. Classifier (trained on the real training digits): "
             f"{clf['real_test_acc']:.1%} on real held-out digits, {clf['vq_test_acc']:.1%} on their VQ reconstructions.",
             f"Base before LoRA on the fine-tuning world: text {ft['text']:.3f}, image {ft['image']:.3f}, understanding "
             f"{ft['und_acc']:.1%}, generation {ft['gen_acc_greedy']:.1%} greedy / {ft['gen_acc_sampled']:.1%} sampled."]
    if all(b in summary for b in BRACKETS):
        t, i = (summary[b]["per_seed"] for b in BRACKETS)
        seeds = [k for k in t["text"] if k in i["text"]]
        d_img = paired_interval([i["image"][k] - t["image"][k] for k in seeds])
        d_txt = paired_interval([t["text"][k] - i["text"][k] for k in seeds])
        apart = word(d_img) == "better" and word(d_txt) == "better"
        lines.append(f"Brackets {'clearly apart' if apart else 'NOT clearly apart'}: image loss image-only minus text-only "
                     f"{d_img.format()}, text loss text-only minus image-only {d_txt.format()}"
                     + ("." if apart else "; the comparisons below cannot detect a change in the trade-off."))
    if BASELINE in summary:
        lines.append(f"Gradient balance under vanilla LoRA: median per-layer ||g_text||/||g_image|| = "
                     f"{summary[BASELINE]['ratio_median']:.3g}.")
    for rule, c in comparison.items():
        if frontier_weight(rule) is not None or rule in BRACKETS or rule not in summary:
            continue
        parts = []
        for m, label in (("image", "image loss"), ("text", "text loss"), ("gen_acc_sampled", "generation accuracy"),
                         ("und_acc", "understanding accuracy")):
            if f"vs_sum_{m}" in c:
                d = c[f"vs_sum_{m}"]
                parts.append(f"{label} {_iv(d, pct=m in HIGHER_IS_BETTER)} ({d['word']})")
        text = f"{rule} vs vanilla: " + ", ".join(parts)
        for name, label in (("image_at_text", "image loss at equal text loss"), ("gen_at_text", "generation accuracy at equal text loss"),
                            ("text_at_gen", "text loss at equal generation accuracy")):
            if name in c:
                d = c[name]
                text += f"; vs the reweighting curve, {label}: {_iv(d, pct=name == 'gen_at_text')} -> {d['place'].upper()}"
                if d["inside_fraction"] < 1:
                    text += f" ({1 - d['inside_fraction']:.0%} of seeds outside the curve's range)"
        lines.append(text + ".")
    counted = [d for rule, c in comparison.items() if frontier_weight(rule) is None and rule not in BRACKETS and rule in summary
               for d in [c.get(f"vs_sum_{m}") for m in ("image", "text", "gen_acc_sampled", "und_acc")] + [c.get(k) for k in DISTANCES]
               if d is not None and d["n"] > 1 and d.get("place") != "outside"]
    line = chance_line(len(counted), sum(d["word"] == "better" for d in counted),
                       "pareto-lora demo --world digits --seeds with seeds no run used")
    return lines + ([line] if line else [])
