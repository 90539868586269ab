"""The flat-buffer layout of a LoRA model's gradients: units, groups and buckets.

Three levels, from fine to coarse:

* **unit**: one transformer layer of the layer stack (``layer0`` ... ``layer{L-1}``), plus the
  named units outside it (:mod:`.units`): without an architecture ``projector`` (every LoRA
  parameter outside the stack: a multimodal projector, LoRA on a vision tower, ...); with an
  :class:`~pareto_lora.archs.ArchSpec` its ``extra_groups`` (e.g. Janus ``generation`` and
  ``projector``) and ``outside``; and ``other`` (trainable parameters that are not LoRA, e.g.
  PEFT ``modules_to_save`` copies). Statistics are computed per unit, so per-layer diagnostics
  cost nothing extra.
* **group**: what the rule runs on. The stack's L layers are split into ``num_groups``
  consecutive groups exactly like ``numpy.array_split`` (the first ``L % num_groups`` groups
  get one layer more), so "lower", "middle" and "upper" are the same depth ranges on every
  architecture; each named unit is a group of its own, after the layer groups, in the order
  above. ``other`` always gets the plain sum.
* **bucket**: one persistent flat buffer per parameter dtype. A bucket stores its parameters
  ordered by unit, so each unit is one contiguous segment of it (``unit_offsets``).

:class:`GradLayout` is the only thing the flat-buffer step needs to know about the model; the
buffers themselves are :class:`pareto_lora.flat.buffers.FlatGrads`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..archs import ArchSpec
from .params import find_layer_stack, is_lora_param
from .units import OTHER, PROJECTOR, assign_units, resolve_arch

__all__ = [
    "GradLayout",
    "Bucket",
    "MODULATE_CHOICES",
    "split_layers",
    "resolve_modulate",
    "build_layout",
    "local_layout",
    "group_of_names",
    "group_offsets",
]

MODULATE_CHOICES = ("lower", "middle", "upper", "all", "projector", "none")


def local_numel(p: torch.Tensor) -> int:
    """Elements of this rank's part of `p`: the local shard of a DTensor, else all of it."""
    to_local = getattr(p, "to_local", None)
    return to_local().numel() if callable(to_local) else p.numel()


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


def resolve_modulate(modulate, num_groups: int, has_projector: bool = False, *, extra_groups: Sequence[str] | None = None) -> set[int]:
    """Indices of the groups that get the rule.

    ``modulate``: "lower" (group 0), "middle" (num_groups // 2), "upper" (num_groups - 1),
    "all" (every LoRA group, the named ones included), "none", the name of a LoRA group outside
    the stack, a group index, or an iterable mixing names and indices. The named groups follow
    the layer groups: ``extra_groups`` (e.g. ``("generation", "projector")``), or without it
    ``("projector",)`` when ``has_projector`` (so "projector" is index num_groups).
    """
    extra = tuple(extra_groups) if extra_groups is not None else ((PROJECTOR,) if has_projector else ())
    lora_groups = num_groups + len(extra)

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
        if isinstance(item, str) and item in extra:
            return {num_groups + extra.index(item)}
        if item == PROJECTOR:
            raise ValueError("modulate: 'projector' requested but the model has no LoRA parameters outside the layer stack")
        names = ", ".join(dict.fromkeys((*MODULATE_CHOICES, *extra)))
        raise ValueError(f"modulate: unknown value {item!r}; expected one of {names}, a group index or a list of them")

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
    #: int64 [G + 1] on the CPU: group g is units group_offsets[g] .. group_offsets[g+1] - 1. Units
    #: are numbered group by group (layers in stack order, then the named units), so every group is
    #: one run of consecutive units: the ``groups`` of the fused op over a bucket's unit segments.
    group_offsets: torch.Tensor
    active: torch.Tensor  #: bool [G] on `device`: groups that get the rule
    group_layers: tuple[tuple[int, ...], ...]  #: stack layer indices in each group
    buckets: tuple[Bucket, ...]
    stack_path: str
    device: torch.device
    arch: ArchSpec | None = None  #: the architecture the groups come from (None: found by search)

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


def group_offsets(unit_group: Sequence[int], num_groups: int) -> torch.Tensor:
    """int64 [G + 1] (CPU) of a unit -> group map that numbers units group by group."""
    if any(b < a for a, b in zip(unit_group, unit_group[1:])):
        raise AssertionError(f"layout: units must be numbered group by group, got unit_group {list(unit_group)}")
    counts = [0] * num_groups
    for g in unit_group:
        counts[g] += 1
    return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)


