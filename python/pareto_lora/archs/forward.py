"""The training forward of each architecture: final hidden states, and the heads that score them.

Why not ``model(**batch).logits``: Chameleon's forward overwrites every image-token logit with
``finfo(dtype).min`` (it is built for text generation), which makes any image loss from those
logits astronomically large (``inf`` once two image targets are averaged) and cuts the
gradient of the image-token rows of the head; Janus' ``logits`` come from ``lm_head`` and
never score an image code. So every architecture runs its *backbone* (``base.base_model``:
the module that returns the final normed hidden states) and the losses apply the heads
themselves, only at the positions that have a target of that head.

The backbone is called on the transformers model that sits inside the PEFT wrapper: LoRA layers
are injected into it in place, so this is the same computation as ``peft_model(**batch)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import ArchSpec, unwrap

__all__ = ["backbone_hidden_states", "module_at", "MODEL_INPUT_KEYS"]

# Batch keys that are model inputs; everything else (labels, image_token_mask, image_codes)
# belongs to the losses. image_sizes: Emu3's per-image (height, width).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes")


def module_at(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called `name` in ``named_modules()``."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"model: no submodule {name!r}; was the ArchSpec built from this model object?") from None


def _check_not_ddp(model: nn.Module) -> None:
    # DDP's reducer is armed by DistributedDataParallel.forward, which calling the backbone
    # directly would skip: the gradients would silently not be averaged across ranks.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "model: pass the PEFT model (ddp_model.module), not the DistributedDataParallel wrapper; "
            "modality_losses_for runs the backbone directly and does not support DDP yet"
        )


def backbone_hidden_states(model: nn.Module, batch, spec: ArchSpec, ignore_index: int = -100) -> torch.Tensor:
    """Final hidden states [batch, seq, hidden] of the language model for `batch`."""
    _check_not_ddp(model)
    base = unwrap(model)
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}
    if spec.image_objective == "gen_head":
        inputs = _janus_inputs(base, batch, inputs, ignore_index)
    # use_cache=False: training forward, no KV cache to allocate.
    out = base.base_model(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def _janus_inputs(base: nn.Module, batch, inputs: dict, ignore_index: int) -> dict:
    """Janus: image codes enter through generation_embeddings -> generation_aligner, not the text table.

    ``batch["image_codes"]`` [batch, seq] holds the VQ code at every generated-image position and
    ``ignore_index`` elsewhere; ``input_ids`` there can be anything (it is not embedded).
    """
    if "input_ids" not in inputs:
        raise ValueError("batch: Janus needs input_ids (text positions) and image_codes (generated-image positions)")
    input_ids = inputs.pop("input_ids")
    codes = batch.get("image_codes")
    embed = base.get_input_embeddings()
    if codes is None:
        inputs["inputs_embeds"] = embed(input_ids)
        return inputs
    if codes.shape != input_ids.shape:
        raise ValueError(f"image_codes: expected shape {tuple(input_ids.shape)} (as input_ids), got {tuple(codes.shape)}")
    is_code = codes != ignore_index
    num_codes = base.model.generation_embeddings.num_embeddings
    if is_code.any() and (codes[is_code].min() < 0 or codes[is_code].max() >= num_codes):
        raise ValueError(f"image_codes: VQ codes must be in [0, {num_codes}) (or {ignore_index} for non-image positions)")
    # The text id under an image code is never used; 0 keeps the lookup in range.
    text = embed(input_ids.masked_fill(is_code, 0))
    gen = base.model.generation_aligner(base.model.generation_embeddings(codes[is_code]))
    if gen.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"model: Janus generation_aligner outputs {gen.shape[-1]} features but the LLM takes {text.shape[-1]}; "
            "vq_config.projection_dim must equal text_config.hidden_size"
        )
    inputs["inputs_embeds"] = text.masked_scatter(is_code.unsqueeze(-1), gen.to(text.dtype))
    return inputs
