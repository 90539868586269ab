"""Multi-process training: a DDP communication hook and the sharded (FSDP2) integration.

Every rank must end a step with the same integrated gradient: the one a single process would
compute from the gradients of the global-batch losses, i.e. of the *average of the per-rank
losses* (what DDP and FSDP average). Both objectives therefore have to be averaged across ranks
before the statistics are taken; the rule is not linear, so integrating locally and averaging
the results afterwards would be wrong.

DDP (:class:`DDPSync`). DDP reduces gradients only in the first backward after a forward; a
second backward on the same graph (text loss, then image loss) is silently left un-reduced.
ParetoLoRA therefore takes the text gradient with ``torch.autograd.grad`` (no DDP reduction)
into its text buffer, and the ordinary image backward drives DDP's buckets. The hook packs each
bucket's image gradient and the matching slice of the text buffer into one buffer, all-reduces
it once (2 x LoRA gradient bytes per step in all), writes both averages back and computes the
bucket's per-unit statistics while the rest of the backward runs.

Why the rule and combine wait for the end of the backward instead of running per bucket: a
group is a range of layers and usually spans several buckets (and DDP re-buckets after the
first step in gradient-ready order, so groups cannot be aligned to buckets with the public
API). A group's coefficients need the whole group's statistics, which exist only once its last
bucket is reduced; combining then would mean rewriting buckets whose futures DDP has already
consumed. So the hook does the communication and the statistics pass (the two things that
overlap usefully), and ``ParetoLoRA.integrate`` runs the rule (one tiny launch) and the combine
(one elementwise pass over the LoRA gradients) on the already-reduced buffers. Every rank sees
bitwise-identical reduced inputs and runs the same deterministic kernels, so the outputs are
bitwise identical.

Sharded (:func:`sharded_integrate`, :class:`FSDPSync`). With sharded gradients each rank holds
a disjoint slice of both objectives' (already reduce-scattered) gradients; the statistics are
sums, so the per-rank statistics of the shards add up to the global ones. One all-reduce of the
small statistics table, then the rule and the combine run locally on the shards. Zero padding
adds nothing to the sums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from .grouping import Bucket, GradLayout
from .ops import IntegrationResult

__all__ = ["sharded_integrate", "DDPSync", "FSDPSync", "make_sync", "local_layout"]


# ---- generic sharded building block ---------------------------------------------------------
def sharded_integrate(
    a_shard: torch.Tensor,
    b_shard: torch.Tensor,
    offsets_local: torch.Tensor,
    out: torch.Tensor | None = None,
    rule: str = "pareto_lora",
    tau: float = 0.5,
    active: torch.Tensor | None = None,
    gamma: float = 1.0,
    symmetric: bool = False,
    segment_group: torch.Tensor | None = None,
    group=None,
    backend: str = "auto",
) -> IntegrationResult:
    """:func:`pareto_lora.integrate` on one rank's shards of two flat gradient buffers.

    ``offsets_local`` marks this rank's part of every segment (an empty segment where the rank
    holds none of it) and must cover the whole shard: zero padding may sit in any segment,
    as zeros add nothing to the statistics. ``segment_group`` (int64 [S], optional) maps segments to groups, so a
    group may be several segments (e.g. one per parameter shard); without it every segment is
    its own group. The per-group statistics are all-reduced (sum) over the process group
    ``group`` -- the only communication -- and the returned ``stats`` are the global ones;
    ``out`` (default: a new tensor) receives this rank's shard of the integrated gradient.
    """
    if not isinstance(a_shard, torch.Tensor) or not isinstance(b_shard, torch.Tensor):
        raise ValueError("a_shard, b_shard: expected tensors (this rank's shards of the two gradients)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharded_integrate: torch.distributed is not initialised (call init_process_group first)")
    if out is None:
        out = torch.empty_like(a_shard)
    stats = ops.segment_stats(a_shard, b_shard, offsets_local, backend=backend)
    if segment_group is not None:
        segment_group = _check_segment_group(segment_group, stats.shape[0], active, stats.device)
        if active is not None:
            num_groups = active.numel()
        else:
            num_groups = int(segment_group.max()) + 1 if segment_group.numel() else 0
        stats = ops.sum_into_groups(stats, segment_group, num_groups)
    dist.all_reduce(stats, group=group)
    coeffs, cases = ops.rule_coefficients(stats, rule, tau, active, gamma, symmetric, backend=backend)
    seg_coeffs = coeffs if segment_group is None else coeffs[segment_group]
    ops.combine(a_shard, b_shard, offsets_local, seg_coeffs, out=out, backend=backend)
    return IntegrationResult(out=out, stats=stats, coeffs=coeffs, cases=cases)


def _check_segment_group(segment_group, num_segments: int, active, device) -> torch.Tensor:
    if not isinstance(segment_group, torch.Tensor) or segment_group.dim() != 1 or segment_group.dtype != torch.int64:
        raise ValueError("segment_group: expected a 1-d int64 tensor (group of every segment)")
    if segment_group.numel() != num_segments:
        raise ValueError(f"segment_group: expected {num_segments} entries (one per segment), got {segment_group.numel()}")
    if segment_group.numel() and int(segment_group.min()) < 0:
        raise ValueError("segment_group: group indices must be >= 0")
    if active is not None and segment_group.numel() and int(segment_group.max()) >= active.numel():
        raise ValueError(f"segment_group: group index {int(segment_group.max())} out of range for {active.numel()} groups (active)")
    return segment_group.to(device)


# ---- model-wrapper detection ------------------------------------------------------------------
def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def make_sync(model: nn.Module):
    """The synchroniser for a wrapped model: :class:`DDPSync`, :class:`FSDPSync` or None."""
    if _is_ddp(model):
        return DDPSync(model)
    if _is_fsdp2(model):
        return FSDPSync(model)
    return None


# ---- DDP --------------------------------------------------------------------------------------
@dataclasses.dataclass
class _BucketPlan:
    """Where one DDP bucket's parameters live in ParetoLoRA's buffers, ordered by unit."""

    order: list[int]  #: bucket positions sorted by unit, so each unit is one contiguous run
    text_views: list[torch.Tensor]  #: text-buffer views of the parameters, in `order`
    sizes: list[int]
    unit_offsets: torch.Tensor  #: int64 [U + 1] (CPU) over the unit-ordered packing


def _ddp_comm_hook(state, bucket):
    # Unannotated on purpose: DDP checks hook annotations by identity, which postponed
    # (string) annotations would fail.
    return state.reduce_bucket(bucket)


class DDPSync:
    """Averages both objectives inside DDP's gradient buckets (see the module docstring)."""

    def __init__(self, ddp: nn.Module):
        if getattr(ddp, "gradient_as_bucket_view", False):
            raise ValueError(
                "model: DistributedDataParallel(gradient_as_bucket_view=True) is not supported: ParetoLoRA keeps "
                ".grad in its own flat buffer; construct DDP with the default gradient_as_bucket_view=False"
            )
        if getattr(ddp, "_comm_hooks", None):
            raise ValueError(
                "model: this DistributedDataParallel model already has a communication hook; ParetoLoRA "
                "registers its own (it must see both objectives' buckets), so it cannot be combined with another"
            )
        self.ddp = ddp
        self.module = ddp.module
        self.group = ddp.process_group
        self.world = dist.get_world_size(self.group)
        self.hook_calls = 0  #: bucket reductions done in the current backward
        self._stats: dict[int, torch.Tensor] = {}
        self._plans: dict[tuple[int, ...], _BucketPlan] = {}
        self._losses: torch.Tensor | None = None

    def bind(self, layout: GradLayout, text_views: Sequence[torch.Tensor], backend: str) -> None:
        self.layout, self.text_views, self.backend = layout, list(text_views), backend
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        try:
            self.ddp.register_comm_hook(self, _ddp_comm_hook)
        except RuntimeError as e:  # the reducer accepts one hook (a builtin one included)
            raise ValueError(f"model: cannot register ParetoLoRA's DDP communication hook: {e}") from e

    # -- the hook ---------------------------------------------------------------------------
    def _plan(self, params: Sequence[torch.Tensor]) -> _BucketPlan:
        # Keyed by the parameters, not bucket.index(): DDP rebuilds its buckets after step 1.
        key = tuple(id(p) for p in params)
        plan = self._plans.get(key)
        if plan is None:
            try:
                idx = [self._index[id(p)] for p in params]
            except KeyError:
                raise RuntimeError(
                    "DDP bucket holds a parameter ParetoLoRA does not know (trainable parameters changed after "
                    "ParetoLoRA was created?)"
                ) from None
            units = [self.layout.param_unit[i] for i in idx]
            order = sorted(range(len(idx)), key=lambda j: (units[j], j))
            counts = [0] * self.layout.num_units
            for j in order:
                counts[units[j]] += params[j].numel()
            offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
            plan = _BucketPlan(order, [self.text_views[idx[j]] for j in order], [params[j].numel() for j in order], offsets)
            self._plans[key] = plan
        return plan

    def reduce_bucket(self, bucket):
        buf = bucket.buffer()
        grads = bucket.gradients()
        plan = self._plan(bucket.parameters())
        image = [grads[j] for j in plan.order]
        n = buf.numel()
        parts = [g.reshape(-1) for g in image] + [t.reshape(-1) for t in plan.text_views]
        # The accumulated losses ride along once per step (2 numbers), so that every rank
        # reports the global loss and agrees on whether it was finite.
        carry = self._losses if bucket.is_last() and self._losses is not None else None
        if carry is not None:
            parts.append(carry.to(buf.dtype))
        packed = torch.cat(parts).div_(self.world)
        fut = dist.all_reduce(packed, group=self.group, async_op=True).get_future()

        def finish(f):
            red = f.value()[0]
            img, txt = red[:n], red[n : 2 * n]
            torch._foreach_copy_(image, [x.view_as(g) for x, g in zip(img.split(plan.sizes), image)])
            torch._foreach_copy_(plan.text_views, [x.view_as(t) for x, t in zip(txt.split(plan.sizes), plan.text_views)])
            if carry is not None:
                carry.copy_(red[2 * n :])
            # (text, image) = (a, b), as in integrate_buffers
            self._stats[bucket.index()] = ops.segment_stats(txt, img, plan.unit_offsets, backend=self.backend)
            self.hook_calls += 1
            return buf

        return fut.then(finish)

    # -- ParetoLoRA's side ------------------------------------------------------------------
    def before_backward(self, losses: torch.Tensor) -> None:
        self._stats.clear()
        self.hook_calls = 0
        self._losses = losses

    def global_stats(self, text_flats, image_flats, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-unit stats of the averaged gradients [U, 3], averaged accumulated losses).

        Both were reduced by the hook already; the flat buffers are not read again.
        """
        if self.hook_calls == 0:
            raise RuntimeError(
                "integrate: the last backward ran without DDP gradient synchronisation (inside ddp.no_sync()?); "
                "run the last micro-batch of an accumulated step outside no_sync() so both objectives are averaged"
            )
        # Summed in bucket-index order: the order the hooks finished in differs between ranks.
        rows = [self._stats[k] for k in sorted(self._stats)]
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
        total = rows[0].to(dtype)
        for r in rows[1:]:
            total = total + r.to(dtype)
        return total, losses


# ---- FSDP2 ------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor
    return to_local() if callable(to_local) else t


def local_layout(layout: GradLayout) -> GradLayout:
    """`layout` with every bucket sized for this rank's local shards (DTensor parameters)."""
    buckets = []
    for b in layout.buckets:
        offsets, unit_offsets, pos = [], [0] * (layout.num_units + 1), 0
        for i in b.param_index:
            offsets.append(pos)
            pos += _local(layout.params[i]).numel()
            unit_offsets[layout.param_unit[i] + 1] = pos
        for u in range(1, len(unit_offsets)):
            unit_offsets[u] = max(unit_offsets[u], unit_offsets[u - 1])
        buckets.append(Bucket(b.dtype, pos, b.param_index, tuple(offsets), torch.tensor(unit_offsets, dtype=torch.int64)))
    return dataclasses.replace(layout, buckets=tuple(buckets))