def _pack(dtype: torch.dtype, idx: Sequence[int], sizes: Sequence[int], param_unit: Sequence[int], num_units: int) -> Bucket:
    """The bucket holding parameters `idx` (already ordered by unit) back to back, of `sizes` elements."""
    offsets, unit_offsets, pos = [], [0] * (num_units + 1), 0
    for i, n in zip(idx, sizes):
        offsets.append(pos)
        pos += n
        unit_offsets[param_unit[i] + 1] = pos
    for u in range(1, len(unit_offsets)):  # units without a parameter of this dtype are empty segments
        unit_offsets[u] = max(unit_offsets[u], unit_offsets[u - 1])
    return Bucket(dtype, pos, tuple(idx), tuple(offsets), torch.tensor(unit_offsets, dtype=torch.int64))


def local_layout(layout: GradLayout) -> GradLayout:
    """`layout` with every bucket sized for this rank's local shards (DTensor parameters, FSDP2)."""
    buckets = tuple(
        _pack(b.dtype, b.param_index, [local_numel(layout.params[i]) for i in b.param_index], layout.param_unit, layout.num_units)
        for b in layout.buckets
    )
    return dataclasses.replace(layout, buckets=buckets)


def build_layout(
    model: nn.Module,
    num_groups: int | str | None = None,
    modulate="lower",
    layers_path: str | None = None,
    arch: ArchSpec | str | None = None,
) -> GradLayout:
    """Discover the trainable parameters of `model` and lay out their gradient buffers.

    ``num_groups``: number of consecutive layer groups, ``"per_layer"`` (one per layer) or None
    (the default: ``min(5, number of layers)``, so a model of fewer than 5 layers works unchanged).
    ``arch``: None (the stack is searched for, LoRA outside it is one ``projector`` group),
    ``"auto"`` (:func:`pareto_lora.archs.detect_arch`) or an :class:`ArchSpec` of `model`: the
    stack and the named groups come from the spec (:mod:`.units`).
    Raises ValueError when the model has no trainable LoRA parameters, for a bad
    ``num_groups``, ``arch`` or an unknown ``modulate``.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not any(is_lora_param(n) for n, _ in trainable):
        raise ValueError(
            "model: no trainable LoRA parameters found (expected PEFT lora_A/lora_B names); "
            "wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    spec = resolve_arch(model, arch, layers_path)
    stack_path, num_layers = (spec.layers_path, spec.num_layers) if spec is not None else find_layer_stack(model, layers_path)
    if num_groups == "per_layer":
        num_groups = num_layers
    elif num_groups is None:
        num_groups = min(5, num_layers)
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise ValueError(f"num_groups: expected an int or 'per_layer', got {num_groups!r}")
    layer_ranges = split_layers(num_layers, num_groups)

    unit_names = [f"layer{i}" for i in range(num_layers)]
    unit_group = [g for g, r in enumerate(layer_ranges) for _ in r]
    group_names = [f"group{g}" for g in range(num_groups)]
    group_layers = [tuple(r) for r in layer_ranges]

    param_unit, named = assign_units([n for n, _ in trainable], stack_path, num_layers, spec)
    for extra in (*named, *((OTHER,) if OTHER in param_unit else ())):
        unit_names.append(extra)
        unit_group.append(len(group_names))
        group_names.append(extra)
        group_layers.append(())
    unit_of = {n: i for i, n in enumerate(unit_names)}
    param_unit_idx = [u if isinstance(u, int) else unit_of[u] for u in param_unit]

    modulated = resolve_modulate(modulate, num_groups, extra_groups=named)
    active = [g in modulated for g in range(len(group_names))]

    devices = {p.device for _, p in trainable}
    if len(devices) != 1:
        raise ValueError(f"model: trainable parameters span several devices {sorted(map(str, devices))}; expected one")
    device = devices.pop()

    buckets = []
    for dtype in sorted({p.dtype for _, p in trainable}, key=str):
        idx = sorted((i for i, (_, p) in enumerate(trainable) if p.dtype == dtype), key=lambda i: (param_unit_idx[i], i))
        sizes = [trainable[i][1].numel() for i in idx]
        buckets.append(_pack(dtype, idx, sizes, param_unit_idx, len(unit_names)))

    return GradLayout(
        params=tuple(p for _, p in trainable),
        names=tuple(n for n, _ in trainable),
        param_unit=tuple(param_unit_idx),
        unit_names=tuple(unit_names),
        group_names=tuple(group_names),
        unit_group=torch.tensor(unit_group, dtype=torch.int64, device=device),
        group_offsets=group_offsets(unit_group, len(group_names)),
        active=torch.tensor(active, dtype=torch.bool, device=device),
        group_layers=tuple(group_layers),
        buckets=tuple(buckets),
        stack_path=stack_path,
        device=device,
        arch=spec,
    )


def group_of_names(layout: GradLayout) -> dict[str, str]:
    """Parameter name -> group name (for inspection and tests)."""
    ug = layout.unit_group.tolist()
    return {n: layout.group_names[ug[u]] for n, u in zip(layout.names, layout.param_unit)}
