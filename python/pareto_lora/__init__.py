"""pareto-lora: modality-balanced gradient integration for LoRA fine-tuning of multimodal models.

    import pareto_lora
    res = pareto_lora.integrate(g_text, g_image, offsets, rule="pareto_lora", tau=0.5)
    res.out, res.cases, res.cosine, res.ratio

The package in layers; each imports only the layers below it (tests/test_architecture.py):

    app/          the pareto-lora command, the demo, benchmarks, install facts
    training/     ParetoLoRA, StepReport, modality losses, diagnostics, the HF Trainer, balancers (MIMO, GradNorm),
                  schedulers (CoMMIT)
    distributed/  the sync contract: single process, DDP hook, FSDP2, sharded_integrate
    flat/         parameters -> layout (units, groups, buckets), flat buffers, the flat-buffer step
    ops.py        the public op functions (integrate, segment_stats, rule_coefficients, combine)
    backends/     the registry: cpp (compiled C++/CUDA), triton, reference
    reference.py  the float64 oracle
    archs/        model architectures (Chameleon, Emu3, Janus, LLaVA): layers, image tokens, losses
    checks.py     argument validation of tensors
    result.py, rules.py   IntegrationResult; Case, the rule table, RuleSpec
    args.py       validation of scalar arguments (flags, numbers), shared by every layer

This file only re-exports. See README.md for the training-loop integration and the op reference.
"""

from . import archs, distributed, reference, rules
from .backends import available_backends
from .ops import combine, integrate, rule_coefficients, segment_stats
from .result import IntegrationResult
from .rules import RULES, Case, RuleSpec
from .training import ParetoLoRA, StepReport, balancers, diagnostics, modality_losses, modality_token_counts

__version__ = "0.1.0"

__all__ = [
    "Case",
    "archs",
    "IntegrationResult",
    "ParetoLoRA",
    "ParetoLoRATrainer",
    "RULES",
    "RuleSpec",
    "StepReport",
    "available_backends",
    "balancers",
    "combine",
    "diagnostics",
    "distributed",
    "integrate",
    "modality_losses",
    "modality_token_counts",
    "reference",
    "rule_coefficients",
    "rules",
    "segment_stats",
]


def __getattr__(name: str):
    # The HF Trainer integration imports transformers: load it only when asked for.
    if name == "ParetoLoRATrainer":
        from .training.hf_trainer import ParetoLoRATrainer

        return ParetoLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
