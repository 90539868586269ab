"""The training layer: :class:`ParetoLoRA` (:mod:`.two_objective`), :class:`StepReport`
(:mod:`.report`), the per-modality losses (:mod:`.losses`), diagnostics (:mod:`.diagnostics`),
the balancers MIMO, GradNorm (:mod:`.balancers`), the CoMMIT learning-rate scheduler (:mod:`.schedulers`)
and the Hugging Face Trainer (:mod:`.hf_trainer`, imported on demand: it needs transformers).
"""

from . import balancers, diagnostics, schedulers
from .losses import modality_losses, modality_token_counts
from .report import StepReport
from .two_objective import ParetoLoRA

__all__ = ["ParetoLoRA", "StepReport", "balancers", "diagnostics", "schedulers", "modality_losses",
           "modality_token_counts"]
