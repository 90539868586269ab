"""Multi-process training: a DDP communication hook and the sharded (FSDP2) integration.

Every rank must end a step with the same integrated gradient: the one a single process would
compute from the gradients of the global-batch losses, i.e. of the *average of the per-rank
losses* (what DDP and FSDP average). Both objectives therefore have to be averaged across ranks
before the statistics are taken; the rule is not linear, so integrating locally and averaging
the results afterwards would be wrong.

DDP (:class:`DDPSync`). DDP reduces gradients only in the first backward after a forward; a
second backward on the same graph (text loss, then image loss) is silently left un-reduced.
ParetoLoRA therefore takes the text gradient with ``torch.autograd.grad`` (no DDP reduction)
into its text buffer, and the ordinary image backward drives DDP's buckets.

The whole integration runs inside the communication hook, overlapping with the rest of the
backward. For each bucket the hook packs the image gradient and the matching slice of the text
buffer into one buffer and all-reduces it once (2 x LoRA gradient bytes per step in all). It
returns its own future, which DDP waits for only at the end of the backward. When a bucket's
reduction finishes, its callback computes the bucket's per-unit statistics and counts, per
unit, how many elements have been reduced. A group (a range of layers) usually spans several
buckets, and DDP re-buckets after the first step in gradient-ready order, so completeness is
decided by this coverage count, never by bucket indices. When a group's units are all covered,
its whole-group statistics are final and the rule runs for it. Every pending bucket whose
groups all have coefficients is then combined into its gradient views (which DDP copies into
``.grad``) and its future is completed. The last bucket completes every remaining group.

Ranks finish their reductions in different orders, yet they must end with bitwise-identical
gradients. Each unit's statistics are therefore summed over the buckets holding it in one fixed
order (by the bucket's first parameter in the layout), never in arrival order. The rule and
combine kernels are deterministic, so identical inputs give identical outputs.

The reduced (un-integrated) averages stay alive until ``integrate()``. If another micro-batch of
the same step follows a synchronised backward, they are put back into the buffers
(:meth:`DDPSync.restore_reduced`) so that accumulation continues from them. The losses ride in
the last bucket, so only ``integrate()`` learns whether the global loss was finite; then it
poisons the already-integrated ``.grad`` with NaN (and raises, with ``on_nonfinite="raise"``).

Sharded (:func:`sharded_integrate`, :class:`FSDPSync`). With sharded gradients each rank holds
a disjoint slice of both objectives' (already reduce-scattered) gradients; the statistics are
sums, so the per-rank statistics of the shards add up to the global ones. One all-reduce of the
small statistics table, then the rule and the combine run locally on the shards. Zero padding
adds nothing to the sums.
"""

from __future__ import annotations

import dataclasses
import math
import threading
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
@dataclasses.dataclass(eq=False)
class _BucketPlan:
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


