"""Parameter discovery, layer groups and the flat-buffer layout of a LoRA model's gradients.

Three levels, from fine to coarse:

* **unit**: one transformer layer of the layer stack (``layer0`` ... ``layer{L-1}``), plus
  ``projector`` (every LoRA parameter outside the stack: a multimodal projector, LoRA on a
  vision tower, ...) and ``other`` (trainable parameters that are not LoRA, e.g. PEFT
  ``modules_to_save`` copies). Statistics are computed per unit, so per-layer diagnostics cost
  nothing extra.
* **group**: what the rule runs on. The stack's L layers are split into ``num_groups``
  consecutive groups exactly like ``numpy.array_split`` (the first ``L % num_groups`` groups
  get one layer more); ``projector`` and ``other`` are groups of their own. ``other`` always
  gets the plain sum.
* **bucket**: one persistent flat buffer per parameter dtype. A bucket stores its parameters
  ordered by unit, so each unit is one contiguous segment of it (``unit_offsets``).

:class:`GradLayout` is the only thing the integration step needs to know about the model; it
does not hold the buffers themselves (see :class:`pareto_lora.training.FlatGrads`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "GradLayout",
    "Bucket",
    "MODULATE_CHOICES",
    "is_lora_param",
    "find_layer_stack",
    "split_layers",
    "resolve_modulate",
    "build_layout",
    "group_of_names",
]

# PEFT names: lora_A / lora_B (linear), lora_embedding_A / _B (embedding), lora_magnitude_vector (DoRA).
_LORA_PART = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
# Attribute names of the decoder-layer ModuleList across families: Llama/Mistral/Qwen2/Chameleon
# and LLaVA's language model use ``layers``, GPT-2 ``h``, some others ``blocks`` / ``layer``.
_STACK_NAMES = ("layers", "h", "blocks", "layer")
# Prefer these when a model has several stacks (a VLM's vision tower has ``layers`` too).
_LANGUAGE_HINTS = ("language_model", "text_model", "llm", "decoder")

MODULATE_CHOICES = ("lower", "middle", "upper", "all", "projector", "none")
PROJECTOR = "projector"
OTHER = "other"


def is_lora_param(name: str) -> bool:
    """True for PEFT LoRA parameters (lora_A/B, lora_embedding_A/B, DoRA magnitude)."""
    return _LORA_PART.search(name) is not None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _stack_in(module: nn.Module) -> nn.ModuleList | None:
    """The shallowest ModuleList named like a layer stack inside `module`."""
    best = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 0 and name.rsplit(".", 1)[-1] in _STACK_NAMES:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, sub)
    return None if best is None else best[1]


def find_layer_stack(model: nn.Module, layers_path: str | None = None) -> tuple[str, int]:
    """(qualified name of the decoder-layer ModuleList inside `model`, number of layers).

    ``layers_path`` (a module name as in ``model.named_modules()``) overrides the search.
    Otherwise: the stack inside the transformers ``get_decoder()`` module when the model has
    one (this skips a VLM's vision tower), else the only stack-named ModuleList holding LoRA
    parameters, preferring a language-model path when there are several.
    """
    modules = dict(model.named_modules())
    if layers_path is not None:
        stack = modules.get(layers_path)
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"layers_path: {layers_path!r} is not a ModuleList of model (names as in named_modules())")
        return layers_path, len(stack)

    names_by_id = {id(m): n for n, m in modules.items()}
    get_decoder = getattr(_unwrap(model), "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
        stack = _stack_in(decoder) if isinstance(decoder, nn.Module) else None
        if stack is not None and id(stack) in names_by_id:
            return names_by_id[id(stack)], len(stack)

    lora_names = [n for n, _ in model.named_parameters() if is_lora_param(n)]
    candidates = [
        n
        for n, m in modules.items()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and n.rsplit(".", 1)[-1] in _STACK_NAMES
        and any(p.startswith(n + ".") for p in lora_names)
    ]
    if len(candidates) > 1:
        hinted = [n for n in candidates if any(h in n for h in _LANGUAGE_HINTS)]
        candidates = hinted if len(hinted) == 1 else candidates
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise ValueError(
            f"layers_path: cannot tell which ModuleList is the transformer layer stack (candidates: {found}); "
            "pass layers_path='<module name>'"
        )
    return candidates[0], len(modules[candidates[0]])


def split_layers(num_layers: int, num_groups: int) -> list[range]:
    """Consecutive layer ranges, sized like ``numpy.array_split(range(num_layers), num_groups)``."""
    if num_groups < 1 or num_groups > num_layers:
        raise ValueError(f"num_groups: expected 1 <= num_groups <= {num_layers} (number of layers), got {num_groups}")
    base, extra = divmod(num_layers, num_groups)
    ranges, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def resolve_modulate(modulate, num_groups: int, has_projector: bool) -> set[int]:
    """Indices of the groups that get the rule.

    ``modulate``: "lower" (group 0), "middle" (num_groups // 2), "upper" (num_groups - 1),
    "all" (every LoRA group, projector included), "projector" (the out-of-stack group, index
    num_groups), "none", a group index, or an iterable mixing names and indices.
    """
    projector_index = num_groups if has_projector else None
    lora_groups = num_groups + (1 if has_projector else 0)

    def one(item) -> set[int]:
        if isinstance(item, bool):  # bool is an int: refuse True/False explicitly
            raise ValueError(f"modulate: expected a name or group index, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < lora_groups:
                raise ValueError(f"modulate: group index {item} out of range [0, {lora_groups})")
            return {item}
        if item == "lower":
            return {0}
        if item == "middle":
            return {num_groups // 2}
        if item == "upper":
            return {num_groups - 1}
        if item == "all":
            return set(range(lora_groups))
        if item == "none":
            return set()
        if item == PROJECTOR:
            if projector_index is None:
                raise ValueError("modulate: 'projector' requested but the model has no LoRA parameters outside the layer stack")
            return {projector_index}
        raise ValueError(f"modulate: unknown value {item!r}; expected one of {', '.join(MODULATE_CHOICES)}, a group index or a list of them")

    if isinstance(modulate, (str, int)):
        return one(modulate)
    if isinstance(modulate, Iterable):
        chosen: set[int] = set()
        for item in modulate:
            chosen |= one(item)
        return chosen
    raise ValueError(f"modulate: expected a name, a group index or a list of them, got {type(modulate).__name__}")


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One dtype's flat buffer: which parameters it holds, where, and its unit segments."""

    dtype: torch.dtype
    numel: int
    param_index: tuple[int, ...]  #: indices into GradLayout.params, in buffer order
    param_offset: tuple[int, ...]  #: start of each of those parameters in the buffer
    unit_offsets: torch.Tensor  #: int64 [U + 1] on the CPU; unit u is [off[u], off[u+1])


@dataclasses.dataclass(frozen=True)
class GradLayout:
    """Where every trainable parameter's gradient lives and which group it belongs to."""

    params: tuple[nn.Parameter, ...]
    names: tuple[str, ...]
    param_unit: tuple[int, ...]  #: unit of each parameter
    unit_names: tuple[str, ...]  #: "layer0".., then "projector" / "other" when present
    group_names: tuple[str, ...]  #: "group0".., then "projector" / "other" when present
    unit_group: torch.Tensor  #: int64 [U] on `device`: group of each unit
    active: torch.Tensor  #: bool [G] on `device`: groups that get the rule
    group_layers: tuple[tuple[int, ...], ...]  #: stack layer indices in each group
    buckets: tuple[Bucket, ...]
    stack_path: str
    device: torch.device

    @property
    def num_units(self) -> int:
        return len(self.unit_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def describe(self) -> str:
        """Human-readable summary: groups, their layers, parameter counts and modulation."""
        counts = [0] * self.num_groups
        ug = self.unit_group.tolist()
        for p, u in zip(self.params, self.param_unit):
            counts[ug[u]] += p.numel()
        act = self.active.tolist()
        lines = [f"layer stack: {self.stack_path} ({sum(len(g) for g in self.group_layers)} layers)"]
        for g, name in enumerate(self.group_names):
            layers = self.group_layers[g]
            span = f"layers {layers[0]}-{layers[-1]}" if layers else "-"
            lines.append(f"  {name:>10}: {span:<14} {counts[g]:>12,} params  {'rule' if act[g] else 'sum'}")
        return "\n".join(lines)


def _layer_of(name: str, stack_prefix: str) -> int | None:
    if not name.startswith(stack_prefix):
        return None
    head = name[len(stack_prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def build_layout(
    model: nn.Module,
    num_groups: int | str = 5,
    modulate="lower",
    layers_path: str | None = None,
) -> GradLayout:
    """Discover the trainable parameters of `model` and lay out their gradient buffers.

    ``num_groups``: number of consecutive layer groups, or ``"per_layer"`` (one per layer).
    Raises ValueError when the model has no trainable LoRA parameters, for a bad
    ``num_groups`` or an unknown ``modulate``.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(is_lora_param(n) for n, _ in trainable):
        raise ValueError(
            "model: no trainable LoRA parameters found (expected PEFT lora_A/lora_B names); "
            "wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    stack_path, num_layers = find_layer_stack(model, layers_path)
    if num_groups == "per_layer":
        num_groups = num_layers
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise ValueError(f"num_groups: expected an int or 'per_layer', got {num_groups!r}")
    layer_ranges = split_layers(num_layers, num_groups)

    stack_prefix = stack_path + "."
    unit_names = [f"layer{i}" for i in range(num_layers)]
    layer_group = [g for g, r in enumerate(layer_ranges) for _ in r]
    unit_group = list(layer_group)
    group_names = [f"group{g}" for g in range(num_groups)]
    group_layers = [tuple(r) for r in layer_ranges]

    param_unit: list[int | str] = []
    for name, _ in trainable:
        layer = _layer_of(name, stack_prefix) if is_lora_param(name) else None
        if layer is not None and layer < num_layers:
            param_unit.append(layer)
        else:
            param_unit.append(PROJECTOR if is_lora_param(name) else OTHER)
    has_projector = PROJECTOR in param_unit
    for extra in (PROJECTOR, OTHER):
        if extra in param_unit:
            unit_names.append(extra)
            unit_group.append(len(group_names))
            group_names.append(extra)
            group_layers.append(())
    unit_of = {n: i for i, n in enumerate(unit_names)}
    param_unit_idx = [u if isinstance(u, int) else unit_of[u] for u in param_unit]

    modulated = resolve_modulate(modulate, num_groups, has_projector)
    active = [g in modulated for g in range(len(group_names))]

    devices = {p.device for _, p in trainable}
    if len(devices) != 1:
        raise ValueError(f"model: trainable parameters span several devices {sorted(map(str, devices))}; expected one")
    device = devices.pop()

    buckets = []
    for dtype in sorted({p.dtype for _, p in trainable}, key=str):
        idx = sorted((i for i, (_, p) in enumerate(trainable) if p.dtype == dtype), key=lambda i: (param_unit_idx[i], i))
        offsets, unit_offsets, pos = [], [0] * (len(unit_names) + 1), 0
        for i in idx:
            offsets.append(pos)
            pos += trainable[i][1].numel()
            unit_offsets[param_unit_idx[i] + 1] = pos
        for u in range(1, len(unit_offsets)):  # units without a parameter of this dtype are empty segments
            unit_offsets[u] = max(unit_offsets[u], unit_offsets[u - 1])
        buckets.append(
            Bucket(dtype, pos, tuple(idx), tuple(offsets), torch.tensor(unit_offsets, dtype=torch.int64))
        )

    return GradLayout(
        params=tuple(p for _, p in trainable),
        names=tuple(n for n, _ in trainable),
        param_unit=tuple(param_unit_idx),
        unit_names=tuple(unit_names),
        group_names=tuple(group_names),
        unit_group=torch.tensor(unit_group, dtype=torch.int64, device=device),
        active=torch.tensor(active, dtype=torch.bool, device=device),
        group_layers=tuple(group_layers),
        buckets=tuple(buckets),
        stack_path=stack_path,
        device=device,
    )


def group_of_names(layout: GradLayout) -> dict[str, str]:
    """Parameter name -> group name (for inspection and tests)."""
    ug = layout.unit_group.tolist()
    return {n: layout.group_names[ug[u]] for n, u in zip(layout.names, layout.param_unit)}

