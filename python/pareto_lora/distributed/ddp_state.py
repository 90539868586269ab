"""Book-keeping of the DDP communication hook: bucket plans and the per-backward state.

A :class:`BucketPlan` says where one DDP bucket's parameters live in ParetoLoRA's buffers; an
:class:`Arrival` is one reduced bucket waiting for its groups' coefficients; a
:class:`BackwardState` tracks one backward's coverage, finished groups and pending buckets.
The hook itself is :class:`pareto_lora.distributed.ddp.DDPSync`; :func:`refuse_unsupported`
lists the DDP settings it cannot work with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..flat import GradLayout

__all__ = ["BucketPlan", "Arrival", "BackwardState", "plan_bucket", "refuse_unsupported", "wait_event", "record_event"]


@dataclasses.dataclass(eq=False)
class BucketPlan:
    """Where one DDP bucket's parameters live in ParetoLoRA's buffers, ordered by unit."""

    key: int  #: smallest layout position of the bucket's parameters: orders buckets alike on every rank
    order: list[int]  #: bucket positions sorted by unit, so each unit is one contiguous run
    text_views: list[torch.Tensor]  #: text-buffer views of the parameters, in `order`
    image_views: list[torch.Tensor]  #: image-buffer views (= .grad) of the parameters, in `order`
    sizes: list[int]
    unit_offsets: torch.Tensor  #: int64 [U + 1] (CPU) over the unit-ordered packing
    unit_counts: dict[int, int]  #: elements of each unit the bucket holds
    unit_mask: torch.Tensor  #: bool [U] on the device: units the bucket holds
    groups: frozenset[int]
    group_mask: torch.Tensor  #: bool [G] on the device: the groups of `groups`
    #: every group the bucket touches lies wholly in it: one fused launch integrates the bucket
    whole: bool


@dataclasses.dataclass(eq=False)
class Arrival:
    """One reduced bucket of the current backward, kept until its groups' coefficients exist."""

    plan: BucketPlan
    reduced: torch.Tensor  #: [text | image] averages, unit-ordered, 2 x numel
    grads: list[torch.Tensor]  #: the bucket's gradient views (what DDP copies into .grad), in plan order
    row: torch.Tensor  #: [U, 3] statistics of this bucket's part of every unit
    result: torch.futures.Future  #: what the hook returned to DDP
    buffer: torch.Tensor  #: bucket.buffer(): the value `result` completes with
    mixed: torch.Tensor | None = None  #: the integrated bucket, once computed (a whole bucket: on arrival)

    @property
    def text(self) -> torch.Tensor:
        return self.reduced[: self.reduced.numel() // 2]

    @property
    def image(self) -> torch.Tensor:
        return self.reduced[self.reduced.numel() // 2 :]


class BackwardState:
    """Per-backward state of the hook: coverage, finished groups, their tables, pending buckets."""

    def __init__(self, num_units: int, num_groups: int, device: torch.device):
        self.covered = [0] * num_units
        self.group_done = [False] * num_groups
        self.arrived: dict[int, Arrival] = {}
        self.pending: list[Arrival] = []
        self.num_buckets: int | None = None  # known once the bucket flagged is_last() is handed to the hook
        self.count = 0  # buckets whose reduction finished (successfully or not)
        # float64 like every path's statistics (the fused op takes given statistics in float64)
        self.unit_stats = torch.zeros(num_units, 3, dtype=torch.float64, device=device)
        self.group_stats = torch.zeros(num_groups, 3, dtype=torch.float64, device=device)
        self.coeffs = torch.zeros(num_groups, 2, dtype=torch.float32, device=device)
        self.cases = torch.zeros(num_groups, dtype=torch.int32, device=device)
        self.unit_coeffs: torch.Tensor | None = None
        self.trace: list[tuple[int, tuple[int, ...], int]] = []
        self.error: BaseException | None = None
        self.event = None  # CUDA: the last callback's work, which the next callback waits for

    @property
    def done(self) -> bool:
        """Every bucket of the backward has been reduced (DDP launches them in index order)."""
        return self.num_buckets is not None and self.count == self.num_buckets

    def release(self) -> None:
        self.arrived.clear()
        self.pending.clear()


def plan_bucket(params: Sequence[torch.Tensor], layout: GradLayout, index: dict[int, int],
                text_views: Sequence[torch.Tensor], image_views: Sequence[torch.Tensor],
                unit_size: Sequence[int]) -> BucketPlan:
    """Where the parameters of one DDP bucket live in the buffers, ordered by unit.

    ``index``: id(parameter) -> position in ``layout.params``; ``unit_size``: elements of each unit.
    """
    try:
        idx = [index[id(p)] for p in params]
    except KeyError:
        raise RuntimeError(
            "DDP bucket holds a parameter ParetoLoRA does not know (trainable parameters changed after "
            "ParetoLoRA was created?)"
        ) from None
    units = [layout.param_unit[i] for i in idx]
    order = sorted(range(len(idx)), key=lambda j: (units[j], j))
    counts = [0] * layout.num_units
    for j in order:
        counts[units[j]] += params[j].numel()
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    mask = torch.tensor([c > 0 for c in counts], dtype=torch.bool).to(layout.device)
    unit_group = layout.unit_group.tolist()
    groups = frozenset(unit_group[u] for u in set(units))
    bounds = layout.group_offsets.tolist()
    whole = all(counts[u] == unit_size[u] for g in groups for u in range(bounds[g], bounds[g + 1]))
    group_mask = torch.tensor([g in groups for g in range(layout.num_groups)], dtype=torch.bool).to(layout.device)
    return BucketPlan(
        key=min(idx),
        order=order,
        text_views=[text_views[idx[j]] for j in order],
        image_views=[image_views[idx[j]] for j in order],
        sizes=[params[j].numel() for j in order],
        unit_offsets=offsets,
        unit_counts={u: c for u, c in enumerate(counts) if c},
        unit_mask=mask,
        groups=groups,
        group_mask=group_mask,
        whole=whole,
    )


def refuse_unsupported(ddp) -> None:
    """ValueError for a DistributedDataParallel the hook cannot serve (checked before anything is registered)."""
    if getattr(ddp, "gradient_as_bucket_view", False):
        raise ValueError(
            "model: DistributedDataParallel(gradient_as_bucket_view=True) is not supported: ParetoLoRA keeps "
            ".grad in its own flat buffer; construct DDP with the default gradient_as_bucket_view=False"
        )
    if getattr(ddp, "static_graph", False):
        # Measured: the step then ends with "the last backward ran without DDP gradient synchronisation".
        raise ValueError(
            "model: DistributedDataParallel(static_graph=True) is not supported: in its first step DDP reduces "
            "every bucket in a callback queued by the first backward through its output (ParetoLoRA's text or "
            "batched gradient, taken with autograd.grad), before the image gradient reaches .grad; construct DDP "
            "with the default static_graph=False"
        )
    if getattr(ddp, "_comm_hooks", None):
        raise ValueError(
            "model: this DistributedDataParallel model already has a communication hook; ParetoLoRA "
            "registers its own (it must see both objectives' buckets), so it cannot be combined with another"
        )


def wait_event(event) -> None:
    # CUDA callbacks run on pool streams; later callbacks read earlier buckets' tensors.
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
