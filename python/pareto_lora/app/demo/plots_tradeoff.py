"""The study's two main figures: the trade-off plane and the paired distances per seed.
"""

from __future__ import annotations

import numpy as np

from .methods import frontier_weight
from .report import BRACKETS
from ...study.stats import paired_interval

__all__ = ["plot_tradeoff", "plot_paired", "write_all"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless (CI, ssh)
    import matplotlib.pyplot as plt

    return plt


def _ci(values) -> float:
    iv = paired_interval(values)
    return 0.0 if iv.n < 2 else (iv.high - iv.low) / 2


def _draw(ax, summary: dict, comparison: dict, legend: bool) -> list[tuple[float, float]]:
    """The curve and every method on `ax`; returns the curve's (x, y) points."""
    plt = _pyplot()
    curve = sorted((w, r) for r in summary if (w := frontier_weight(r)) is not None)
    xs = [summary[r]["mean"]["text_excess"] for _, r in curve]
    ys = [summary[r]["mean"]["image_excess"] for _, r in curve]
    if curve:
        ax.plot(xs, ys, "-o", color="black", lw=1.5, ms=4, label="L_text + w·L_image", zorder=3)
        for (w, _), x, y in zip(curve, xs, ys):
            ax.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    cmap = plt.get_cmap("tab20")
    for i, rule in enumerate(r for r in summary if frontier_weight(r) is None):
        s = summary[rule]
        tx, iy = list(s["per_seed"]["text_excess"].values()), list(s["per_seed"]["image_excess"].values())
        place = comparison.get(rule, {}).get("frontier", {}).get("place")
        marker = {"below": "v", "above": "^"}.get(place, "s" if rule in BRACKETS else "o")
        ax.errorbar(np.mean(tx), np.mean(iy), xerr=_ci(tx), yerr=_ci(iy), fmt=marker, color=cmap(i % 20),
                    ms=6, capsize=2, label=rule + (f" ({place})" if place else ""))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="upper right", ncol=2)
    return list(zip(xs, ys))


def plot_tradeoff(summary: dict, comparison: dict, path: str) -> str:
    """(text excess, image excess) plane: the reweighting curve (w = 1, 2, ...) and every other
    method as a point with 95% t-interval error bars over seeds; lower-left is better. Left: the
    whole plane (log axes: the brackets sit far out); right: zoomed on the curve (linear)."""
    plt = _pyplot()
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.2))
    _draw(full, summary, comparison, legend=True)
    full.set_xscale("log")
    full.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (full.xaxis, full.yaxis):  # plain numbers; minor labels would overlap
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    full.set_title("whole plane (log axes)", fontsize=9)
    pts = _draw(zoom, summary, comparison, legend=False)
    if len(pts) >= 2:
        (x0, x1), (y0, y1) = (min(p[0] for p in pts), max(p[0] for p in pts)), (min(p[1] for p in pts), max(p[1] for p in pts))
        zoom.set_xlim(x0 - 0.35 * (x1 - x0), x1 + 0.35 * (x1 - x0))
        zoom.set_ylim(y0 - 0.6 * (y1 - y0), y1 + 0.8 * (y1 - y0))
    zoom.set_title("zoom on the reweighting curve", fontsize=9)
    for ax in (full, zoom):
        ax.set_xlabel("held-out text excess loss (nats/token over the exact floor)")
    full.set_ylabel("held-out image excess loss")
    fig.suptitle("trade-off plane: mean over seeds, bars = 95% t-interval; lower-left is better; "
                 "v below / ^ above the curve at equal text excess", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_paired(comparison: dict, path: str) -> str:
    """Per seed: image-excess distance of each method from the reweighting curve at equal text
    excess (dots), with the mean and 95% interval (bar); < 0 = below the curve = better."""
    plt = _pyplot()
    rows = [(r, c["frontier"]) for r, c in comparison.items() if "frontier" in c and c["frontier"]["place"] != "outside"]
    # beyond the curve's text range in every seed the distance is extrapolation (and would set the scale)
    omitted = [r for r, c in comparison.items() if c.get("frontier", {}).get("place") == "outside"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(rows), 2) + 1.2))
    for i, (rule, f) in enumerate(rows):
        ax.scatter(f["per_seed"], [i] * len(f["per_seed"]), s=12, color="gray", zorder=3)
        if f["n"] > 1:
            ax.plot([f["low"], f["high"]], [i, i], color="black", lw=2)
        ax.plot([f["mean"]], [i], "|", color="red", ms=12, mew=2)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [r for r, _ in rows], fontsize=8)
    ax.set_xlabel("image excess minus the reweighting curve at equal text excess (< 0: better)")
    ax.set_title("paired distance to the reweighting curve per seed (bar: 95% t-interval)"
                 + (f"\nomitted, outside the curve's text range: {', '.join(omitted)}" if omitted else ""), fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(summary: dict, comparison: dict, out_dir: str) -> dict[str, str]:
    """Both figures into `out_dir`; returns name -> path."""
    import os

    return {"tradeoff": plot_tradeoff(summary, comparison, os.path.join(out_dir, "tradeoff.png")),
            "paired": plot_paired(comparison, os.path.join(out_dir, "paired.png"))}