@dataclasses.dataclass(eq=False)
class _Arrival:
    """One reduced bucket of the current backward, kept until its groups' coefficients exist."""

    plan: _BucketPlan
    reduced: torch.Tensor  #: [image | text] averages, unit-ordered, 2 x numel
    grads: list[torch.Tensor]  #: the bucket's gradient views (what DDP copies into .grad), in plan order
    row: torch.Tensor  #: [U, 3] statistics of this bucket's part of every unit
    result: torch.futures.Future  #: what the hook returned to DDP
    buffer: torch.Tensor  #: bucket.buffer(): the value `result` completes with

    @property
    def image(self) -> torch.Tensor:
        return self.reduced[: self.reduced.numel() // 2]

    @property
    def text(self) -> torch.Tensor:
        return self.reduced[self.reduced.numel() // 2 :]


class _Backward:
    """Per-backward state of the hook: coverage, finished groups, their tables, pending buckets."""

    def __init__(self, num_units: int, num_groups: int, device: torch.device, stats_dtype: torch.dtype):
        self.covered = [0] * num_units
        self.group_done = [False] * num_groups
        self.arrived: dict[int, _Arrival] = {}
        self.pending: list[_Arrival] = []
        self.num_buckets: int | None = None  # known once the bucket flagged is_last() is handed to the hook
        self.count = 0  # buckets whose reduction finished (successfully or not)
        self.unit_stats = torch.zeros(num_units, 3, dtype=stats_dtype, device=device)
        self.group_stats = torch.zeros(num_groups, 3, dtype=stats_dtype, device=device)
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


def _ddp_comm_hook(state, bucket):
    # Unannotated on purpose: DDP checks hook annotations by identity, which postponed
    # (string) annotations would fail.
    return state.reduce_bucket(bucket)


class DDPSync:
    """Averages both objectives and integrates them inside DDP's gradient buckets (see the module docstring).

    ``trace`` lists, for the last synchronised backward and in the order the reductions
    finished, ``(bucket key, groups completed, buckets integrated)``; ``bucket key`` is the
    smallest layout position of the bucket's parameters.
    """

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
        self._plans: dict[tuple[int, ...], _BucketPlan] = {}
        self._losses: torch.Tensor | None = None
        self._cur: _Backward | None = None
        self._last: _Backward | None = None  # for `trace`, kept after integrate()
        # gloo and NCCL run completion callbacks on their own threads, several at a time.
        self._lock = threading.Lock()

    def bind(self, layout: GradLayout, text_views, image_views, backend: str, rule_fn) -> None:
        """``rule_fn(group_stats [G, 3]) -> (coeffs, cases)``: the owner's rule with its current settings."""
        ignored = getattr(self.ddp, "parameters_to_ignore", ()) or ()
        skipped = [n for n in layout.names if n in ignored]
        if skipped:
            raise ValueError(
                f"model: DDP ignores trainable parameters ParetoLoRA integrates ({', '.join(skipped[:3])}); their "
                "gradients would never be averaged, so their groups could not be integrated in the hook"
            )
        self.layout, self.backend, self.rule_fn = layout, backend, rule_fn
        self.text_views, self.image_views = list(text_views), list(image_views)
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        num_units, num_groups, dev = layout.num_units, layout.num_groups, layout.device
        self._unit_size = [0] * num_units
        for p, u in zip(layout.params, layout.param_unit):
            self._unit_size[u] += p.numel()
        unit_group = layout.unit_group.tolist()
        self._unit_group = unit_group
        self._group_units = [[u for u in range(num_units) if unit_group[u] == g] for g in range(num_groups)]
        self._group_onehot = list(torch.eye(num_groups, dtype=torch.bool, device=dev))
        self._group_unit_mask = list(layout.unit_group[None, :] == torch.arange(num_groups, device=dev)[:, None])
        self._stats_dtype = torch.float64 if any(b.dtype == torch.float64 for b in layout.buckets) else torch.float32
        try:
            self.ddp.register_comm_hook(self, _ddp_comm_hook)
        except RuntimeError as e:  # the reducer accepts one hook (a builtin one included)
            raise ValueError(f"model: cannot register ParetoLoRA's DDP communication hook: {e}") from e

    @property
    def trace(self) -> list[tuple[int, tuple[int, ...], int]]:
        return list(self._last.trace) if self._last is not None else []

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
            mask = torch.tensor([c > 0 for c in counts], dtype=torch.bool).to(self.layout.device)
            plan = _BucketPlan(
                key=min(idx),
                order=order,
                text_views=[self.text_views[idx[j]] for j in order],
                image_views=[self.image_views[idx[j]] for j in order],
                sizes=[params[j].numel() for j in order],
                unit_offsets=offsets,
                unit_counts={u: c for u, c in enumerate(counts) if c},
                unit_mask=mask,
                groups=frozenset(self._unit_group[u] for u in set(units)),
            )
            self._plans[key] = plan
        return plan

    def _backward_state(self) -> _Backward:
        # A backward not started by ParetoLoRA (no before_backward) still gets fresh state.
        if self._cur is None or self._cur.done:
            lay = self.layout
            self._cur = self._last = _Backward(lay.num_units, lay.num_groups, lay.device, self._stats_dtype)
        return self._cur

    def reduce_bucket(self, bucket):
        buf = bucket.buffer()
        grads = bucket.gradients()
        plan = self._plan(bucket.parameters())
        image = [grads[j] for j in plan.order]
        parts = [g.reshape(-1) for g in image] + [t.reshape(-1) for t in plan.text_views]
        # The accumulated losses ride along once per step (2 numbers), so that every rank
        # reports the global loss and agrees on whether it was finite.
        is_last = bucket.is_last()
        carry = self._losses if is_last and self._losses is not None else None
        if carry is not None:
            parts.append(carry.to(buf.dtype))
        packed = torch.cat(parts).div_(self.world)
        with self._lock:
            state = self._backward_state()
            if is_last:
                state.num_buckets = bucket.index() + 1
        # DDP waits for this future at the end of the backward; it is completed once the
        # bucket's groups have their coefficients, possibly by a later bucket's callback.
        result = torch.futures.Future(devices=[buf.device]) if buf.device.type == "cuda" else torch.futures.Future()
        fut = dist.all_reduce(packed, group=self.group, async_op=True).get_future()

        def arrive(f):
            self._arrive(state, f, plan, image, carry, buf, result)

        fut.then(arrive)
        return result

    def _arrive(self, state: _Backward, f, plan, image, carry, buf, result) -> None:
        """All-reduce callback: record the bucket, finish the groups it completes, integrate what is ready."""
        ready: list[_Arrival] = []
        failed: list[tuple[torch.futures.Future, torch.Tensor]] = []
        with self._lock:
            state.count += 1
            if state.error is not None:
                failed.append((result, buf))
            else:
                try:
                    _wait_event(state.event)
                    red = f.value()[0]
                    n = buf.numel()
                    if carry is not None:
                        carry.copy_(red[2 * n :])
                    red = red[: 2 * n]
                    # (text, image) = (a, b), as in integrate_buffers
                    row = ops.segment_stats(red[n:], red[:n], plan.unit_offsets, backend=self.backend)
                    arrival = _Arrival(plan, red, image, row.to(self._stats_dtype), result, buf)
                    state.arrived[plan.key] = arrival
                    state.pending.append(arrival)
                    for u, c in plan.unit_counts.items():
                        state.covered[u] += c
                    completed = self._completed_groups(state)
                    if completed:
                        self._finish_groups(state, completed)
                    ready = self._integrate_ready(state)
                    state.trace.append((plan.key, tuple(completed), len(ready)))
                    state.event = _record_event(buf.device)
                except BaseException as e:  # noqa: BLE001 - re-raised by DDP through the futures
                    state.error = e
                    failed = [(a.result, a.buffer) for a in state.pending if a.result is not result] + [(result, buf)]
                    ready = []
        for a in ready:
            a.result.set_result(a.buffer)
        # Not set_exception: DDP's C++ side cannot unwrap a Python exception (it reports "Unable
        # to cast ... to Tensor" and leaves the reducer mid-step). The buckets complete as NaN and
        # ParetoLoRA raises the recorded error right after the backward (`failure`).
        for fut, buffer in failed:
            fut.set_result(buffer.fill_(math.nan))

    def _completed_groups(self, state: _Backward) -> list[int]:
        full = [c == s for c, s in zip(state.covered, self._unit_size)]
        completed = [
            g for g, units in enumerate(self._group_units)
            if not state.group_done[g] and all(full[u] for u in units)
        ]
        if state.done and not all(state.group_done[g] or g in completed for g in range(len(state.group_done))):
            missing = [self.layout.unit_names[u] for u, ok in enumerate(full) if not ok]
            raise RuntimeError(
                f"DDP reduced every bucket of this backward but not all gradients of {', '.join(missing)}: the "
                "DDP buckets do not cover ParetoLoRA's trainable parameters"
            )
        return completed

    def _finish_groups(self, state: _Backward, completed: list[int]) -> None:
        """Whole-group statistics -> rule for the groups that just became complete."""
        units = {u for g in completed for u in self._group_units[g]}
        # Each unit's total is a left fold over the buckets holding it in key order, the same
        # on every rank whatever order the reductions finished in: bitwise-equal coefficients.
        acc = torch.zeros_like(state.unit_stats)
        for key in sorted(k for k, a in state.arrived.items() if units & a.plan.unit_counts.keys()):
            a = state.arrived[key]
            acc = torch.where(a.plan.unit_mask[:, None], acc + a.row, acc)
        gmask, umask = self._group_onehot[completed[0]], self._group_unit_mask[completed[0]]
        for g in completed[1:]:
            gmask, umask = gmask | self._group_onehot[g], umask | self._group_unit_mask[g]
        state.unit_stats = torch.where(umask[:, None], acc, state.unit_stats)
        group_stats = ops.sum_into_groups(state.unit_stats, self.layout.unit_group, self.layout.num_groups)
        state.group_stats = torch.where(gmask[:, None], group_stats, state.group_stats)
        coeffs, cases = self.rule_fn(state.group_stats)
        state.coeffs = torch.where(gmask[:, None], coeffs, state.coeffs)
        state.cases = torch.where(gmask, cases, state.cases)
        state.unit_coeffs = state.coeffs[self.layout.unit_group]
        for g in completed:
            state.group_done[g] = True

    def _integrate_ready(self, state: _Backward) -> list[_Arrival]:
        """Combine every pending bucket whose groups are all final into its gradient views."""
        ready = [a for a in state.pending if all(state.group_done[g] for g in a.plan.groups)]
        for a in ready:
            mixed = ops.combine(a.text, a.image, a.plan.unit_offsets, state.unit_coeffs, backend=self.backend)
            torch._foreach_copy_(a.grads, [x.view_as(g) for x, g in zip(mixed.split(a.plan.sizes), a.grads)])
        state.pending = [a for a in state.pending if a not in ready]
        return ready

    # -- ParetoLoRA's side ------------------------------------------------------------------
    def before_backward(self, losses: torch.Tensor) -> None:
        self._cur = None
        self._losses = losses

    def failure(self) -> RuntimeError | None:
        """The error of a hook that failed in the last backward (once), else None."""
        state = self._cur
        if state is None or state.error is None:
            return None
        self._cur = None
        e = state.error
        err = RuntimeError(f"backward: ParetoLoRA's DDP communication hook failed: {type(e).__name__}: {e}")
        err.__cause__ = e
        return err

    def restore_reduced(self) -> None:
        """Before another micro-batch of the same step: put the averaged, un-integrated gradients back.

        The hook integrated the last synchronised backward into ``.grad``; accumulation must
        continue from the plain averages (averaging them again is exact: they are equal on
        every rank). A no-op when the last backward ran inside ``no_sync()``.
        """
        state = self._cur
        if state is None or state.error is not None:
            return
        for a in state.arrived.values():
            for reduced, views in ((a.image, a.plan.image_views), (a.text, a.plan.text_views)):
                torch._foreach_copy_(views, [x.view_as(v) for x, v in zip(reduced.split(a.plan.sizes), views)])
        state.release()
        self._cur = None

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unit stats [U, 3], group stats [G, 3], coeffs [G, 2], cases [G]) of the hook's integration.

        The integrated gradients are in ``.grad`` already; this releases the step's buffers.
        """
        state = self._cur
        if state is None:
            raise RuntimeError(
                "integrate: the last backward ran without DDP gradient synchronisation (inside ddp.no_sync()?); "
                "run the last micro-batch of an accumulated step outside no_sync() so both objectives are averaged"
            )
        if state.error is not None:
            raise RuntimeError("integrate: ParetoLoRA's DDP communication hook failed in the last backward") from state.error
        if not state.done or state.pending:
            raise RuntimeError("integrate: the DDP backward has not finished reducing its buckets")
        state.release()
        self._cur = None
        return state.unit_stats, state.group_stats, state.coeffs, state.cases


def _wait_event(event) -> None:
    # CUDA callbacks run on pool streams; later callbacks read earlier buckets' tensors.
    if event is not None:
        torch.cuda.current_stream().wait_event(event)


def _record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


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

    def bind(self, layout: GradLayout, text_views, image_views, backend: str, rule_fn) -> None:
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
