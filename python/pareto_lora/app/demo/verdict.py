"""The demo's findings in words, computed from the paired intervals (nothing fixed in advance).

Order: floors, what the base knows, whether the text-only / image-only brackets are apart (if
not, nothing else is detectable), then each rule against vanilla and against the reweighting
curve. Words are "better" / "worse" / "no detectable difference" (stats.word), never a ranking
of point estimates.
"""

from __future__ import annotations

import math

from .methods import frontier_weight
from .report import BASELINE, BRACKETS
from ...study.stats import chance_line, paired_interval, word

__all__ = ["verdict", "brackets_apart", "power", "POWER_RULE"]

#: the difference the default demo must be able to see: loss weight 2 against vanilla (w = 1, issue 25)
POWER_RULE = "w2"


def brackets_apart(summary: dict):
    """(apart, d_image, d_text): whether image-only fine-tuning ends at a clearly lower image
    excess than text-only (d_image = image_only - text_only < 0) AND text-only at a clearly lower
    text excess (d_text = text_only - image_only < 0), from paired 95% intervals; None when the
    brackets were not run."""
    if "text_only" not in summary or "image_only" not in summary:
        return None
    t, i = summary["text_only"]["per_seed"], summary["image_only"]["per_seed"]
    seeds = [k for k in t["text_excess"] if k in i["text_excess"]]
    d_img = paired_interval([i["image_excess"][k] - t["image_excess"][k] for k in seeds])
    d_txt = paired_interval([t["text_excess"][k] - i["text_excess"][k] for k in seeds])
    return word(d_img) == "better" and word(d_txt) == "better", d_img, d_txt


def power(comparison: dict, key: str = "vs_sum_image_excess", measure: str = "image excess",
          consequence: str = "its verdicts of 'no detectable difference' say little; run --full (5 seeds) for the study",
          ) -> dict:
    """Whether this run can tell w=2 from w=1 (vanilla), from its own paired interval.

    Returns {"line", "detects", "interval"}: the line is printed first among the results, since a
    run that cannot see this difference says little with its "no detectable difference" verdicts.
    detects and interval are None when 'sum' or 'w2' was not run. Both worlds use it: `key` names
    the comparison's interval of w2 against vanilla (the shapes world's image excess; the digits
    world's raw image loss, ``key="vs_sum_image", measure="image loss"``: the same difference, as
    a floor is a constant; its generation accuracy too). `consequence` ends the line of a run
    that cannot tell them apart: what that means for the run's verdicts."""
    d = comparison.get(POWER_RULE, {}).get(key) if BASELINE in comparison else None
    if d is None:
        return {"line": f"Power: not checked; the power check needs both '{BASELINE}' (w=1) and '{POWER_RULE}' among the "
                        "methods.", "detects": None, "interval": None}
    detects = d["n"] > 1 and (d["low"] > 0 or d["high"] < 0)
    head = f"Power: w=2 minus w=1 (vanilla), paired {measure} {_fmt(d)} over {d['n']} seed{'s' * (d['n'] > 1)}: "
    tail = ("this run can tell w=2 from w=1 (the interval excludes 0)." if detects else
            f"this run cannot tell w=2 from w=1 apart (the interval covers 0), so {consequence}.")
    return {"line": head + tail, "detects": detects, "interval": d}


def _fmt(d: dict) -> str:
    return f"{d['mean']:+.3f}" + (f" [{d['low']:+.3f}, {d['high']:+.3f}]" if d["n"] > 1 else " (one seed: no interval)")


