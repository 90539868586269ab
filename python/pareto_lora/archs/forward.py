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

**Under DDP** the backbone cannot be called directly: ``DistributedDataParallel.forward`` is what
prepares the reducer for the backward (without it the gradients are silently not averaged). So
:func:`forward_losses` runs the wrapper's own forward, ``ddp(**inputs, logits_to_keep=1)``,
and takes what it needs from inside it with two forward hooks, removed afterwards: one on the
same backbone module the single-process path calls (its output is the final, normed hidden
state that the heads read: the same tensor, not a copy from ``output_hidden_states``), and one on
the module DDP wraps, which replaces that module's output by the (text, image) losses computed
from those hidden states. So the losses are the output of the DDP forward: with
``find_unused_parameters=True`` (the Trainer's default for PEFT models) DDP searches the graph
from them and finds every parameter they use, Janus' generation head included, which a head
applied after the forward would not be. ``logits_to_keep=1`` makes the model's own LM head score
one position only instead of the whole sequence (its logits are discarded).
**Under FSDP2** (``fully_shard`` on the model) the same: outside the root's forward its parameters
(the embeddings, the heads) are sharded DTensors, so a backbone called directly fails. The losses
hook runs before FSDP2's own post-forward hook (``prepend=True``): the heads are still unsharded
when the losses read them, and FSDP2 then sees the losses as the forward's output and hooks its
backward (unshard, reduce-scatter) onto them. Janus' input embeddings (the text table, and the
generation embeddings and aligner for image codes) are computed by a pre-hook on the backbone,
inside the root's forward for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .spec import ArchSpec, inner_module, is_fsdp2, unwrap

__all__ = ["backbone_hidden_states", "forward_losses", "module_at", "MODEL_INPUT_KEYS"]

# Batch keys that are model inputs; everything else (labels, image_token_mask, image_codes)
# belongs to the losses. image_sizes: Emu3's per-image (height, width).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_sizes")


def module_at(model: nn.Module, name: str) -> nn.Module:
    """``model``'s submodule called `name` in ``named_modules()``."""
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"model: no submodule {name!r}; was the ArchSpec built from this model object?") from None


def _model_inputs(base: nn.Module, batch, spec: ArchSpec, ignore_index: int):
    """The model's keyword inputs from `batch`, and for Janus a function that returns its
    ``inputs_embeds`` (else None), to be called where the embeddings are usable: under FSDP2 only
    inside the root's forward, which unshards them."""
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}
    embeds = _janus_inputs(base, batch, inputs, ignore_index) if spec.image_objective == "gen_head" else None
    return inputs, embeds


def _last_hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def backbone_hidden_states(model: nn.Module, batch, spec: ArchSpec, ignore_index: int = -100) -> torch.Tensor:
    """Final hidden states [batch, seq, hidden] of the language model for `batch` (not under DDP or FSDP2)."""
    if model is not inner_module(model) or is_fsdp2(model):
        raise ValueError("model: backbone_hidden_states bypasses DistributedDataParallel.forward (or an FSDP2 "
                         "root's forward); use forward_losses")
    base = unwrap(model)
    inputs, embeds = _model_inputs(base, batch, spec, ignore_index)
    if embeds is not None:
        inputs = {k: v for k, v in inputs.items() if k != "input_ids"} | {"inputs_embeds": embeds()}
    # use_cache=False: training forward, no KV cache to allocate.
    return _last_hidden(base.base_model(**inputs, use_cache=False))


def forward_losses(model: nn.Module, batch, spec: ArchSpec, losses_of: Callable, ignore_index: int = -100):
    """``losses_of(final hidden states)`` for `batch`, through the DDP or FSDP2 forward when `model` is
    a DDP wrapper or an FSDP2 root."""
    inner = inner_module(model)
    if model is inner and not is_fsdp2(model):
        return losses_of(backbone_hidden_states(model, batch, spec, ignore_index))
    base = unwrap(inner)
    inputs, embeds = _model_inputs(base, batch, spec, ignore_index)
    hidden: list[torch.Tensor] = []

    def embed_inside(_module, args, kwargs):  # Janus: the embeddings inside the wrapper's forward
        if args or kwargs.get("input_ids") is None:
            raise RuntimeError("model: expected the Janus backbone to be called with input_ids as a keyword")
        return args, kwargs | {"input_ids": None, "inputs_embeds": embeds()}

    def keep_hidden(_module, _args, output):
        hidden.append(_last_hidden(output))

    def losses_instead(_module, _args, _output):
        if len(hidden) != 1:
            raise RuntimeError(f"model: expected one backbone forward inside the DDP/FSDP2 forward, saw {len(hidden)}")
        return losses_of(hidden[0])

    # prepend: before FSDP2's post-forward hook, which reshards the root's parameters (the heads)
    handles = [base.base_model.register_forward_hook(keep_hidden),
               inner.register_forward_hook(losses_instead, prepend=True)]
    if embeds is not None:
        handles.append(base.base_model.register_forward_pre_hook(embed_inside, with_kwargs=True))
    try:
        return model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()


def _janus_inputs(base: nn.Module, batch, inputs: dict, ignore_index: int) -> Callable[[], torch.Tensor]:
    """Janus: image codes enter through generation_embeddings -> generation_aligner, not the text table.

    ``batch["image_codes"]`` [batch, seq] holds the VQ code at every generated-image position and
    ``ignore_index`` elsewhere; ``input_ids`` there can be anything (it is not embedded). Checks the
    batch now (before any forward) and returns the function that computes ``inputs_embeds``.
    """
    if "input_ids" not in inputs:
        raise ValueError("batch: Janus needs input_ids (text positions) and image_codes (generated-image positions)")
    input_ids, codes = inputs["input_ids"], batch.get("image_codes")
    if codes is not None:
        if codes.shape != input_ids.shape:
            raise ValueError(f"image_codes: expected shape {tuple(input_ids.shape)} (as input_ids), got {tuple(codes.shape)}")
        is_code = codes != ignore_index
        num_codes = base.model.generation_embeddings.num_embeddings
        if is_code.any() and (codes[is_code].min() < 0 or codes[is_code].max() >= num_codes):
            raise ValueError(f"image_codes: VQ codes must be in [0, {num_codes}) (or {ignore_index} for non-image positions)")
    return lambda: _janus_embeds(base, input_ids, codes, ignore_index)


def _janus_embeds(base: nn.Module, input_ids: torch.Tensor, codes, ignore_index: int) -> torch.Tensor:
    """The input embeddings of checked Janus inputs (:func:`_janus_inputs`)."""
    embed = base.get_input_embeddings()
    if codes is None:
        return embed(input_ids)
    is_code = codes != ignore_index
    # The text id under an image code is never used; 0 keeps the lookup in range.
    text = embed(input_ids.masked_fill(is_code, 0))
    gen = base.model.generation_aligner(base.model.generation_embeddings(codes[is_code]))
    if gen.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"model: Janus generation_aligner outputs {gen.shape[-1]} features but the LLM takes {text.shape[-1]}; "
            "vq_config.projection_dim must equal text_config.hidden_size"
        )
    return text.masked_scatter(is_code.unsqueeze(-1), gen.to(text.dtype))
