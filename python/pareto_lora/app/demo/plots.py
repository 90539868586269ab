"""The demo's PNG figures (matplotlib, Agg backend): losses, gradient-ratio heatmaps, cases.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ...training.diagnostics import case_colors, case_counts, plot_balancer
from ...rules import Case

__all__ = ["plot_losses", "plot_ratio_heatmaps", "plot_group_ratio_heatmaps", "group_ratio_grid", "group_labels",
           "case_colors_by_name", "plot_cases", "plot_summary", "plot_balancers", "write_all"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # the demo runs headless (CI, ssh)
    import matplotlib.pyplot as plt

    return plt


def case_colors_by_name() -> dict[str, tuple]:
    """One colour per integration case, the package's (training.diagnostics.case_colors)."""
    return case_colors()


def _colors(rules) -> dict[str, tuple]:
    cmap = _pyplot().get_cmap("tab10")
    return {r: cmap(i % 10) for i, r in enumerate(rules)}


def _by_rule(runs) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.rule, []).append(r)
    return out


def _loss_panel(ax, runs, key: str, title: str) -> None:
    groups = _by_rule(runs)
    colors = _colors(groups)
    for rule, rs in groups.items():
        steps = rs[0].eval_steps
        ys = np.array([getattr(r, key) for r in rs], dtype=float)
        mean = ys.mean(axis=0)
        ax.plot(steps, mean, label=rule, color=colors[rule], lw=2 if rule in ("sum", "pareto_lora") else 1.2)
        if len(rs) > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, color=colors[rule], alpha=0.15, lw=0)
    ax.set_title(title)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out excess loss (nats)")
    ax.grid(alpha=0.3)


def plot_losses(runs, path: str) -> str:
    """Held-out text and image excess loss over fine-tuning, one line per rule (mean ± std over seeds)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _loss_panel(axes[0], runs, "eval_text_excess", "text tokens: loss - exact floor")
    _loss_panel(axes[1], runs, "eval_image_excess", "image tokens: loss - exact floor")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_ratio_grid(run, level: str = "layers") -> tuple[np.ndarray, list[str]]:
    """[rows, steps] log10 ||g_text||/||g_image|| per layer (``level="layers"``) or per layer
    group (``"groups"``); NaN where a norm is zero or not measured (MIMO's one-backward mode)."""
    names = [n for n in run.records[0][level] if level == "groups" or n.startswith("layer")]

    def lg(x):
        return math.log10(x) if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else math.nan

    grid = np.array([[lg(rec[level][n]["ratio"]) for rec in run.records] for n in names], dtype=float)
    return grid, names


def group_labels(run) -> list[str]:
    """'group0*' (* = modulated) and, below it, the layers it covers ('L0-1'), for each layer group."""
    names = list(run.records[0]["groups"])
    active = run.records[0]["active"]
    layers = run.group_layers or [None] * len(names)  # unknown for runs saved before the field existed
    return [f"{n}{'*' if a else ''}" + (f"\nL{min(ls)}-{max(ls)}" if ls else "") for n, a, ls in zip(names, active, layers)]


def _no_ratio(ax, grid) -> bool:
    if np.isfinite(grid).any():
        return False
    ax.text(0.5, 0.5, "no ratio: one modality's gradient is zero\n(bracket) or not measured (MIMO)",
            ha="center", va="center", fontsize=7, transform=ax.transAxes)
    return True


def _heatmap(ax, run, lim: float, grid=None, labels=None, title=None):
    if grid is None:
        grid, names = _log_ratio_grid(run)
        labels = [n.replace("layer", "L") for n in names]
    _no_ratio(ax, grid)
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap="coolwarm",
                   vmin=-lim, vmax=lim, interpolation="nearest",
                   extent=(0.5, grid.shape[1] + 0.5, -0.5, grid.shape[0] - 0.5))
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(title or f"{run.rule} (seed {run.seed})", fontsize=9)
    return im


def _shared_limit(grids) -> float:
    vals = np.concatenate([g.ravel() for g in grids])
    vals = vals[np.isfinite(vals)]
    return max(0.1, float(np.abs(vals).max())) if vals.size else 1.0


def _panels(n: int):
    plt = _pyplot()
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return plt, fig, axes