def verdict(result: dict, summary: dict, comparison: dict) -> list[str]:
    """Plain-language findings from the floors, the base's evaluation and the paired intervals."""
    fl, base = result["floors"], result["base"]
    lines = [f"Exact floors of the fine-tuning world (enumerated): text {fl['text']:.3f}, image {fl['image']:.3f} "
             f"nats/token; all numbers below are excess over them (0 = Bayes-optimal)."]
    per_seed = base.get("per_seed")
    for name, b in ([(f"Base model of seed {k}", b) for k, b in per_seed.items()] if per_seed else [("Base model", base)]):
        own, ft = b.get("own_world"), b.get("finetune_world_before")
        if own:
            lines.append(f"{name} ({b['steps']} pre-training steps): on its own world image excess {own['image_excess']:.3f}, "
                         f"cell accuracy {own['cell_acc']:.1%}; on the fine-tuning world before LoRA: text excess "
                         f"{ft['text_excess']:.3f}, image excess {ft['image_excess']:.3f}, cell accuracy {ft['cell_acc']:.1%}.")
    br = brackets_apart(summary)
    if br is None:
        check = power(comparison)
        lines.append("No brackets (text_only / image_only not run): " + (
            "the power check above measures the sensitivity instead." if check.get("detects") is not None
            else "the experiment's sensitivity is unknown."))
    else:
        apart, d_img, d_txt = br
        nums = f"image excess image-only minus text-only {d_img.format()}, text excess text-only minus image-only {d_txt.format()}"
        if apart:
            lines.append(f"Brackets: image-only and text-only fine-tuning end clearly apart in both modalities ({nums}; "
                         "paired 95% intervals exclude 0), so the setting can show a change in the trade-off.")
        else:
            lines.append(f"Brackets: image-only and text-only fine-tuning are NOT clearly apart ({nums}), so this run "
                         "cannot detect a change in the text/image trade-off; the comparisons below are inconclusive.")
    balance = _balance_line(summary)
    if balance:
        lines.append(balance)
    n_w = sum(frontier_weight(r) is not None for r in summary)
    if n_w < 2:
        lines.append("No reweighting curve (needs 'sum' and at least one w<k> run): rules are compared with vanilla only.")
    for rule, c in comparison.items():
        if frontier_weight(rule) is not None or rule in BRACKETS:
            continue
        parts = []
        if "vs_sum_image_excess" in c:
            parts.append(f"vs vanilla: image excess {_fmt(c['vs_sum_image_excess'])} ({c['vs_sum_image_excess']['word']}), "
                         f"text excess {_fmt(c['vs_sum_text_excess'])} ({c['vs_sum_text_excess']['word']})")
        if "frontier" in c and c["frontier"]["place"] == "outside":
            weights = sorted(w for w in map(frontier_weight, summary) if w is not None)
            ws = ", ".join(f"{w:g}" for w in weights)
            parts.append("vs reweighting curve: OUTSIDE the curve's text-excess range in every seed, so there is no "
                         f"comparison at equal text excess (the curve's weights here: w = {ws}; more weights widen its "
                         "range, e.g. --full's)")
        elif "frontier" in c:
            f = c["frontier"]
            extra = "" if f["inside_fraction"] == 1 else f"; outside the curve's range in {1 - f['inside_fraction']:.0%} of seeds"
            parts.append(f"vs reweighting curve at equal text excess: {_fmt(f)} -> {f['place'].upper()} the curve "
                         f"({'better than' if f['place'] == 'below' else 'worse than' if f['place'] == 'above' else 'no detectable difference from'}"
                         f" loss reweighting{extra})")
        if parts:
            lines.append(f"{rule}: " + "; ".join(parts) + ".")
    counted = [d for rule, c in comparison.items() if frontier_weight(rule) is None and rule not in BRACKETS
               for d in (c.get("vs_sum_image_excess"), c.get("vs_sum_text_excess"), c.get("frontier"))
               if d is not None and d["n"] > 1 and d.get("place") != "outside"]
    line = chance_line(len(counted), sum((d["place"] if "place" in d else d["word"]) in ("better", "below") for d in counted),
                       "pareto-lora demo --seeds with seeds no run used")
    return lines + ([line] if line else [])


def _balance_line(summary: dict) -> str | None:
    """The median per-group ||g_text||/||g_image|| under vanilla LoRA; where vanilla took one backward
    (``plain_backward="one"``: no per-modality gradients), the raw gradients of the first run that
    measured them, named, before its integration (at step 1 they are vanilla's)."""
    def measured(rule):
        return rule in summary and math.isfinite(summary[rule]["ratio_median_first10"])

    rule = BASELINE if measured(BASELINE) else next((r for r in summary if measured(r)), None)
    if rule is None:
        return None
    r0, r_all = summary[rule]["ratio_median_first10"], summary[rule]["ratio_median_all"]
    where = ("under vanilla LoRA" if rule == BASELINE else
             f"on {rule}'s runs (raw per-modality gradients before integration; vanilla's runs take one backward "
             "and measure none)")
    return (f"Gradient balance {where}: median ||g_text||/||g_image|| over groups = {r0:.2g} in the first 10 steps, "
            f"{r_all:.2g} over the run.")
