"""What pareto-lora needs to know about one unified multimodal architecture: :class:`ArchSpec`.

A spec is *derived from a model instance* (see :mod:`pareto_lora.archs.detect`), so every
module path in it is a name exactly as it appears in ``model.named_modules()`` of the model
that was passed in (a PEFT wrapper adds ``base_model.model.``). That is what makes
``ParetoLoRA(model, arch=spec)`` work without the user spelling any path. For a
``DistributedDataParallel`` wrapper the names are those of the module inside it.

:class:`ArchOverrides` is the small user-facing dataclass for architectures the library does not
know (or to change a known one): image-token ids, the image head, the layer stack, extra groups.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping, Sequence

from torch import nn

__all__ = ["ArchSpec", "ArchOverrides", "inner_module", "unwrap", "qualified_name", "is_fsdp2"]

# How the image objective is scored (ArchSpec.image_objective):
#   "vocab_tokens": image tokens are ids of the shared text vocabulary, scored by the LM head
#                   (Chameleon/Anole, Emu3, a causal LM with discrete image tokens).
#   "gen_head":     image tokens are VQ codes with their own embedding and head (Janus).
#   "user_split":   the model only generates text; the "image" objective is a split of the text
#                   targets (LLaVA-style: image-conditioned targets, or the user's own mask).
IMAGE_OBJECTIVES = ("vocab_tokens", "gen_head", "user_split")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Description of a model's architecture, in the coordinates of the model it was built from.

    Attributes:
        name: architecture name ("chameleon", "emu3", "janus", "llava", "causal_lm").
        layers_path: the decoder-layer ModuleList, as in ``model.named_modules()``
            (``ParetoLoRA(model, arch=spec)`` groups its layers).
        num_layers: length of that ModuleList.
        extra_groups: group name -> module prefixes outside the layer stack whose LoRA
            parameters form that group (Janus ``generation``, vision-side ``projector``).
        frozen_prefixes: modules that are not on the training forward path (VQ image
            tokenizers). LoRA there never gets a gradient; exclude them from the LoRA config
            (``LoraConfig(exclude_modules=spec.lora_exclude_modules)``): ``ParetoLoRA(arch=...)``
            refuses trainable parameters there.
        image_objective: one of "vocab_tokens", "gen_head", "user_split" (see module source).
        image_token_ids: vocabulary ids whose *targets* count as image tokens (vocab_tokens).
        image_head: module producing image-target logits (LM head, or Janus' generation head).
        text_head: module producing text-target logits (the LM head).
        masks_image_logits: the model's own forward overwrites image-token logits (Chameleon);
            the image loss must bypass it (it does: losses are computed from hidden states).
        placeholder_token_id: the ``<image>`` placeholder that the model replaces by image
            features on input; never a target (neither loss counts it).
        image_input_prefixes: modules that encode *input* images (vision tower, aligner).
        description: one line on how the image objective is formed (for docs and repr).
    """

    name: str
    layers_path: str
    num_layers: int
    extra_groups: Mapping[str, tuple[str, ...]]
    frozen_prefixes: tuple[str, ...]
    image_objective: str
    image_token_ids: tuple[int, ...] | None
    image_head: str | None
    text_head: str
    masks_image_logits: bool = False
    placeholder_token_id: int | None = None
    image_input_prefixes: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if self.image_objective not in IMAGE_OBJECTIVES:
            raise ValueError(f"image_objective: expected one of {', '.join(IMAGE_OBJECTIVES)}, got {self.image_objective!r}")

    @property
    def lora_exclude_modules(self) -> str | None:
        """Regex for ``LoraConfig(exclude_modules=...)`` excluding the frozen tokenizers (None: none).

        A string because PEFT ``fullmatch``es a string against every module name, whereas a
        list only matches exact names or name suffixes (not the submodules of a VQ model).
        Names there are *inside the unwrapped model*, so any PEFT prefix is stripped.
        """
        if not self.frozen_prefixes:
            return None
        inner = (p.removeprefix("base_model.model.") for p in self.frozen_prefixes)
        return r"(?:%s)\..*" % "|".join(re.escape(p) for p in inner)

    def group_of(self, param_name: str) -> str | None:
        """The extra group a parameter name belongs to (None: in the stack or in no group)."""
        for group, prefixes in self.extra_groups.items():
            if any(param_name.startswith(p + ".") for p in prefixes):
                return group
        return None

    def layer_of(self, param_name: str) -> int | None:
        """Index of the stack layer a parameter name lives in (None: outside the stack)."""
        prefix = self.layers_path + "."
        if not param_name.startswith(prefix):
            return None
        head = param_name[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


@dataclasses.dataclass(frozen=True)
class ArchOverrides:
    """User overrides for an unknown architecture (or to change what detection found).

    Paths are relative to the *transformers* model (no PEFT prefix): e.g. ``"model.layers"``,
    ``"lm_head"``. Anything left ``None`` keeps the detected value.

    Example, a Llama whose vocabulary has image tokens at ids [32000, 40192)::

        spec = detect_arch(peft_model, ArchOverrides(image_token_ids=range(32000, 40192)))
    """

    image_token_ids: Sequence[int] | range | None = None
    image_head: str | None = None
    layers_path: str | None = None
    extra_groups: Mapping[str, Sequence[str]] | None = None

    def __post_init__(self):
        ids = self.image_token_ids
        if ids is None:
            return
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, range, set, frozenset)):
            raise ValueError(f"image_token_ids: expected a sequence of token ids (ints >= 0), got {ids!r}")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
        if bad:
            raise ValueError(f"image_token_ids: expected token ids (ints >= 0), got {bad[0]!r}")
        if len(ids) == 0:
            raise ValueError("image_token_ids: expected at least one token id, got none")


def inner_module(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or `model` itself).

    Spec paths are names in this module, so one spec serves the DDP wrapper, the model inside it
    and ``ParetoLoRA`` (which lays out the parameters of the inner module).
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp2(module: nn.Module) -> bool:
    """Whether `module` is sharded by FSDP2's ``fully_shard`` (an ``FSDPModule``; False on a torch
    without FSDP2). The one test of it: the model helpers, the syncs and their layout checks use it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper and any DDP wrapper (or the model itself)."""
    model = inner_module(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def qualified_name(model: nn.Module, module: nn.Module) -> str:
    """Name of `module` in ``model.named_modules()`` (raises if it is not a submodule)."""
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise ValueError(f"model: {type(module).__name__} is not a submodule of {type(model).__name__}")


def prefix_in(model: nn.Module, base: nn.Module) -> str:
    """The name prefix (with trailing dot, or "") of the transformers model `base` inside `model`."""
    if model is base:
        return ""
    return qualified_name(model, base) + "."
