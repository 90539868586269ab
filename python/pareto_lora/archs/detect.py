"""Architecture detection: build an :class:`~pareto_lora.archs.spec.ArchSpec` from a model.

Detection looks at ``config.model_type`` of the transformers model (inside a PEFT wrapper if
there is one) and at the module attributes transformers gives each family; it never guesses
from parameter names, because a vision tower has a ``layers`` list too. Unknown models fall
back to a generic causal LM (the stack inside ``get_decoder()``, the output embeddings as
head); they need :class:`~pareto_lora.archs.spec.ArchOverrides` to say which tokens are image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from . import vocab
from .spec import ArchOverrides, ArchSpec, inner_module, prefix_in, qualified_name, unwrap

__all__ = ["detect_arch", "SUPPORTED"]

_STACK_NAMES = ("layers", "h", "blocks", "layer")


class _Paths:
    """Turns paths relative to the transformers model into names in the passed model."""

    def __init__(self, model: nn.Module, base: nn.Module):
        self.modules = dict(model.named_modules())
        self.prefix = prefix_in(model, base)

    def __call__(self, rel: str, kind: type | None = None) -> str:
        name = self.prefix + rel
        mod = self.modules.get(name)
        if mod is None:
            raise ValueError(f"model: expected a submodule {rel!r} (looked for {name!r} in named_modules())")
        if kind is not None and not isinstance(mod, kind):
            raise ValueError(f"model: {name!r} is a {type(mod).__name__}, expected {kind.__name__}")
        return name

    def optional(self, rel: str) -> tuple[str, ...]:
        name = self.prefix + rel
        return (name,) if name in self.modules else ()


def _chameleon(base, q: _Paths) -> ArchSpec:
    vm = base.config.vocabulary_map
    return ArchSpec(
        name="chameleon",
        layers_path=q("model.layers", nn.ModuleList),
        num_layers=len(base.model.layers),
        extra_groups={},
        frozen_prefixes=q.optional("model.vqmodel"),
        image_objective="vocab_tokens",
        image_token_ids=vocab.chameleon_image_ids(vm),
        image_head=q("lm_head"),
        text_head=q("lm_head"),
        # ChameleonForConditionalGeneration.forward sets every IMGIMG* logit to finfo.min.
        masks_image_logits=True,
        placeholder_token_id=vocab.placeholder_id(vm),
        image_input_prefixes=q.optional("model.vqmodel"),
        description="LM head over the shared vocabulary, from hidden states (bypasses the forward's image-logit mask)",
    )


def _emu3(base, q: _Paths) -> ArchSpec:
    vm = base.config.vocabulary_map
    return ArchSpec(
        name="emu3",
        layers_path=q("model.text_model.layers", nn.ModuleList),
        num_layers=len(base.model.text_model.layers),
        extra_groups={},
        frozen_prefixes=q.optional("model.vqmodel"),
        image_objective="vocab_tokens",
        image_token_ids=vocab.emu3_image_ids(vm),
        image_head=q("lm_head"),
        text_head=q("lm_head"),
        placeholder_token_id=vocab.placeholder_id(vm),
        image_input_prefixes=q.optional("model.vqmodel"),
        description="LM head over the shared vocabulary (visual-token codes and image markers)",
    )


def _janus(base, q: _Paths) -> ArchSpec:
    # Janus draws images with its own embedding/aligner/head over VQ codes; its lm_head never
    # scores an image code. Those modules sit outside the LLM stack and form their own group,
    # separate from the understanding-side vision encoder + aligner.
    gen = tuple(q(f"model.{n}") for n in ("generation_embeddings", "generation_aligner", "generation_head"))
    vision = tuple(q(f"model.{n}") for n in ("vision_model", "aligner"))
    return ArchSpec(
        name="janus",
        layers_path=q("model.language_model.layers", nn.ModuleList),
        num_layers=len(base.model.language_model.layers),
        extra_groups={"generation": gen, "projector": vision},
        frozen_prefixes=q.optional("model.vqmodel"),
        image_objective="gen_head",
        image_token_ids=None,
        image_head=q("model.generation_head"),
        text_head=q("lm_head"),
        placeholder_token_id=int(base.config.image_token_id),
        image_input_prefixes=vision,
        description="generation head over VQ image codes (batch['image_codes']), inputs via generation embeddings + aligner",
    )


def _llava(base, q: _Paths) -> ArchSpec:
    vision = (q("model.multi_modal_projector"), q("model.vision_tower"))
    return ArchSpec(
        name="llava",
        layers_path=q("model.language_model.layers", nn.ModuleList),
        num_layers=len(base.model.language_model.layers),
        extra_groups={"projector": vision},
        frozen_prefixes=(),
        image_objective="user_split",
        image_token_ids=None,
        image_head=q("lm_head"),
        text_head=q("lm_head"),
        placeholder_token_id=int(base.config.image_token_id),
        image_input_prefixes=vision,
        description="text-only output: image loss = LM loss on image-conditioned targets (or batch['image_token_mask'])",
    )


def _causal_lm(base, q: _Paths) -> ArchSpec:
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"model: {type(base).__name__} has no output embeddings (LM head); pass ArchOverrides(image_head=...)")
    stack = _decoder_stack(base)
    layers_path = q.prefix + qualified_name(base, stack) if stack is not None else ""
    return ArchSpec(
        name="causal_lm",
        layers_path=layers_path,
        num_layers=len(stack) if stack is not None else 0,
        extra_groups={},
        frozen_prefixes=(),
        image_objective="user_split",
        image_token_ids=None,
        image_head=q.prefix + qualified_name(base, head),
        text_head=q.prefix + qualified_name(base, head),
        description="LM head; image tokens from ArchOverrides(image_token_ids=...) or batch['image_token_mask']",
    )


def _decoder_stack(base: nn.Module) -> nn.ModuleList | None:
    """The shallowest stack-named ModuleList inside ``get_decoder()`` (the LLM, not a vision tower)."""
    get_decoder = getattr(base, "get_decoder", None)
    root = get_decoder() if callable(get_decoder) else base
    best = None
    for name, sub in root.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) and name.rsplit(".", 1)[-1] in _STACK_NAMES:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, sub)
    return None if best is None else best[1]


# config.model_type -> builder. Anole checkpoints are ChameleonForConditionalGeneration
# (model_type "chameleon"), so they need no entry of their own.
_BUILDERS: dict[str, Callable[[nn.Module, _Paths], ArchSpec]] = {
    "chameleon": _chameleon,
    "emu3": _emu3,
    "janus": _janus,
    "llava": _llava,
}
SUPPORTED = tuple(_BUILDERS)


def detect_arch(model: nn.Module, overrides: ArchOverrides | None = None) -> ArchSpec:
    """The :class:`ArchSpec` of `model` (PEFT-wrapped or not), with `overrides` applied.

    Paths in the result are names in ``model.named_modules()`` of *this* model object (of the
    module inside it for a ``DistributedDataParallel`` wrapper). Known architectures:
    Chameleon/Anole, Emu3, Janus (the ``*ForConditionalGeneration`` classes) and LLaVA; anything
    else is a generic causal LM.
    """
    model = inner_module(model)
    base = unwrap(model)
    q = _Paths(model, base)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    builder = _BUILDERS.get(model_type, _causal_lm)
    if builder is not _causal_lm and not hasattr(base, "lm_head"):
        raise ValueError(
            f"model: {type(base).__name__} is a {model_type} backbone without an LM head; "
            f"pass the *ForConditionalGeneration model"
        )
    spec = builder(base, q)
    if overrides is not None:
        spec = _apply(spec, overrides, q, _vocab_size(base))
    if not spec.layers_path:
        raise ValueError("model: cannot find the decoder-layer stack; pass ArchOverrides(layers_path=...)")
    return spec


def _vocab_size(base: nn.Module) -> int | None:
    """Rows of the LM head (what the logits' last dimension will be), else the config's vocab_size."""
    head = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    cfg = getattr(base, "config", None)
    size = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
    return int(size) if size else None


def _apply(spec: ArchSpec, o: ArchOverrides, q: _Paths, vocab: int | None) -> ArchSpec:
    changes: dict = {}
    if o.image_token_ids is not None:
        ids = tuple(sorted({int(i) for i in o.image_token_ids}))  # ints >= 0, not empty (ArchOverrides)
        if spec.image_objective == "gen_head":
            raise ValueError(f"image_token_ids: {spec.name} scores image codes with its generation head, not vocabulary ids")
        if vocab is not None and ids[-1] >= vocab:
            raise ValueError(f"image_token_ids: expected ids in [0, {vocab}) (the model's vocabulary), got {ids[-1]}")
        changes.update(image_token_ids=ids, image_objective="vocab_tokens")
    if o.image_head is not None:
        changes["image_head"] = q(o.image_head)
    if o.layers_path is not None:
        path = q(o.layers_path, nn.ModuleList)
        changes.update(layers_path=path, num_layers=len(q.modules[path]))
    if o.extra_groups is not None:
        changes["extra_groups"] = {g: tuple(q(p) for p in ps) for g, ps in o.extra_groups.items()}
    return dataclasses.replace(spec, **changes) if changes else spec
