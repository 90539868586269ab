"""Numbers out of the demo's runs: the per-rule summary, the verdict, the table and the JSON file.
May import: :mod:`pareto_lora.training.diagnostics`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

from ...training.diagnostics import case_counts

__all__ = ["summarize", "verdict", "format_table", "results_document", "write_json"]

BASELINE, METHOD = "sum", "pareto_lora"
#: the other balancing methods of the field, each compared with vanilla in the verdict
OTHERS = ("mmpareto", "mimo", "gradnorm", "commit")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _ratio_median(records: list[dict], upto: int) -> float:
    """Median over the first `upto` steps and over groups of ||g_text|| / ||g_image||."""
    vals = [g["ratio"] for r in records[:upto] for g in r["groups"].values()]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def summarize(runs) -> dict[str, dict]:
    """rule -> final held-out losses (mean, std, per seed), curves, ratios and case fractions."""
    by_rule: dict[str, list] = {}
    for run in runs:
        by_rule.setdefault(run.rule, []).append(run)
    out = {}
    for rule, rs in by_rule.items():
        rs = sorted(rs, key=lambda r: r.seed)
        text, image = [r.final_text for r in rs], [r.final_image for r in rs]
        counts = case_counts(rec for r in rs for rec in r.records)
        fractions = {g: {c: n / max(sum(row.values()), 1) for c, n in row.items() if n} for g, row in counts.items()}
        out[rule] = {
            "seeds": [r.seed for r in rs],
            "text": dict(zip(("mean", "std"), _mean_std(text)), per_seed=text),
            "image": dict(zip(("mean", "std"), _mean_std(image)), per_seed=image),
            "eval_steps": rs[0].eval_steps,
            "eval_text_mean": [statistics.fmean(c) for c in zip(*(r.eval_text for r in rs))],
            "eval_image_mean": [statistics.fmean(c) for c in zip(*(r.eval_image for r in rs))],
            "ratio_median_first10": statistics.fmean(_ratio_median(r.records, 10) for r in rs),
            "ratio_median_all": statistics.fmean(_ratio_median(r.records, len(r.records)) for r in rs),
            "case_fractions": fractions,
            "seconds": sum(r.seconds for r in rs),
        }
    return out


def _paired(summary: dict, rule: str, key: str) -> list[float]:
    """Per-seed difference rule - baseline of the final held-out `key` loss (same seeds)."""
    return [a - b for a, b in zip(summary[rule][key]["per_seed"], summary[BASELINE][key]["per_seed"])]


def verdict(summary: dict) -> list[str]:
    """Plain-language findings computed from the numbers (nothing here is fixed in advance)."""
    lines = []
    if BASELINE in summary:
        r0, r_all = summary[BASELINE]["ratio_median_first10"], summary[BASELINE]["ratio_median_all"]
        kind = "text-dominant" if r_all > 1 else "NOT text-dominant (image gradients are the larger ones)"
        lines.append(f"Gradient balance under vanilla LoRA: median ||g_text||/||g_image|| over groups = {r0:.2g} "
                     f"in the first 10 steps, {r_all:.2g} over the run: {kind}.")
    if BASELINE not in summary or METHOD not in summary:
        lines.append(f"No Pareto LoRA vs vanilla verdict: it needs both '{METHOD}' and '{BASELINE}' in --rules.")
        return lines + _others(summary)
    d_img, d_txt = _paired(summary, METHOD, "image"), _paired(summary, METHOD, "text")
    n, wins = len(d_img), sum(d < 0 for d in d_img)
    m_img, m_txt = statistics.fmean(d_img), statistics.fmean(d_txt)
    img = f"{summary[METHOD]['image']['mean']:.4f} vs {summary[BASELINE]['image']['mean']:.4f}"
    spread = f"lower in {wins}/{n} seed{'s' if n > 1 else ''}"
    if m_img < 0 and wins == n:
        head = f"Pareto LoRA BEATS vanilla LoRA on held-out image loss: {img} ({m_img:+.4f}, {spread})"
        if n == 1:
            head += "; one seed only, so no spread estimate"
    elif m_img < 0:
        head = f"Pareto LoRA is NOT consistently better than vanilla LoRA on held-out image loss: {img} ({m_img:+.4f}, {spread})"
    else:
        head = f"Pareto LoRA does NOT beat vanilla LoRA on held-out image loss in this setting: {img} ({m_img:+.4f}, {spread})"
    lines.append(head + ".")
    txt = f"{summary[METHOD]['text']['mean']:.4f} vs {summary[BASELINE]['text']['mean']:.4f}"
    lines.append(f"Held-out text loss, Pareto LoRA vs vanilla: {txt} ({m_txt:+.4f}: "
                 f"{'worse' if m_txt > 0 else 'better or equal'} text).")
    lines += _others(summary)
    best = min(summary, key=lambda r: summary[r]["image"]["mean"])
    lines.append(f"Lowest mean held-out image loss: {best} ({summary[best]['image']['mean']:.4f}).")
    return lines


def _others(summary: dict) -> list[str]:
    """One line per other balancing method: its paired image and text change against vanilla."""
    if BASELINE not in summary:
        return []
    lines = []
    for rule in (r for r in OTHERS if r in summary):
        d_img, d_txt = _paired(summary, rule, "image"), _paired(summary, rule, "text")
        n, wins = len(d_img), sum(d < 0 for d in d_img)
        m_img = statistics.fmean(d_img)
        word = "better" if m_img < 0 and wins == n else ("mixed" if m_img < 0 else "not better")
        lines.append(f"{rule} vs vanilla: image {summary[rule]['image']['mean']:.4f} ({m_img:+.4f}, lower in "
                     f"{wins}/{n} seeds: {word}); text {statistics.fmean(d_txt):+.4f}.")
    return lines


def format_table(summary: dict) -> str:
    """Final held-out losses per rule, mean +- std over seeds, and the paired change vs vanilla."""
    has_base = BASELINE in summary
    head = f"{'rule':<13} {'text loss':>17} {'image loss':>17}" + (f" {'d image vs sum':>15} {'d text vs sum':>14}" if has_base else "")
    lines = [head, "-" * len(head)]
    for rule, s in summary.items():
        row = f"{rule:<13} {s['text']['mean']:>8.4f} ± {s['text']['std']:<6.4f} {s['image']['mean']:>8.4f} ± {s['image']['std']:<6.4f}"
        if has_base:
            row += f" {statistics.fmean(_paired(summary, rule, 'image')):>+15.4f} {statistics.fmean(_paired(summary, rule, 'text')):>+14.4f}"
        lines.append(row)
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


def results_document(result: dict, summary: dict, verdict_lines: list[str], environment: dict, files: dict) -> dict:
    """Everything the demo measured, as one JSON-ready dict."""
    cfg = result["config"]
    return _finite({
        "config": dataclasses.asdict(cfg),
        "environment": environment,
        "task": {"vocab": dataclasses.asdict(result["vocab"]), "vocab_size": result["vocab"].size,
                 "sequence_length": result["seq_len"]},
        "base_model_eval": result["base_eval"],
        "timings": result["timings"],
        "summary": summary,
        "verdict": verdict_lines,
        "files": files,
        "runs": [dataclasses.asdict(r) for r in result["runs"]],
    })


def write_json(doc: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, allow_nan=False)