def plot_ratio_heatmaps(runs, path: str) -> str:
    """Per-layer log10 ||g_text||/||g_image|| over steps (the paper's Figs. 4/6), one panel per rule.

    The ratio is measured on the raw per-modality gradients, before integration, on each rule's
    own trajectory (first seed).
    """
    firsts = [rs[0] for rs in _by_rule(runs).values()]
    lim = _shared_limit([_log_ratio_grid(r)[0] for r in firsts])
    plt, fig, axes = _panels(len(firsts))
    for ax, run in zip(axes.flat, firsts):
        im = _heatmap(ax, run, lim)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="log10 ||g_text|| / ||g_image||  (>0: text dominates)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def group_ratio_grid(rs) -> np.ndarray:
    """[groups, steps] median over the runs `rs` (the seeds of one method) of the per-group log10
    ratio; runs cut short (diverged) are left out; NaN where no seed has a finite ratio."""
    steps = max(len(r.records) for r in rs)
    grids = [_log_ratio_grid(r, "groups")[0] for r in rs if len(r.records) == steps]
    stack = np.stack(grids)
    out = np.full(stack.shape[1:], np.nan)
    ok = np.isfinite(stack).any(axis=0)
    out[ok] = np.nanmedian(stack[:, ok], axis=0)
    return out


def plot_group_ratio_heatmaps(runs, path: str) -> str:
    """Per layer group and step: log10 ||g_text||/||g_image|| (median over seeds), one panel per
    method; rows labelled with the layers each group covers (* = the groups the rule modulates)."""
    groups = _by_rule(runs)
    grids = {rule: group_ratio_grid(rs) for rule, rs in groups.items()}
    lim = _shared_limit(list(grids.values()))
    plt, fig, axes = _panels(len(groups))
    for ax, (rule, rs) in zip(axes.flat, groups.items()):
        im = _heatmap(ax, rs[0], lim, grids[rule], group_labels(rs[0]), f"{rule} (median of {len(rs)} seeds)")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="log10 ||g_text|| / ||g_image|| per group  (>0: text dominates)")
    fig.suptitle("gradient ratio per layer group and step (per-modality gradients before integration; "
                 "w<k>: of the weighted image loss)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_cases(runs, path: str) -> str:
    """For each rule: fraction of steps in each integration case, per layer group (all seeds)."""
    groups = _by_rule(runs)
    plt, fig, axes = _panels(len(groups))
    case_colors = case_colors_by_name()
    used: set[str] = set()
    for ax, (rule, rs) in zip(axes.flat, groups.items()):
        counts = case_counts(rec for r in rs for rec in r.records)
        names = list(counts)
        bottom = np.zeros(len(names))
        for case in Case:
            frac = np.array([counts[g][case.name] / max(sum(counts[g].values()), 1) for g in names])
            if frac.any():
                ax.bar(names, frac, bottom=bottom, color=case_colors[case.name], label=case.name.lower())
                bottom += frac
                used.add(case.name)
        ax.set_xticks(range(len(names)), group_labels(rs[0]), fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(rule, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=case_colors[c.name]) for c in Case if c.name in used]
    fig.legend(handles, [c.name.lower() for c in Case if c.name in used], loc="outside lower center",
               ncol=max(len(handles), 1), fontsize=8)
    fig.suptitle("integration case per layer group (fraction of steps over all seeds; * = modulated group; "
                 "L = its layers)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_summary(runs, path: str) -> str:
    """One small figure for the README: both held-out losses and vanilla LoRA's ratio heatmap."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    _loss_panel(axes[0], runs, "eval_text_excess", "held-out text excess")
    _loss_panel(axes[1], runs, "eval_image_excess", "held-out image excess")
    axes[1].legend(fontsize=7)
    vanilla = next((r for r in runs if r.rule == "sum"), runs[0])
    im = _heatmap(axes[2], vanilla, _shared_limit([_log_ratio_grid(vanilla)[0]]))
    axes[2].set_title(f"log10 ||g_text||/||g_image||, {vanilla.rule}", fontsize=9)
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_balancers(runs, path: str) -> str | None:
    """MIMO's sigma, GradNorm's weights, CoMMIT's kappa ... over the steps (first seed); None if no run has them."""
    firsts = [rs[0] for rs in _by_rule(runs).values() if rs[0].records and rs[0].records[0].get("balancer")]
    if not firsts:
        return None
    merged = [{"step": rec["step"], "balancer": {k: v for r in firsts for k, v in r.records[i]["balancer"].items()}}
              for i, rec in enumerate(firsts[0].records)]
    return plot_balancer(merged, path)


def write_all(runs, out_dir: str) -> dict[str, str]:
    """All figures into `out_dir`; returns name -> path."""
    j = os.path.join
    files = {
        "losses": plot_losses(runs, j(out_dir, "losses.png")),
        "ratio_heatmaps": plot_ratio_heatmaps(runs, j(out_dir, "ratio_heatmaps.png")),
        "group_ratio_heatmaps": plot_group_ratio_heatmaps(runs, j(out_dir, "group_ratio_heatmaps.png")),
        "cases": plot_cases(runs, j(out_dir, "cases.png")),
        "summary": plot_summary(runs, j(out_dir, "summary.png")),
    }
    balancers = plot_balancers(runs, j(out_dir, "balancers.png"))
    if balancers:
        files["balancers"] = balancers
    return files
