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

__version__ = "0.1.0"

__all__ = [
    "Case",
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
