"""The training layer: :class:`ParetoLoRA` (:mod:`.two_objective`; with K objectives
:class:`MultiObjectiveLoRA`, :mod:`.multi_objective`, and its :class:`MultiStepReport`), :class:`StepReport`
(:mod:`.report`), the per-modality losses (:mod:`.losses`), diagnostics (:mod:`.diagnostics`),
the balancers MIMO, GradNorm (:mod:`.balancers`), the CoMMIT learning-rate scheduler (:mod:`.schedulers`)
and the Hugging Face Trainer (:mod:`.hf_trainer`, imported on demand: it needs transformers).
"""

from . import balancers, diagnostics, schedulers
from .losses import modality_losses, modality_token_counts
from .multi_objective import MultiObjectiveLoRA
from .multi_report import MultiStepReport
from .report import StepReport
from .two_objective import ParetoLoRA

__all__ = ["ParetoLoRA", "StepReport", "MultiObjectiveLoRA", "MultiStepReport", "balancers", "diagnostics",
           "schedulers", "modality_losses", "modality_token_counts"]
