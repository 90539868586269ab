"""pareto-lora: modality-balanced gradient integration for LoRA fine-tuning of multimodal models.

    import pareto_lora
    res = pareto_lora.integrate(g_text, g_image, offsets, rule="pareto_lora", tau=0.5)
    res.out, res.cases, res.cosine, res.ratio

See README.md for the training-loop integration (ParetoLoRA) and the op reference.
"""

from . import reference, rules
from .ops import (
    IntegrationResult,
    available_backends,
    combine,
    integrate,
    rule_coefficients,
    segment_stats,
)
from .rules import RULES, Case
from . import diagnostics, distributed
from .losses import modality_losses, modality_token_counts
from .training import ParetoLoRA, StepReport

__version__ = "0.1.0"

__all__ = [
    "Case",
    "ParetoLoRA",
    "ParetoLoRATrainer",
    "StepReport",
    "diagnostics",
    "distributed",
    "modality_losses",
    "modality_token_counts",
    "RULES",
    "IntegrationResult",
    "available_backends",
    "combine",
    "integrate",
    "reference",
    "rule_coefficients",
    "rules",
    "segment_stats",
]


def __getattr__(name: str):
    # The HF Trainer integration imports transformers: load it only when asked for.
    if name == "ParetoLoRATrainer":
        from .hf_trainer import ParetoLoRATrainer

        return ParetoLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
