"""`pareto-lora demo --world digits --objectives 3`: the K = 3 rules against fixed loss weights (docs/study_three.md).

The protocol (fixed before the study's run): tune the learning rate once for vanilla LoRA (``sum``
of the three objectives) on seed 100 and the validation split (criterion: text + understanding +
generation validation loss, the lowest wins), then run every method on every paired seed and
score it on the held-out split.

Comparisons, each paired by seed:

* every method against vanilla (``sum``) on the three losses, understanding accuracy and sampled
  generation accuracy (95 % intervals);
* every rule against every point P = (1, w_u, w_g) of the fixed-weight grid *at P's own weights*:
  the held-out ``S_P = L_text + w_u L_understanding + w_g L_generation`` of the rule minus P's,
  simultaneous over the grid's points (Bonferroni: level 1 - 0.05 / |grid| per rule), the plain
  95 % counts beside them. The study's first run showed what this misses: a fixed weighting need
  not be the best plain way to its own objective (another weighting may beat it there), so the
  report names, after each point a rule beats, the grid points that beat it too;
* every rule against *one* fixed weighting at all 16 weightings (``versus``, simultaneous): the
  question "does the rule beat the best fixed weighting?". Named in advance (``--versus``) it is a
  test; chosen as the best point on the run's own seeds (the default) it is exploratory.

Words come from intervals only (pareto_lora.study.stats).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics

from ..model import ModelConfig
from ..parallel import run_cells
from .experiment import DigitsConfig, prepare
from .report import _iv_dict
from .study import tuned
from .three import GRID, METHODS, cell_line3, run_cell3

__all__ = ["QUICK3", "QUICK3_METHODS", "STUDY3", "LOSSES", "METRICS3", "summarize3", "compare3", "power3",
           "format3", "run_three", "check_methods"]

#: ``--quick``: every code path in seconds (CI), no tuning
QUICK3 = dict(seeds=(0, 1), steps=4, pretrain_steps=20, gen_samples=1, lrs=(), cache_dir=None,
              model=ModelConfig(num_layers=3, lora_rank=4), num_groups=3)
QUICK3_METHODS = ("sum", "u1g2", "u2g1", "upgrad", "mgda")
#: the study: 10 paired seeds, the whole grid, every rule (the digits setting's other fields)
STUDY3 = dict(seeds=tuple(range(10)))
LOSSES = ("text", "understanding", "image")  # image = the generation objective's loss
METRICS3 = (*LOSSES, "und_acc", "gen_acc_greedy", "gen_acc_sampled")
HIGHER = {"und_acc", "gen_acc_greedy", "gen_acc_sampled"}
BASELINE = "sum"
#: the metrics a rule's report lines name, in their order
_LABELS = (("text", "text loss"), ("understanding", "understanding loss"), ("image", "generation loss"),
           ("und_acc", "understanding accuracy"), ("gen_acc_sampled", "generation accuracy (sampled)"))


def summarize3(runs) -> dict[str, dict]:
    """method -> seeds, per-seed final metrics, their means (over finite values) and the diverged seeds."""
    by: dict[str, list] = {}
    for run in runs:
        by.setdefault(run.rule, []).append(run)
    out = {}
    for name in [m for m in METHODS if m in by] + [m for m in by if m not in METHODS]:
        rs = sorted(by[name], key=lambda r: r.seed)
        per_seed = {m: {r.seed: r.final[m] for r in rs} for m in METRICS3}
        out[name] = {"seeds": [r.seed for r in rs], "per_seed": per_seed,
                     "mean": {m: _mean(per_seed[m].values()) for m in METRICS3},
                     "diverged": [r.seed for r in rs if r.diverged], "seconds": sum(r.seconds for r in rs)}
    return out


def _mean(values) -> float:
    xs = [v for v in values if math.isfinite(v)]
    return statistics.fmean(xs) if xs else math.nan


def _paired(a: dict, b: dict, level: float = 0.95, higher: bool = False) -> dict | None:
    """Interval of a - b over the seeds where both are finite (None with no such seed)."""
    diffs = [a[k] - b[k] for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    return _iv_dict(diffs, higher, level) if diffs else None


def _scalarized(s: dict, weights: tuple[float, float]) -> dict:
    u, g = weights
    p = s["per_seed"]
    return {k: p["text"][k] + u * p["understanding"][k] + g * p["image"][k] for k in p["text"]}


def best_point(summary: dict) -> str | None:
    """The grid point run here with the lowest mean S_P at the most of the grid's weightings (ties:
    the grid's order): the strongest plain alternative *as these seeds show it*."""
    grid = [p for p in GRID if p in summary]
    if not grid:
        return None
    wins = dict.fromkeys(grid, 0)
    for w in GRID.values():
        wins[min(grid, key=lambda p: _mean(_scalarized(summary[p], w).values()))] += 1
    return max(grid, key=lambda p: wins[p])


