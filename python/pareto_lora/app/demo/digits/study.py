"""`pareto-lora demo --world digits [--quick | --full]`: the study on real images (docs/study_digits.md).

One *setting* = one DigitsConfig: pre-train (or load) the base, tune the learning rate once for
vanilla LoRA on a separate seed and the validation split (criterion fixed in advance: final
validation text loss + image loss, the lowest wins), then every method on every paired seed, scored
on the held-out split. ``--full`` runs two settings in two processes (both cores): ``digits`` and
``digits-strong`` (the image objective at 1/32 of its scale: text-dominant gradients by orders of
magnitude, as in the paper), and the shapes world's vanilla runs for the gradient-ratio comparison.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics

from ..methods import ALL_METHODS, FAMILY
from ..model import ModelConfig
from ..parallel import run_cells
from ..verdict import power
from .experiment import LONG, DigitsConfig, cell_line, prepare, run_cell
from .report import compare, format_table, ratio_values, summarize, verdict

__all__ = ["QUICK", "DEFAULT", "FULL", "STRONG", "CODEBOOK_SIZES", "codebook_choice", "run_setting", "tune_lr",
           "tuned", "ratio_quantiles"]

_RULES = ("pareto_lora", "pareto_lora_all", "pareto_lora_m0.1", "pareto_lora_ema0.9", "pareto_lora_norm",
          "rescale_only", "pareto_only", "mgda", "mmpareto", "mimo", "gradnorm", "commit", *FAMILY)
#: ``--quick``: every code path in seconds (CI), no tuning
QUICK = dict(seeds=(0, 1), steps=4, pretrain_steps=20, gen_samples=1, lrs=(), long_factor=2, cache_dir=None,
             model=ModelConfig(num_layers=3, lora_rank=4), num_groups=3,
             rules=("text_only", "image_only", "sum", "w2", "pareto_lora", "mimo", "commit", LONG))
#: the default ``--world digits``: 3 seeds, the brackets, part of the curve and the paper's rule
DEFAULT = dict(seeds=(0, 1, 2), rules=("text_only", "image_only", "sum", "w2", "w4", "pareto_lora"))
#: ``--full``: 5 paired seeds, the whole curve, every rule, balancer and option, the long image-only run
FULL = dict(seeds=(0, 1, 2, 3, 4), rules=("text_only", "image_only", "sum", "w2", "w3", "w4", "w6", "w8", *_RULES, LONG))
#: ``--full``'s second setting: the image objective at 1/32 (the curve's weights reach 64 to span the
#: same range); under AdamW a constant scale leaves the single-objective brackets unchanged, so none here
STRONG = dict(FULL, image_scale=1 / 32, rules=("sum", "w2", "w4", "w8", "w16", "w32", "w64", *_RULES))
CODEBOOK_SIZES = (8, 16, 32, 64, 128, 256)
assert all(r in ALL_METHODS for r in _RULES)


def codebook_choice(table: list[dict]) -> int | None:
    """The protocol's codebook size: the smallest whose validation reconstruction error is at most 10 %
    of the pixel variance AND whose reconstructed validation digits the classifier names within 2
    points of the real ones (`table` rows from tokens.codebook_table, with ``real_val_acc`` added)."""
    ok = [r["size"] for r in table if r["val_rel_err"] <= 0.10 and r["val_classifier_acc"] >= r["real_val_acc"] - 0.02]
    return min(ok) if ok else None


def ratio_quantiles(values: list[float]) -> dict:
    """Quantiles (5, 25, 50, 75, 95 %) of ratios, and the share beyond 10x either way."""
    if not values:
        return {}
    xs = sorted(values)

    def q(p: float) -> float:  # linear interpolation between order statistics (q50 = the median)
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"n": len(xs), **{f"q{int(p * 100)}": q(p) for p in (0.05, 0.25, 0.5, 0.75, 0.95)},
            "share_beyond_10x": sum(1 for x in xs if x > 10 or x < 0.1) / len(xs),
            "median_abs_log10": statistics.median(abs(math.log10(x)) for x in xs)}


def tune_lr(setup, cfg: DigitsConfig, runs_dir: str | None, echo=None, *, cell=run_cell,
            losses: tuple[str, ...] = ("text", "image")) -> dict:
    """Vanilla LoRA (``sum``, run by `cell`) once per learning rate of cfg.lrs on cfg.tune_seed, scored on
    the validation split by the sum of its final `losses` (the three-objective study passes its own)."""
    rows = []
    for lr in cfg.lrs:
        run = cell(setup, dataclasses.replace(cfg, lr=lr), "sum", cfg.tune_seed, runs_dir, split="val", echo=echo)
        score = sum(run.final[m] for m in losses)
        rows.append({"lr": lr, **{f"val_{m}": run.final[m] for m in losses},
                     "score": score if math.isfinite(score) and not run.diverged else math.inf})
    best = min(rows, key=lambda r: r["score"])
    return {"rows": rows, "chosen": best["lr"], "at_edge": best["lr"] in (min(cfg.lrs), max(cfg.lrs)),
            "criterion": "final validation %s of vanilla LoRA (seed %d)" % (" + ".join(f"{m} loss" for m in losses),
                                                                           cfg.tune_seed)}


def tuned(setup, cfg: DigitsConfig, runs_dir: str | None, say=None, **tune_kwargs) -> tuple[DigitsConfig, dict | None]:
    """(`cfg` at the learning rate :func:`tune_lr` chooses, the tuning) when cfg.lrs is a grid, else (cfg, None)."""
    if not cfg.lrs:
        return cfg, None
    tuning = tune_lr(setup, cfg, runs_dir, say, **tune_kwargs)
    if say:
        say(f"learning rate chosen for vanilla LoRA: {tuning['chosen']:g}" + (" (at the grid's edge)" if tuning["at_edge"] else ""))
    return dataclasses.replace(cfg, lr=tuning["chosen"]), tuning


def run_setting(name: str, cfg: DigitsConfig, out_dir: str, echo=print) -> dict:
    """Tuning and every (method, seed) run of one setting; its summary, comparisons and verdict."""
    say = (lambda line: echo(f"[{name}] {line}")) if echo else None
    runs_dir = os.path.join(out_dir, "runs")
    setup = prepare(cfg)
    if say:
        say(f"base: {setup.base_info['steps']} pre-training steps{' (cached)' if setup.base_info['cached'] else ''}")
    cfg, tuning = tuned(setup, cfg, runs_dir, say)
    cells = [(rule, seed) for seed in cfg.seeds for rule in cfg.rules]
    runs = run_cells(setup, prepare, run_cell, cfg, cells, runs_dir, cell_kwargs=dict(echo=say),
                     quiet_kwargs=dict(echo=None), echo=say, line=lambda run: cell_line(run, cfg))
    summary = summarize(runs)
    comparison = compare(summary)
    vanilla = [v for r in runs if r.rule == "sum" for v in ratio_values(r.records)]
    samples = {r.rule: r.greedy_images for r in runs if r.seed == cfg.seeds[0]}
    sampled = {r.rule: r.sampled_images for r in runs if r.seed == cfg.seeds[0]}
    return {"name": name, "config": dataclasses.asdict(cfg), "base": setup.base_info, "tuning": tuning,
            "timings": setup.timings, "summary": summary, "comparison": comparison,
            # the first result lines (issue 25): can this setting's seeds tell w=2 from w=1 in image loss,
            # and in generation accuracy (a noisier metric, where 5 seeds may not suffice either)?
            "power": power(comparison, key="vs_sum_image", measure="image loss"),
            "power_generation": power(comparison, key="vs_sum_gen_acc_sampled", measure="generation accuracy (sampled)",
                                      consequence="its verdicts of 'no detectable difference' in generation "
                                                  "accuracy say little; they need more paired seeds"),
            "verdict": verdict(summary, comparison, setup.base_info), "table": format_table(summary, comparison),
            "vanilla_ratios": vanilla, "ratio_quantiles": ratio_quantiles(vanilla),
            "samples_greedy": samples, "samples_sampled": sampled,
            "runs": [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("records", "greedy_images",
                                                                             "sampled_images")} for r in runs]}
