"""`pareto-lora demo --optimizer sgd`: the study under plain SGD, the learning rate tuned per method.

Under AdamW a rule that lengthens the gradient (Pareto LoRA's rescale branch) changes little,
since Adam normalises each coordinate's step. Under SGD the step is the learning rate times the
integrated gradient, so a longer gradient is also a larger step: at one shared learning rate a
rule's effect and a step-size change are confounded. Here every method gets its own learning rate:

1. **Tuning** (fixed in advance): each method runs once per learning rate of ``lrs`` on the
   tuning seed ``TUNE_SEED`` (its own LoRA init and batch order) and is evaluated on validation
   batches drawn with ``VALIDATION_SEED``; no reported seed and no reported held-out batch is
   used. The criterion is the final validation **text excess + image excess** (nats per token,
   the two modalities weighted equally, the same for every method); a run that diverges scores
   +inf. Each method keeps the learning rate with the lowest criterion; one at the edge of the
   grid is flagged.
2. **Reported runs**: each method at its tuned learning rate on the study's seeds, then the same
   summary, paired 95% intervals, reweighting curve and verdict words as the AdamW study
   (output.py). Runs are stored under ``OUT/tune/`` and ``OUT/runs/`` (resumable).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

from .experiment import DemoConfig, prepare, run_cell

__all__ = ["SGD_METHODS", "SGD_LRS", "TUNE_SEED", "VALIDATION_SEED", "CONTRASTS", "criterion", "tune", "format_tuning",
           "contrast_lines", "run_sgd_study"]

#: vanilla, the reweighting curve (w = 1, 2, 4), Pareto LoRA with and without the norm-preserving
#: mode, its rescale branch alone, and MGDA (a norm-shrinking rule)
SGD_METHODS = ("sum", "w2", "w4", "pareto_lora", "pareto_lora_norm", "rescale_only", "mgda")
#: log-spaced by 2; vanilla's best (probed once on the tuning seed) lies inside
SGD_LRS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
TUNE_SEED = 100
VALIDATION_SEED = 40_100
#: paired contrasts printed besides "vs vanilla": (method, reference) -- the norm-preserving
#: mode's own effect, each at its tuned learning rate
CONTRASTS = (("pareto_lora_norm", "pareto_lora"),)


def criterion(run) -> float:
    """Final validation text excess + image excess; +inf when the run diverged."""
    if run.diverged:
        return math.inf
    f = run.final
    return f["text_excess"] + f["image_excess"]


def tune(setup, cfg: DemoConfig, methods, lrs, runs_dir: str | None = None, progress: bool = True) -> dict[str, dict]:
    """method -> {"lr": chosen, "edge": chosen at an end of the grid, "grid": [{lr, text_excess,
    image_excess, criterion, diverged, warning}]}: one run per learning rate on TUNE_SEED."""
    out = {}
    for method in methods:
        grid = []
        for lr in lrs:
            run = run_cell(setup, dataclasses.replace(cfg, lr=lr), method, TUNE_SEED, runs_dir, progress,
                           eval_seed=VALIDATION_SEED)
            f = run.final
            grid.append({"lr": lr, "text_excess": f["text_excess"], "image_excess": f["image_excess"],
                         "criterion": criterion(run), "diverged": run.diverged, "warning": run.optimizer_warning})
        finite = [g for g in grid if math.isfinite(g["criterion"])]
        best = min(finite, key=lambda g: g["criterion"]) if finite else None
        lr = best["lr"] if best else None
        out[method] = {"lr": lr, "edge": len(lrs) > 1 and lr in (min(lrs), max(lrs)), "grid": grid}
    return out


def format_tuning(tuning: dict[str, dict]) -> str:
    """The tuning table: validation text+image excess per method and learning rate (* = chosen)."""
    lrs = [g["lr"] for g in next(iter(tuning.values()))["grid"]]
    head = f"{'method':<18}" + "".join(f"{f'lr {lr:g}':>12}" for lr in lrs) + "   chosen"
    lines = [head, "-" * len(head)]
    for method, t in tuning.items():
        cells = []
        for g in t["grid"]:
            val = "diverged" if not math.isfinite(g["criterion"]) else f"{g['criterion']:.3f}"
            cells.append(f"{val + ('*' if g['lr'] == t['lr'] else ''):>12}")
        chosen = "none (all diverged)" if t["lr"] is None else f"{t['lr']:g}" + (" (grid edge)" if t["edge"] else "")
        lines.append(f"{method:<18}" + "".join(cells) + f"   {chosen}")
    return "\n".join(lines)


def contrast_lines(summary: dict, pairs=CONTRASTS) -> list[str]:
    """'a vs b' per pair run on common seeds: paired text / image excess differences, 95% intervals, words."""
    from ...study.stats import paired_interval, word

    lines = []
    for a, b in pairs:
        if a not in summary or b not in summary:
            continue
        sa, sb = summary[a]["per_seed"], summary[b]["per_seed"]
        seeds = [k for k in sa["text_excess"] if k in sb["text_excess"]]
        if not seeds:
            continue
        parts = []
        for m in ("image_excess", "text_excess"):
            iv = paired_interval([sa[m][k] - sb[m][k] for k in seeds])
            parts.append(f"{m.replace('_', ' ')} {iv.format()} ({word(iv)})")
        lines.append(f"{a} vs {b} (paired over {len(seeds)} seeds): " + ", ".join(parts) + ".")
    return lines


def _notes(tuning: dict[str, dict], lrs) -> list[str]:
    notes = [f"SGD study: learning rate tuned per method over {', '.join(f'{lr:g}' for lr in lrs)} on tuning seed "
             f"{TUNE_SEED} (validation batches seed {VALIDATION_SEED}), criterion final validation text + image excess; "
             "tuned: " + ", ".join(f"{m} {t['lr']:g}" for m, t in tuning.items() if t["lr"] is not None) + "."]
    edge = [m for m, t in tuning.items() if t["edge"]]
    if edge:
        notes.append(f"At the edge of the grid (the best learning rate may lie beyond it): {', '.join(edge)}.")
    dead = [m for m, t in tuning.items() if t["lr"] is None]
    if dead:
        notes.append(f"Diverged at every learning rate, not reported: {', '.join(dead)}.")
    warned = sorted({m for m, t in tuning.items() for g in t["grid"] if g["warning"]})
    notes.append("pareto_lora's check_optimizer warned (norm-increasing rule under SGD) for: "
                 + (", ".join(warned) if warned else "none") + ".")
    return notes


def run_sgd_study(cfg: DemoConfig, out_dir: str, lrs=SGD_LRS, progress: bool = True, echo=print) -> dict:
    """Tune, run the tuned methods on ``cfg.seeds``, write and print everything (output.py)."""
    from . import describe_setup
    from .output import write_study

    cfg = dataclasses.replace(cfg, optimizer="sgd")
    cfg.check()
    lrs = tuple(sorted(set(lrs)))
    if not lrs or not all(lr > 0 and math.isfinite(lr) for lr in lrs):
        raise ValueError(f"lrs: expected one or more finite learning rates > 0, got {lrs!r}")
    os.makedirs(out_dir, exist_ok=True)
    echo(describe_setup(dataclasses.replace(cfg, lr=float("nan"))).replace("lr nan", "lr tuned per method"))
    echo(f"Learning rates: {', '.join(f'{lr:g}' for lr in lrs)}; tuning seed {TUNE_SEED}; output folder: {out_dir}")
    t0 = time.perf_counter()
    setup = prepare(cfg, progress)
    tuning = tune(setup, cfg, cfg.rules, lrs, os.path.join(out_dir, "tune"), progress)
    echo("")
    echo("Tuning (validation text + image excess at the last step; * = chosen):")
    echo(format_tuning(tuning))
    runs, diverged = [], []
    for seed in cfg.seeds:
        for method, t in tuning.items():
            if t["lr"] is None:
                continue
            run = run_cell(setup, dataclasses.replace(cfg, lr=t["lr"]), method, seed, os.path.join(out_dir, "runs"), progress)
            (diverged if run.diverged else runs).append(run)
    notes = _notes(tuning, lrs)
    if diverged:  # a tuned run that diverged on a reported seed: its method is left out of the statistics
        bad = sorted({r.rule for r in diverged})
        notes.append(f"Diverged at the tuned learning rate on a reported seed, left out: {', '.join(bad)}.")
        runs = [r for r in runs if r.rule not in bad]
    from .report import summarize

    notes += contrast_lines(summarize(runs)) if runs else []
    result = setup.result(runs, cfg)
    extra = {"sgd": {"lrs": list(lrs), "tune_seed": TUNE_SEED, "validation_seed": VALIDATION_SEED,
                     "criterion": "final validation text_excess + image_excess", "tuning": tuning,
                     "diverged": [dataclasses.asdict(r) | {"records": []} for r in diverged]}}
    return write_study(result, out_dir, t0, echo, extra=extra, notes=notes)
