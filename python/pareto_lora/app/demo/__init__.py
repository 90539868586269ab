"""`pareto-lora demo` / `pareto-lora demo --full`: does Pareto LoRA move the text/image trade-off
beyond what plain loss reweighting does?

A tiny LlamaForCausalLM over a shared text + discrete-image-token vocabulary is pre-trained on
one synthetic interleaved world until it solves that world's images (cached on disk: base.py),
then LoRA-fine-tuned on another world once per method and seed: the brackets text-only and
image-only, the reweighting curve ``L_text + w*L_image``, the kernel rules and MIMO, GradNorm,
CoMMIT (methods.py). Held-out losses are reported as excess over the world's exact entropy floors
(floors.py) with image cell accuracy; each method is placed against the reweighting curve at
equal text excess with paired 95% intervals (report.py, verdict.py; the statistics: pareto_lora.study's
stats.py and frontier.py, which users run on their own data).
``--optimizer sgd`` runs the study under plain SGD with the learning rate tuned per method
(sgd.py); ``--arch chameleon`` swaps the Llama for a small random Chameleon (model.py);
``--base-per-seed`` starts fine-tuning seed s from a base pre-trained with seed s (experiment.py).
Every study prints and writes the same outputs (output.py).
"""

from __future__ import annotations

import os
import time

from .experiment import DemoConfig, run_experiment
from .methods import FAMILY, describe_methods
from .model import ModelConfig

__all__ = ["DemoConfig", "ModelConfig", "QUICK", "DEFAULT", "FULL", "run_demo", "describe_setup"]

_RULES = ("pareto_lora", "pareto_lora_all", "pareto_lora_m0.1", "pareto_lora_ema0.9", "pareto_lora_norm", "rescale_only",
          "pareto_only", "mgda", "mmpareto", "mimo", "gradnorm", "commit", *FAMILY)
_VARIANTS = ("pareto_lora_all", "pareto_lora_m0.1", "pareto_lora_ema0.9", "pareto_lora_norm")
#: ``--quick``: the CI smoke test (well under 30 s on 2 CPU cores): tiny, but every code path.
QUICK = dict(seeds=(0, 1), steps=12, pretrain_steps=40, eval_every=6, eval_batches=1, batch_size=16,
             eval_batch_size=32, model=ModelConfig(num_layers=4, lora_rank=4), cache_dir=None,
             rules=("text_only", "image_only", "sum", "w3", *(r for r in _RULES if r not in _VARIANTS)))
#: the default ``pareto-lora demo``: a reduced study with the power to tell a loss weight of 2 from 1
#: (5 paired seeds: -0.104 [-0.171, -0.037] on 2026-12-07, where 3 seeds with the brackets gave
#: [-0.295, +0.083]): vanilla, w = 2 and the paper's rule, no brackets (the power check measures the
#: run's sensitivity instead), 15 runs spread over the cores (parallel.py). Sized for 5 minutes on a
#: 2-core 2 GHz Zen 1 (issue 25): the base ships with the package (base.py), the plain runs take one
#: backward, as plain reweighting costs a user (methods.py), and the runs stop at step 60 of the
#: study's 80 (AdamW has no schedule: step 60 of an 80-step run, bit for bit); held-out losses at
#: steps 0, 30 and 60. docs/study.md has the measurements.
DEFAULT = dict(seeds=(0, 1, 2, 3, 4), rules=("sum", "w2", "pareto_lora"), plain_backward="one", steps=60,
               eval_every=30)
#: ``--full``: the whole study (>= 5 paired seeds, the full curve, every rule and balancer).
FULL = dict(seeds=(0, 1, 2, 3, 4), rules=("text_only", "image_only", "sum", "w2", "w3", "w4", "w6", "w8", *_RULES))


_ARCH_NAMES = {"llama": "LlamaForCausalLM",
               "chameleon": "ChameleonForConditionalGeneration (qk-norm; image codes named IMGIMG* in its vocabulary "
                            "map; losses from its unmasked LM head)"}
_OPT_NAMES = {"adamw": "AdamW", "sgd": "SGD (no momentum)"}


def describe_setup(cfg: DemoConfig) -> str:
    """What the demo is about to do, in words (printed first, and kept in docs)."""
    m = cfg.model
    source = "pre-trained in this process" if cfg.pretrain else "shipped with the package (else pre-trained in this process)"
    return "\n".join([
        f"Model: {_ARCH_NAMES[m.arch]}, random init (nothing downloaded): {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} heads; one vocabulary of special + text-word + discrete image-code tokens.",
        f"Base model: {source} (full parameters, at most {cfg.pretrain_steps} steps) on a synthetic "
        f"pre-training world (world seed {cfg.pretrain_world_seed}) until its image cell accuracy there reaches "
        f"{cfg.pretrain_target_acc:.0%}, then frozen and cached on disk ("
        f"{'one base per seed: fine-tuning seed s starts from the base pre-trained with seed s' if cfg.base_per_seed else 'one base for all seeds'}).",
        f"Fine-tuning: peft LoRA r={m.lora_rank} on all linear layers, {_OPT_NAMES[cfg.optimizer]} lr {cfg.lr}, {cfg.steps} steps x "
        f"batch {cfg.batch_size}, on a different world (seed {cfg.finetune_world_seed}): new caption templates, "
        f"shape masks and colour palettes; image-token noise {cfg.image_noise:.0%}.",
        f"Objectives: text loss and image loss = mean next-token cross-entropy over text / image targets; "
        f"vanilla LoRA ('sum') steps on g_text + g_image"
        f"{', in one backward of the (weighted) loss for vanilla and the curve' if cfg.plain_backward == 'one' else ''}.",
        f"Integration: ParetoLoRA(rule, tau={cfg.tau}, num_groups={cfg.num_groups}, modulate={cfg.modulate!r}); "
        f"methods {', '.join(cfg.rules)}; seeds {', '.join(map(str, cfg.seeds))} (same data and LoRA init per seed). "
        f"text_only/image_only = brackets, w<k> = L_text + k*L_image (sum = w1): the reweighting curve.",
        *([f"Other balancers: {d}."] if (d := describe_methods(cfg.rules)) else []),
    ])


def run_demo(cfg: DemoConfig, out_dir: str, progress: bool = True, echo=print, resume: bool = True) -> dict:
    """Runs the experiment, writes results.json, runs/*.json and the PNGs into `out_dir`, prints the findings."""
    from .output import write_study

    cfg.check()
    os.makedirs(out_dir, exist_ok=True)
    echo(describe_setup(cfg))
    echo(f"Output folder: {out_dir}")
    t0 = time.perf_counter()
    result = run_experiment(cfg, progress=progress, runs_dir=os.path.join(out_dir, "runs") if resume else None)
    return write_study(result, out_dir, t0, echo)
