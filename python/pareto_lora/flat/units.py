"""Which unit each trainable parameter belongs to: by its layer of the stack, or by the architecture.

Without an architecture every LoRA parameter outside the layer stack lands in one ``projector``
unit (a multimodal projector, LoRA on a vision tower, ...). With an
:class:`~pareto_lora.archs.ArchSpec` the spec decides: its ``extra_groups`` (Janus
``generation`` and ``projector``, LLaVA ``projector``) become named units, in the spec's order,
after the layers; LoRA outside the stack that the spec does not name lands in ``outside``; a
trainable parameter inside one of the spec's ``frozen_prefixes`` (a VQ image tokenizer) is
refused. Trainable parameters that are not LoRA always land in ``other`` (plain sum).

Why refuse the frozen tokenizer instead of summing it in ``other``: it is never on the training
path (image codes are discrete), so its LoRA never gets a gradient. Kept, it would cost optimizer
state, AdamW's weight decay would still move it through a zero ``.grad``, and under DDP without
``find_unused_parameters`` it makes the reducer fail on the next step with an error far from the
cause. Excluding it when the LoRA model is built is one argument
(``LoraConfig(exclude_modules=spec.lora_exclude_modules)``), so the error says exactly that.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..archs import ArchSpec, detect_arch
from .params import is_lora_param, layer_of

__all__ = ["PROJECTOR", "OUTSIDE", "OTHER", "RESERVED", "resolve_arch", "assign_units"]

PROJECTOR = "projector"  # no architecture: all LoRA outside the stack
OUTSIDE = "outside"  # an architecture: LoRA outside the stack that the spec names no group for
OTHER = "other"  # trainable parameters that are not LoRA (plain sum)
# Names an extra group may not take: modulate keywords, "other", and the layer/group names.
RESERVED = re.compile(r"^(lower|middle|upper|all|none|other|outside|(group|layer)\d+)$")


def resolve_arch(model: nn.Module, arch, layers_path: str | None) -> ArchSpec | None:
    """The :class:`ArchSpec` that `arch` means for `model` (None: no architecture), checked against it.

    ``arch``: None, ``"auto"`` (:func:`pareto_lora.archs.detect_arch` on `model`) or an ArchSpec
    whose paths are names in ``model.named_modules()``.
    """
    if arch is None:
        return None
    if isinstance(arch, str):
        if arch != "auto":
            raise ValueError(f"arch: expected an ArchSpec, 'auto' or None, got {arch!r}")
        spec = detect_arch(model)
    elif isinstance(arch, ArchSpec):
        spec = arch
    else:
        raise ValueError(f"arch: expected an ArchSpec, 'auto' or None, got {type(arch).__name__}")
    modules = dict(model.named_modules())
    stack = modules.get(spec.layers_path)
    if not isinstance(stack, nn.ModuleList) or len(stack) != spec.num_layers:
        raise ValueError(
            f"arch: expected the spec's layers_path {spec.layers_path!r} to be a ModuleList of {spec.num_layers} "
            "layers in this model; build the spec with pareto_lora.archs.detect_arch(model) on the model passed here"
        )
    for group, prefixes in spec.extra_groups.items():
        if RESERVED.match(group):
            raise ValueError(f"arch: expected extra group names other than modulate keywords and layer/group names, got {group!r}")
        missing = [p for p in prefixes if p not in modules]
        if missing:
            raise ValueError(f"arch: expected the modules of group {group!r} in this model, {missing[0]!r} is not one")
    if layers_path is not None and layers_path != spec.layers_path:
        raise ValueError(
            f"layers_path: expected none or the spec's {spec.layers_path!r} when arch is given, got {layers_path!r}; "
            "change an architecture's stack with detect_arch(model, ArchOverrides(layers_path=...))"
        )
    return spec


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def assign_units(names: Sequence[str], stack_path: str, num_layers: int, spec: ArchSpec | None) -> tuple[list, list[str]]:
    """(unit of each parameter name: a layer index or a unit name, the named LoRA units in order).

    The named LoRA units are those that hold at least one parameter: without a spec
    ``["projector"]`` or ``[]``; with one the spec's extra groups in its order, then ``outside``.
    """
    if spec is not None:
        frozen = [n for n in names if _under(n, spec.frozen_prefixes)]
        if frozen:
            raise ValueError(
                f"model: expected no trainable parameters in {spec.name}'s frozen image tokenizer "
                f"({', '.join(spec.frozen_prefixes)}), found {len(frozen)} (e.g. {frozen[0]!r}); it is never on the "
                "training path, so they would never get a gradient. Build the LoRA model with "
                "LoraConfig(..., exclude_modules=pareto_lora.archs.detect_arch(base_model).lora_exclude_modules), "
                "or freeze them (requires_grad_(False))"
            )
    stack_prefix = stack_path + "."
    units: list[int | str] = []
    for name in names:
        if not is_lora_param(name):
            units.append(OTHER)
            continue
        layer = layer_of(name, stack_prefix)
        if layer is not None and layer < num_layers:
            units.append(layer)
        elif spec is None:
            units.append(PROJECTOR)
        else:
            units.append(spec.group_of(name) or OUTSIDE)
    order = [PROJECTOR] if spec is None else [*spec.extra_groups, OUTSIDE]
    present = set(units)
    return units, [u for u in order if u in present]
