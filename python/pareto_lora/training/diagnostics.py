"""Record ParetoLoRA step reports over training (JSONL) and plot them (matplotlib, Agg).

    rec = pareto_lora.diagnostics.Recorder("runs/diag.jsonl")
    for step ...:
        report = pl.backward(text=..., image=...)
        rec.record(step, report)          # one host sync (reads the report), one JSON line
    rec.close()
    pareto_lora.diagnostics.plot_all("runs/diag.jsonl", "runs/plots")

Plots: the ratio ||g_text|| / ||g_image|| per layer over training as a heatmap (log10 colour
scale; the paper's Figures 4 and 6), the same per group (Figure 3 style lines), how
often each case fired per group, and a balancer's quantities over training (MIMO's sigma,
gaps and floors, GradNorm's weights, CoMMIT's kappa: ``report.balancer``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

from ..rules import Case

__all__ = ["Recorder", "load", "case_counts", "case_fractions", "plot_ratio_heatmap", "plot_group_ratios", "plot_case_counts",
           "balancer_series", "plot_balancer", "plot_all"]


class Recorder:
    """Appends one JSON object per recorded step to ``path`` (``{"step": n, ...report.to_record()}``).

    ``every``: record only steps divisible by it (each record reads the report: one host sync).
    """

    def __init__(self, path: str | os.PathLike, every: int = 1, append: bool = False):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        self.path = os.fspath(path)
        self.every = every
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")

    def record(self, step: int, report, **extra) -> bool:
        """Write `report` (a StepReport) for `step`; returns whether it was written."""
        if step % self.every:
            return False
        row = {"step": int(step), **report.to_record(), **extra}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        return True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file written by :class:`Recorder`, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _records(source) -> list[dict]:
    recs = load(source) if isinstance(source, (str, os.PathLike)) else list(source)
    if not recs:
        raise ValueError("records: no records to plot")
    return recs


def _log_ratio(x) -> float:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        return math.nan  # zero or missing gradients: left blank in the plots
    return math.log10(x)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # plotting is optional: the library installs without matplotlib
        raise ModuleNotFoundError("matplotlib: expected it installed to draw plots; install the package's "
                                  "'demo' extra (or matplotlib)") from e

    matplotlib.use("Agg")  # no display in training jobs
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> str:
    """Lay out, write (100 dpi) and close a figure; returns the path written."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)


def case_colors() -> dict[str, tuple]:
    """One colour per integration case (by Case name), the same in every figure of the package:
    Set2 in Case order. The demo's figures use it too."""
    cmap = _pyplot().get_cmap("Set2")
    return {c.name: cmap(i) for i, c in enumerate(Case)}


def plot_ratio_heatmap(records: str | os.PathLike | Iterable[dict], path: str | os.PathLike, level: str = "layer") -> str:
    """Heatmap of log10(||g_text|| / ||g_image||): rows = layers (or groups), columns = steps."""
    import numpy as np

    if level not in ("layer", "group"):
        raise ValueError(f"level: expected 'layer' or 'group', got {level!r}")
    recs = _records(records)
    key = "layers" if level == "layer" else "groups"
    names = list(recs[0][key])
    grid = np.array([[_log_ratio(r[key].get(n, {}).get("ratio")) for r in recs] for n in names], dtype=float)
    steps = [r["step"] for r in recs]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.15 * len(steps) + 3), max(3.0, 0.25 * len(names) + 1.5)))
    finite = grid[np.isfinite(grid)]
    lim = max(1e-3, float(np.abs(finite).max())) if finite.size else 1.0
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim,
                   interpolation="nearest", origin="lower")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    ax.set_title(f"log10 ||g_text|| / ||g_image|| per {level}")
    fig.colorbar(im, ax=ax, label="log10 ratio (>0: text dominates)")
    return _save(plt, fig, path)


def plot_group_ratios(records: str | os.PathLike | Iterable[dict], path: str | os.PathLike) -> str:
    """One line per group: ||g_text|| / ||g_image|| over steps (log scale)."""
    recs = _records(records)
    steps = [r["step"] for r in recs]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in recs[0]["groups"]:
        ys = [10 ** v if math.isfinite(v := _log_ratio(r["groups"][name]["ratio"])) else math.nan for r in recs]
        ax.plot(steps, ys, label=name)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("||g_text|| / ||g_image||")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def case_counts(records: Iterable[dict]) -> dict[str, dict[str, int]]:
    """group -> case name -> number of recorded steps with that case."""
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        for name, row in r["groups"].items():
            c = counts.setdefault(name, {k.name: 0 for k in Case})
            c[Case(int(row["case"])).name] += 1
    return counts


def case_fractions(records: Iterable[dict]) -> dict[str, dict[str, float]]:
    """group -> case name -> share of the recorded steps with that case (cases never seen left out)."""
    return {g: {c: n / max(sum(row.values()), 1) for c, n in row.items() if n}
            for g, row in case_counts(records).items()}


def plot_case_counts(records: str | os.PathLike | Iterable[dict], path: str | os.PathLike) -> str:
    """Stacked bars: for each group, how many recorded steps ended in each case."""
    recs = _records(records)
    counts = case_counts(recs)
    groups = list(counts)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(groups) + 2), 3.5))
    bottom = [0] * len(groups)
    colors = case_colors()
    for case in Case:
        vals = [counts[g][case.name] for g in groups]
        if any(vals):
            ax.bar(groups, vals, bottom=bottom, label=case.name.lower(), color=colors[case.name])
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("steps")
    ax.set_title("integration case per group")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    return _save(plt, fig, path)


def balancer_series(records: Iterable[dict]) -> dict[str, dict[str, list[float]]]:
    """method -> quantity -> values over the records (``{"mimo": {"sigma_text": [...]}}``)."""
    out: dict[str, dict[str, list[float]]] = {}
    recs = list(records)
    keys = sorted({k for r in recs for k in (r.get("balancer") or {})})
    for key in keys:
        method, _, name = key.partition("/")
        vals = [(r.get("balancer") or {}).get(key) for r in recs]
        out.setdefault(method, {})[name] = [math.nan if v is None else float(v) for v in vals]
    return out


def plot_balancer(records: str | os.PathLike | Iterable[dict], path: str | os.PathLike) -> str | None:
    """One panel per method: its quantities (sigma, w, kappa, ...) over steps; None when there are none."""
    recs = _records(records)
    series = balancer_series(recs)
    if not series:
        return None
    steps = [r["step"] for r in recs]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.5), squeeze=False)
    for ax, (method, quantities) in zip(axes.flat, series.items()):
        for name, ys in quantities.items():
            if name == "overhead_s":
                continue
            ax.plot(steps, ys, label=name)
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_all(records: str | os.PathLike | Iterable[dict], out_dir: str | os.PathLike) -> list[str]:
    """All plots into `out_dir`: ratio_layers.png, ratio_groups_heatmap.png, ratio_groups.png, cases.png,
    and balancer.png when the records carry a balancer's quantities."""
    recs = _records(records)
    os.makedirs(out_dir, exist_ok=True)
    j = os.path.join
    files = [
        plot_ratio_heatmap(recs, j(out_dir, "ratio_layers.png"), level="layer"),
        plot_ratio_heatmap(recs, j(out_dir, "ratio_groups_heatmap.png"), level="group"),
        plot_group_ratios(recs, j(out_dir, "ratio_groups.png")),
        plot_case_counts(recs, j(out_dir, "cases.png")),
    ]
    balancer = plot_balancer(recs, j(out_dir, "balancer.png"))
    return files + ([balancer] if balancer else [])

