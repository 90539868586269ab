"""pareto-lora: modality-balanced gradient integration for LoRA fine-tuning of multimodal models.

    import pareto_lora
    res = pareto_lora.integrate(g_text, g_image, offsets, rule="pareto_lora", tau=0.5)
    res.out, res.cases, res.cosine, res.ratio

The package's layers are import-linter contracts in pyproject.toml ([tool.importlinter]; docs/architecture.md).

This file only re-exports. The documentation (docs/, mkdocs) has the training guide and the API reference.
"""

from . import archs, distributed, multi, reference, rules
from .backends import available_backends
from .ops import combine, integrate, rule_coefficients, segment_stats
from .ops_many import combine_many, gram, integrate_many
from .result import IntegrationResult
from .rules import RULES, Case, RuleSpec
from .training import MultiObjectiveLoRA, MultiStepReport, ParetoLoRA, StepReport, balancers, diagnostics, modality_losses, modality_token_counts

__version__ = "0.1.0"

__all__ = [
    "Case",
    "archs",
    "IntegrationResult",
    "MultiObjectiveLoRA",
    "MultiStepReport",
    "ParetoLoRA",
    "ParetoLoRATrainer",
    "RULES",
    "RuleSpec",
    "StepReport",
    "available_backends",
    "balancers",
    "combine",
    "combine_many",
    "diagnostics",
    "distributed",
    "integrate",
    "integrate_many",
    "gram",
    "multi",
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
