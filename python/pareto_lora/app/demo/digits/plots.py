"""The digits study's figures: generated digits per method, the trade-off planes, the gradient ratios,
and the three-objective study's loss planes.
"""

from __future__ import annotations

import numpy as np

from ..methods import frontier_weight
from ....study.stats import paired_interval
from .experiment import LONG
from .report import BRACKETS

__all__ = ["mosaic", "plot_samples", "plot_tradeoff", "plot_ratios", "plot_three"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless (CI, ssh)
    import matplotlib.pyplot as plt

    return plt


def mosaic(rows: list, gap: int = 1) -> np.ndarray:
    """One array of `rows` (each a list of 8x8 images) with `gap` blank pixels between images (NaN)."""
    n_cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (8 + gap) - gap, n_cols * (8 + gap) - gap), np.nan)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out[i * (8 + gap): i * (8 + gap) + 8, j * (8 + gap): j * (8 + gap) + 8] = np.asarray(img, dtype=float)
    return out


def plot_samples(rows: dict[str, list], path: str, title: str) -> str:
    """Row label -> ten 8x8 images (digits 0..9), drawn as one grey-scale mosaic."""
    plt = _pyplot()
    names = list(rows)
    img = mosaic([rows[n] for n in names])
    fig, ax = plt.subplots(figsize=(6.4, 0.36 * len(names) + 0.9))
    cmap = plt.get_cmap("gray_r").copy()
    cmap.set_bad("white")
    ax.imshow(img, cmap=cmap, vmin=0, vmax=16, interpolation="nearest")
    ax.set_yticks([i * 9 + 3.5 for i in range(len(names))], names, fontsize=7)
    ax.set_xticks([j * 9 + 3.5 for j in range(10)], [str(d) for d in range(10)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ci(values) -> float:
    iv = paired_interval(values)
    return 0.0 if iv.n < 2 else (iv.high - iv.low) / 2


def _panel(ax, summary: dict, y: str, ylabel: str, scale: float = 1.0) -> None:
    plt = _pyplot()
    curve = sorted((w, r) for r in summary if (w := frontier_weight(r)) is not None)
    if curve:
        xs = [summary[r]["mean"]["text"] for _, r in curve]
        ys = [scale * summary[r]["mean"][y] for _, r in curve]
        ax.plot(xs, ys, "-o", color="black", lw=1.4, ms=4, label="L_text + w·L_image", zorder=3)
        for (w, _), x0, y0 in zip(curve, xs, ys):
            ax.annotate(f"w={w:g}", (x0, y0), textcoords="offset points", xytext=(4, -9), fontsize=6)
    cmap = plt.get_cmap("tab20")
    for i, rule in enumerate(r for r in summary if frontier_weight(r) is None and r not in (*BRACKETS, LONG)):
        s = summary[rule]["per_seed"]
        tx, vy = list(s["text"].values()), [scale * v for v in s[y].values()]
        ax.errorbar(np.mean(tx), np.mean(vy), xerr=_ci(tx), yerr=_ci(vy), fmt="o", color=cmap(i % 20), ms=5,
                    capsize=2, label=rule)
    ax.set_xlabel("held-out text loss (nats/token)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_tradeoff(summary: dict, path: str, title: str) -> str:
    """Text loss vs image loss and vs generation accuracy: the reweighting curve and every method
    (means over seeds, 95% intervals of the per-seed values; the brackets and the long image-only run
    are left out: far off the scale, their numbers are in the table)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    _panel(axes[0], summary, "image", "held-out image loss (nats/token)")
    _panel(axes[1], summary, "gen_acc_sampled", "generation accuracy, sampled (%)", scale=100.0)
    axes[1].legend(fontsize=6, ncol=2, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ratios(dists: dict[str, list[float]], path: str) -> str:
    """Box plots of log10 ||g_text|| / ||g_image|| per layer and step (whiskers 5-95 %) per setting."""
    plt = _pyplot()
    names = [n for n in dists if dists[n]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    ax.boxplot([np.log10(dists[n]) for n in names], whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("log10 ||g_text|| / ||g_image||")
    ax.set_title("vanilla LoRA, every layer and step (box 25-75 %, whiskers 5-95 %)", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_three(summary: dict, grid: dict, path: str, title: str) -> str:
    """The three-objective study's means: generation loss against text loss and against understanding
    loss, the fixed-weight grid's points labelled (``u<w_u>g<w_g>``, ``sum`` = vanilla) and each rule."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    tab = plt.get_cmap("tab10").colors
    rules = [n for n in summary if n not in grid]
    color = {n: tab[i + (i >= 7)] for i, n in enumerate(rules[:9])}  # tab10 without its grey (the grid's colour)
    for ax, (x, xlabel) in zip(axes, (("text", "text loss"), ("understanding", "understanding loss"))):
        for name, s in summary.items():
            m = s["mean"]
            if name in grid:
                ax.plot(m[x], m["image"], "o", color="0.55", ms=5)
                ax.annotate(name, (m[x], m["image"]), fontsize=6, color="0.35", xytext=(3, 2), textcoords="offset points")
            else:
                ax.plot(m[x], m["image"], "s", ms=6, label=name, color=color.get(name, "k"))
        ax.set_xlabel(f"{xlabel} (held-out, nats/token)")
        ax.set_ylabel("generation loss (held-out, nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title + " (grey: fixed loss weights; squares: K = 3 rules; lower is better on every axis)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
