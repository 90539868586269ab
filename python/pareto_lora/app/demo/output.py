"""What every study writes and prints once its runs exist: table, verdict, figures, results.json.

Shared by the AdamW study (``pareto-lora demo``) and the SGD study (sgd.py), so both report with
the same paired intervals (pareto_lora.study.stats), verdict words (verdict.py) and figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

__all__ = ["environment", "result_lines", "write_study", "save_json", "load_json"]

# Every JSON file the demo writes is strict JSON (jq, JavaScript and most readers reject NaN and
# Infinity): a non-finite number is written as null. In a per-run file null in a number's place
# means "not finite" (e.g. the gradient ratio of a text_only run, whose image gradient is zero);
# load_json reads it back as NaN except under the keys that hold a genuine None.
_GENUINE_NONE = frozenset({"optimizer", "lr", "optimizer_warning", "diverged_step", "balancer"})


def save_json(doc: dict, path: str) -> None:
    """Write `doc` as strict JSON (non-finite numbers as null), atomically: a killed run never
    leaves a half-written file. Objects JSON cannot hold are written as null too."""
    from .report import _finite

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(doc), f, allow_nan=False, default=lambda x: None)
    os.replace(tmp, path)


def _nan_for_null(x, key=None):
    if key in _GENUINE_NONE:
        return x
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _nan_for_null(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_for_null(v) for v in x]
    return x


def load_json(path: str) -> dict:
    """A file of :func:`save_json`, with null read back as NaN (see the note above)."""
    with open(path, encoding="utf-8") as f:
        return _nan_for_null(json.load(f))


def environment(cfg) -> dict:
    """Python, platform, device, threads and package versions of this process."""
    import torch

    from ..env import machine, package_versions

    return {"python": platform.python_version(), "platform": platform.platform(), "machine": machine(),
            "device": cfg.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            **package_versions()}


def result_lines(check: dict, summary: dict, comparison: dict, lines: list[str]) -> list[str]:
    """The printed results: the power check first (verdict.power: can this run see w=2 against w=1
    at all? issue 25), then the table, then the verdict `lines`."""
    from . import report

    return [check["line"],
            "Final held-out excess loss (nats/token over the exact floor, mean over seeds) and image cell accuracy;",
            "paired differences with 95% t-intervals (< 0 is better):",
            report.format_table(summary, comparison), "", *lines]


def write_study(result: dict, out_dir: str, t0: float, echo=print, extra: dict | None = None,
                notes: list[str] | tuple = ()) -> dict:
    """Summary, paired comparisons, verdict, figures and results.json of `result` (run_experiment's
    layout) into `out_dir`; prints the table and the verdict (after `notes`). `extra` is merged into
    the JSON document (the SGD study's tuning table)."""
    from . import plots, plots_tradeoff, report
    from .verdict import power, verdict

    summary = report.summarize(result["runs"])
    comparison = report.compare(summary)
    lines = [*notes, *verdict(result, summary, comparison)]
    check = power(comparison)
    files = {**plots.write_all(result["runs"], out_dir), **plots_tradeoff.write_all(summary, comparison, out_dir)}
    files["results"] = os.path.join(out_dir, "results.json")
    result["timings"]["total_s"] = time.perf_counter() - t0
    doc = report.results_document(result, summary, comparison, lines, environment(result["config"]), files)
    doc["power"] = report._finite(check)
    doc.update(report._finite(extra or {}))
    report.write_json(doc, files["results"])
    echo("")
    for line in result_lines(check, summary, comparison, lines):
        echo(line)
    echo("")
    echo(f"Wrote {len(files)} files to {out_dir}: " + ", ".join(os.path.basename(p) for p in files.values()))
    t, base = result["timings"], result["base"]
    echo(f"Time: {t['total_s']:.1f}s (pre-training {t['pretrain_s']:.1f}s"
         f"{', base shipped with the package' if base.get('shipped') else ', base from cache' if base.get('cached') else ''}"
         f", fine-tuning {t['finetune_s']:.1f}s"
         f"{f' of run time in {w} processes' if (w := t.get('workers', 1)) > 1 else ''}"
         f"{f'; {n} runs loaded from {out_dir}' if (n := t['runs_loaded']) else ''})")
    echo(f"Machine: {doc['environment']['machine']}")
    return doc