def _shard_group(params: Sequence[torch.Tensor]):
    from torch.distributed.tensor import DTensor, Shard

    meshes = {id(p.device_mesh): p for p in params if isinstance(p, DTensor)}
    if len(meshes) != 1:
        raise ValueError("model: expected every trainable parameter to be a DTensor on one device mesh (fully_shard)")
    p = next(iter(meshes.values()))
    dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(dims) != 1:
        raise ValueError(f"model: expected parameters sharded over one mesh dimension, got placements {p.placements}")
    return p.device_mesh.get_group(dims[0])


class FSDPSync:
    """Two reduce-scattered backwards into local shard buffers; one all-reduce of the statistics.

    The text backward runs with ``reshard_after_backward`` off, so the image backward reuses
    the unsharded parameters instead of all-gathering them again; they are resharded after it.
    """

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.model = model
        self.module = model
        self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def bind(self, layout: GradLayout, text_views, backend: str) -> None:
        self.layout, self.backend = layout, backend
        self.group = _shard_group(layout.params)
        self.world = dist.get_world_size(self.group)

    def _reshard_flags(self) -> list[bool]:
        # No public getter; the default (True) is assumed where the private field is missing.
        flags = []
        for m in self.fsdp_modules:
            pg = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
            flags.append(getattr(pg, "reshard_after_backward", True))
        return flags

    def backward(self, t_loss, i_loss, text_views, image_views, first: bool) -> None:
        params = self.layout.params
        for p in params:
            p.grad = None
        flags = self._reshard_flags()
        for m in self.fsdp_modules:
            m.set_reshard_after_backward(False, recurse=False)
        try:
            t_loss.backward(retain_graph=True)
        finally:
            for m, f in zip(self.fsdp_modules, flags):
                m.set_reshard_after_backward(f, recurse=False)
        self._collect(params, text_views, first, "text")
        for p in params:
            p.grad = None
        i_loss.backward()
        self._collect(params, image_views, first, "image")

    @staticmethod
    def _collect(params, views, first: bool, which: str) -> None:
        got = [(v, _local(p.grad)) for p, v in zip(params, views) if p.grad is not None]
        if not got:
            raise RuntimeError(
                f"backward: the {which} loss produced no sharded gradient: FSDP gradient sync is off "
                "(set_requires_gradient_sync(False)) or the loss does not depend on the trainable parameters. "
                "For accumulation use pl.accumulate() with gradient sync left on: the two objectives must be "
                "reduced separately"
            )
        with torch.no_grad():
            if first:
                if len(got) < len(views):
                    for v in views:
                        v.zero_()
                torch._foreach_copy_([v for v, _ in got], [g for _, g in got])
            else:
                torch._foreach_add_([v for v, _ in got], [g for _, g in got])

    def global_stats(self, text_flats, image_flats, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local per-unit stats of the shards, all-reduced together with the losses (one collective).

        Per unit rather than per group (U x 3 instead of G x 3 floats, a few hundred bytes) so
        that the per-layer diagnostics are global too.
        """
        from .training import unit_stats  # training imports this module

        pairs = [(a, b, bk.unit_offsets) for a, b, bk in zip(text_flats, image_flats, self.layout.buckets)]
        local = unit_stats(pairs, self.backend)
        packed = torch.cat([local.reshape(-1).to(torch.float64), losses.to(torch.float64)])
        dist.all_reduce(packed, group=self.group)
        stats = packed[: local.numel()].view_as(local).to(local.dtype)
        return stats, packed[local.numel() :] / self.world

    def write_grads(self, image_views: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.layout.params, image_views):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).copy_(v)
