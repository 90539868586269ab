"""Real unified multimodal models: architecture detection and per-architecture losses.

Three lines for any supported model (Chameleon/Anole, Emu3, Janus, LLaVA), the PEFT model or its
``DistributedDataParallel`` wrapper::

    pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=4, modulate="lower")
    text, image = pareto_lora.archs.modality_losses_for(model, batch)
    pl.backward(text=text, image=image)

``ParetoLoRA(arch=...)`` groups by the :class:`ArchSpec` (:mod:`pareto_lora.flat.units`); the
spec is ``pl.arch`` (pass it to ``modality_losses_for`` to skip detecting it again).

* :mod:`.spec`: :class:`ArchSpec` (what the library needs to know) and :class:`ArchOverrides`
  (what a user can set for an unknown model).
* :mod:`.vocab`: image-token ids from the model's vocabulary map.
* :mod:`.detect`: :func:`detect_arch`.
* :mod:`.forward`: the backbone forward (hidden states; Janus' image-code embeddings).
* :mod:`.losses`: :func:`modality_losses_for`, :func:`image_token_mask`.
* :mod:`.objectives`: :func:`objective_losses_for`: a mixed batch's text, understanding
  (captioning) and generation losses, for the K-objective ``ParetoLoRA(objectives=OBJECTIVES)``.

This subpackage depends on torch, transformers (through the model objects only) and peft
conventions; it imports no other pareto_lora module, so it can be used or moved on its own.
"""

from .detect import SUPPORTED, detect_arch
from .losses import image_token_mask, modality_losses_for, modality_token_counts_for
from .objectives import OBJECTIVES, objective_losses_for, objective_masks, objective_token_counts_for
from .spec import ArchOverrides, ArchSpec

__all__ = [
    "ArchOverrides",
    "ArchSpec",
    "OBJECTIVES",
    "SUPPORTED",
    "detect_arch",
    "image_token_mask",
    "modality_losses_for",
    "modality_token_counts_for",
    "objective_losses_for",
    "objective_masks",
    "objective_token_counts_for",
]