def compare3(summary: dict, versus: str | None = None) -> dict[str, dict]:
    """method -> {vs_sum_<metric>: interval, at_grid: {point: {"simultaneous", "single"}},
    versus: {"point", "named", "at": {weighting: simultaneous interval}, <metric>: interval}}; a grid
    point's row: beaten_at_own_weights_by (the grid points simultaneously below it at its weights).

    ``versus``: one grid point named in advance, against which every rule is compared at *every*
    weighting of the grid (16, simultaneous) and on the five metrics; None: :func:`best_point`,
    chosen on these seeds (``named`` False: exploratory, it favours the grid)."""
    grid = [p for p in GRID if p in summary]
    level = 1.0 - 0.05 / max(len(grid), 1)
    named = versus is not None
    if named and (versus not in GRID or versus not in summary):
        raise ValueError(f"versus: expected a grid point among the methods run, got {versus!r}")
    versus = versus if named else best_point(summary)
    all_level = 1.0 - 0.05 / len(GRID)  # versus: simultaneous over every weighting of the grid
    out: dict[str, dict] = {}
    for name, s in summary.items():
        row: dict = {}
        if name in GRID:  # the other grid points below this one at its own weights: it is not the best way to them
            w = GRID[name]
            row["beaten_at_own_weights_by"] = [
                q for q in grid if q != name and (_paired(_scalarized(summary[q], w), _scalarized(s, w), level) or {})
                .get("word") == "better"]
        if BASELINE in summary and name != BASELINE:
            base = summary[BASELINE]["per_seed"]
            for m in METRICS3:
                d = _paired(s["per_seed"][m], base[m], higher=m in HIGHER)
                if d is not None:
                    row[f"vs_sum_{m}"] = d
        if name not in GRID and grid:
            at = {}
            for p in grid:
                mine, theirs = _scalarized(s, GRID[p]), _scalarized(summary[p], GRID[p])
                single, simultaneous = _paired(mine, theirs), _paired(mine, theirs, level)
                if single is not None:
                    at[p] = {"single": single, "simultaneous": simultaneous}
            row["at_grid"] = at
            row["simultaneous_level"] = level
        if name not in GRID and versus is not None:
            v = summary[versus]
            row["versus"] = {"point": versus, "named": named, "level": all_level,
                             "at": {p: _paired(_scalarized(s, w), _scalarized(v, w), all_level) for p, w in GRID.items()},
                             **{m: _paired(s["per_seed"][m], v["per_seed"][m], higher=m in HIGHER) for m in METRICS3}}
        out[name] = row
    return out


def power3(comparison: dict) -> list[str]:
    """Whether this run can tell a weight of 2 from 1 on each image-side objective (its own intervals)."""
    lines = []
    for point, metric, label in (("u1g2", "image", "generation loss"), ("u2g1", "understanding", "understanding loss")):
        d = comparison.get(point, {}).get(f"vs_sum_{metric}")
        if d is None:
            lines.append(f"Power: not checked for {label}; it needs '{BASELINE}' and '{point}' among the methods.")
            continue
        sees = d["word"] != "no detectable difference"
        lines.append(f"Power: {point} minus {BASELINE}, paired {label} {_fmt(d)} over {d['n']} seeds: this run "
                     + ("can tell a weight of 2 from 1 there." if sees else
                        "cannot tell a weight of 2 from 1 there, so its 'no detectable difference' verdicts say little."))
    return lines


def _fmt(d: dict | None, pct: bool = False) -> str:
    if not d:
        return "-"
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(d['mean'])} (n=1)" if d["n"] < 2 else f"{f(d['mean'])} [{f(d['low'])}, {f(d['high'])}]"


def format3(summary: dict, comparison: dict) -> list[str]:
    """The means table, the rules against vanilla, and the rules at the grid's own weights."""
    head = (f"{'method':<12} {'text':>6} {'und':>6} {'gen':>6} {'und%':>5} {'gen%g':>5} {'gen%s':>5}  "
            f"{'d gen vs sum':<26} {'d und vs sum':<26} {'d text vs sum':<26}")
    lines = ["Held-out losses (nats/token), understanding and generation accuracy (%), paired 95% intervals:",
             head, "-" * len(head)]
    for name, s in summary.items():
        m, c = s["mean"], comparison.get(name, {})
        lines.append(f"{name:<12} {m['text']:>6.3f} {m['understanding']:>6.3f} {m['image']:>6.3f} {100 * m['und_acc']:>5.1f} "
                     f"{100 * m['gen_acc_greedy']:>5.1f} {100 * m['gen_acc_sampled']:>5.1f}  "
                     f"{_fmt(c.get('vs_sum_image')):<26} {_fmt(c.get('vs_sum_understanding')):<26} "
                     f"{_fmt(c.get('vs_sum_text')):<26}" + (f"  diverged: seeds {s['diverged']}" if s["diverged"] else ""))
    for name, c in comparison.items():
        if name in GRID or name not in summary:
            continue
        parts = [f"{label} {_fmt(c[f'vs_sum_{m}'], pct=m in HIGHER)} ({c[f'vs_sum_{m}']['word']})"
                 for m, label in _LABELS if f"vs_sum_{m}" in c]
        if parts:
            lines.append(f"{name} vs vanilla: " + ", ".join(parts) + ".")
        at = c.get("at_grid", {})
        if not at:
            continue
        beats = [p + (f" (which {', '.join(by)} beat too)" if (by := comparison[p].get("beaten_at_own_weights_by")) else "")
                 for p, d in at.items() if d["simultaneous"]["word"] == "better"]
        single = {w: sum(d["single"]["word"] == w for d in at.values()) for w in ("better", "worse")}
        best = min(at, key=lambda p: at[p]["single"]["mean"])
        lines.append(f"{name} at each fixed weighting's own objective ({len(at)} points, simultaneous "
                     f"{c['simultaneous_level']:.2%} intervals): "
                     + (f"BETTER than {', '.join(beats)}" if beats else "better than none")
                     + f"; at 95 % each: better than {single['better']}, worse than {single['worse']}; best showing: at {best} "
                     f"{_fmt(at[best]['single'])} (simultaneous {_fmt(at[best]['simultaneous'])}).")
        if "versus" in c:
            lines.append(_versus_line(name, c["versus"]))
    return lines


