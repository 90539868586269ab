"""`pareto-lora demo`: modality imbalance and what each integration rule does about it.

A tiny LlamaForCausalLM over a shared text + discrete-image-token vocabulary is pre-trained for
a few seconds on one synthetic interleaved world, then LoRA-fine-tuned on another world once per
method (the kernel rules ``pareto_lora.RULES`` and MIMO, GradNorm, CoMMIT: methods.py) and seed, and evaluated on held-out sequences. See data.py for the
task, model.py for the model and pre-training, experiment.py for the runs, report.py for the
numbers and the verdict, plots.py for the figures.
May import: its own modules and :mod:`pareto_lora.app.env`.
"""

from __future__ import annotations

import os
import platform
import time

from .experiment import DemoConfig, run_experiment
from .methods import describe_methods
from .model import ModelConfig

__all__ = ["DemoConfig", "ModelConfig", "QUICK", "run_demo", "describe_setup"]

#: ``--quick``: the CI smoke test (well under 30 s on 2 CPU cores): tiny, but every code path.
QUICK = dict(seeds=(0, 1), steps=12, pretrain_steps=40, eval_every=6, eval_batches=1, batch_size=16,
             model=ModelConfig(num_layers=4, lora_rank=4))


def describe_setup(cfg: DemoConfig) -> str:
    """What the demo is about to do, in words (printed first, and kept in docs)."""
    m = cfg.model
    return "\n".join([
        f"Model: LlamaForCausalLM, random init (nothing downloaded): {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} heads; one vocabulary of special + text-word + discrete image-code tokens.",
        f"Base model: pre-trained in-process for {cfg.pretrain_steps} full-parameter steps on a synthetic "
        f"pre-training world (world seed {cfg.pretrain_world_seed}), then frozen.",
        f"Fine-tuning: peft LoRA r={m.lora_rank} on all linear layers, AdamW lr {cfg.lr}, {cfg.steps} steps x "
        f"batch {cfg.batch_size}, on a different world (seed {cfg.finetune_world_seed}): new caption templates, "
        f"shape masks and colour palettes; image-token noise {cfg.image_noise:.0%}.",
        f"Objectives: text loss and image loss = mean next-token cross-entropy over text / image targets; "
        f"vanilla LoRA ('sum') steps on g_text + g_image.",
        f"Integration: ParetoLoRA(rule, tau={cfg.tau}, num_groups={cfg.num_groups}, modulate={cfg.modulate!r}); "
        f"rules {', '.join(cfg.rules)}; seeds {', '.join(map(str, cfg.seeds))} (same data and LoRA init per seed).",
        *([f"Other balancers: {d}."] if (d := describe_methods(cfg.rules)) else []),
    ])


def _environment(cfg: DemoConfig) -> dict:
    import torch

    from ..env import package_versions

    return {"python": platform.python_version(), "platform": platform.platform(), "device": cfg.device,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), **package_versions()}


def run_demo(cfg: DemoConfig, out_dir: str, progress: bool = True, echo=print) -> dict:
    """Runs the experiment, writes results.json and the PNGs into `out_dir`, prints the findings."""
    from . import plots, report

    cfg.check()
    os.makedirs(out_dir, exist_ok=True)
    echo(describe_setup(cfg))
    echo(f"Output folder: {out_dir}")
    t0 = time.perf_counter()
    result = run_experiment(cfg, progress=progress)
    summary = report.summarize(result["runs"])
    verdict = report.verdict(summary)
    files = plots.write_all(result["runs"], out_dir)
    files["results"] = os.path.join(out_dir, "results.json")
    result["timings"]["total_s"] = time.perf_counter() - t0
    doc = report.results_document(result, summary, verdict, _environment(cfg), files)
    report.write_json(doc, files["results"])
    echo("")
    echo("Final held-out loss per rule (mean ± std over seeds; d = paired change vs vanilla 'sum', < 0 is better):")
    echo(report.format_table(summary))
    echo("")
    for line in verdict:
        echo(line)
    echo("")
    echo(f"Wrote {len(files)} files to {out_dir}: " + ", ".join(os.path.basename(p) for p in files.values()))
    echo(f"Time: {result['timings']['total_s']:.1f}s (pre-training {result['timings']['pretrain_s']:.1f}s, "
         f"fine-tuning {result['timings']['finetune_s']:.1f}s)")
    return doc