def _versus_line(name: str, v: dict) -> str:
    words = {w: [p for p, d in v["at"].items() if d is not None and d["word"] == w] for w in ("better", "worse")}
    how = "named in advance" if v["named"] else "the grid's best point on these seeds: exploratory, it favours the grid"
    parts = [f"{label} {_fmt(v[m], pct=m in HIGHER)} ({v[m]['word']})" for m, label in _LABELS if v.get(m) is not None]
    return (f"{name} against {v['point']} ({how}): " + ", ".join(parts) + f"; at all {len(v['at'])} weightings "
            f"(simultaneous {v['level']:.2%}): better at {', '.join(words['better']) or 'none'}, worse at "
            f"{', '.join(words['worse']) or 'none'}.")


def run_three(cfg: DigitsConfig, methods, out_dir: str, echo=print, versus: str | None = None) -> dict:
    """Tuning and every (method, seed) run; its summary, comparisons and the report lines."""
    say = (lambda line: echo(f"[three] {line}")) if echo else None
    runs_dir = os.path.join(out_dir, "runs")
    setup = prepare(cfg)
    cfg, tuning = tuned(setup, cfg, runs_dir, say, cell=run_cell3, losses=LOSSES)
    cells = [(name, seed) for seed in cfg.seeds for name in methods]
    runs = run_cells(setup, prepare, run_cell3, cfg, cells, runs_dir, cell_kwargs=dict(echo=say),
                     quiet_kwargs=dict(echo=None), echo=say, line=cell_line3)
    summary = summarize3(runs)
    comparison = compare3(summary, versus)
    return {"config": dataclasses.asdict(cfg), "methods": list(methods), "base": setup.base_info, "tuning": tuning,
            "timings": setup.timings, "summary": summary, "comparison": comparison, "power": power3(comparison),
            "report": format3(summary, comparison),
            "runs": [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("records", "greedy_images", "sampled_images")}
                     for r in runs]}


def check_methods(names) -> tuple[str, ...]:
    """`names` if each is a method of this study (:data:`~.three.METHODS`), else ValueError naming them."""
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ValueError(f"rules: unknown method(s) {', '.join(map(repr, bad)) or '(none given)'} for --objectives 3; "
                         f"expected names from {', '.join(METHODS)}")
    return tuple(names)



def run_three_demo(cfg: DigitsConfig, methods, out_dir: str, echo=print, versus: str | None = None) -> dict:
    """:func:`run_three` into ``out_dir`` (``results.json``, ``three.png``, the per-run files under ``runs/``), with the
    machine and load before and after; prints the power lines first, then the report and the time."""
    import time

    from ..report import _finite, write_json
    from .output import machine
    from .plots import plot_three

    t0 = time.perf_counter()
    start = machine()
    os.makedirs(out_dir, exist_ok=True)
    echo(f"Digits study, three objectives, into {out_dir}: {len(methods)} methods x {len(cfg.seeds)} seeds; machine "
         f"{start['cpu']} ({start['cpu_build']} build, {start['cpu_count']} cores), load average "
         f"{start['load_avg'][0]:.2f}, {start['date_utc']}")
    doc = run_three(cfg, methods, out_dir, echo, versus)
    doc.update(machine_start=start, machine_end=machine(), total_s=time.perf_counter() - t0)
    write_json(_finite(doc), os.path.join(out_dir, "results.json"))
    plot_three(doc["summary"], GRID, os.path.join(out_dir, "three.png"),
               f"three objectives, means over seeds {list(cfg.seeds)}")
    echo("")
    echo(f"== three objectives: lr {doc['config']['lr']:g}, seeds {list(cfg.seeds)}")
    for line in (*doc["power"], *doc["report"]):
        echo(line)
    echo(f"Wrote results.json and three.png to {out_dir}. Time: {doc['total_s']:.1f}s on {start['cpu']} ({start['cpu_count']} cores); "
         f"load average {start['load_avg'][0]:.2f} at the start, {doc['machine_end']['load_avg'][0]:.2f} at the end.")
    return doc
