"""DDP: ParetoLoRA's communication hook, which averages both objectives and integrates them
inside DDP's gradient buckets.

DDP reduces gradients only in the first backward after a forward; a second backward on the
same graph (text loss, then image loss) is silently left un-reduced. So the text gradient is
taken with ``torch.autograd.grad`` (no DDP reduction) into the text buffer
(:class:`~pareto_lora.distributed.sync.LocalSync`, which this class extends), and the ordinary
image backward drives DDP's buckets. With ``traversal="batched"`` (what ``"auto"`` takes under
activation checkpointing) both gradients come from one batched ``autograd.grad``, and the image
one reaches DDP through a *replay*, a backward whose roots are the parameters themselves
(:func:`~pareto_lora.distributed.traversal.replay`): only their ``AccumulateGrad`` nodes run, so
DDP's hooks, buckets, ``no_sync`` accumulation and ``find_unused_parameters`` work as after the
image backward, with the same ``.grad`` bitwise; the reductions then follow the traversal
instead of overlapping it.

The whole integration runs inside the hook, overlapping with the rest of the backward. For
each bucket the hook packs the matching slice of the text buffer and the bucket's image
gradient, ``[text | image]``, into one buffer and all-reduces it once (2 x LoRA gradient bytes
per step in all). It returns its own future, which DDP waits for only at the end of the
backward. When a bucket's reduction finishes, its callback integrates what it can:

* a **whole bucket** (every group it touches lies wholly in it, e.g. one bucket holding all
  LoRA gradients: ``DistributedDataParallel(..., bucket_cap_mb=...)`` at least their size) with
  a kernel rule: one fused launch (unit statistics, group sum, rule, combine), and its future is
  completed at once;
* otherwise a group spans buckets (DDP cuts buckets by bytes, not by groups, and re-buckets
  after the first step in gradient-ready order): the callback runs a statistics launch and
  counts, per unit, how many elements have been reduced. Completeness is decided by this
  coverage count, never by bucket indices. When a group's units are all covered its statistics
  are final; every pending bucket whose groups are all final is then integrated by one fused
  launch with those statistics given (``stats=``: rule + combine) and its future completed. The
  last bucket completes every remaining group. A Python rule (``preserve_norm``) runs between
  the statistics and a combine launch instead.

Ranks finish their reductions in different orders, yet they must end with bitwise-identical
gradients. Each unit's statistics are therefore summed over the buckets holding it in one fixed
order (by the bucket's first parameter in the layout), never in arrival order. The rule and
combine kernels are deterministic, so identical inputs give identical outputs.

The reduced (un-integrated) averages stay alive until the step finishes. If another micro-batch
of the same step follows a synchronised backward, they are put back into the buffers
(:meth:`DDPSync.restore_reduced`) so that accumulation continues from them. The losses ride in
the last bucket, so only ``finish`` learns whether the global loss was finite; then the
already-integrated ``.grad`` is poisoned with NaN (or the owner raises).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..backends import resolve_backend
from ..flat import FlatGrads, FlatStep, GradLayout, StepRule
from ..flat.step import poison_cases
from ..reference import group_sums
from .ddp_state import Arrival, BackwardState, BucketPlan, plan_bucket, record_event, refuse_unsupported, wait_event
from .sync import LocalSync, Settle, SyncFailure, window_lost
from .traversal import batched, replay, sum_first_not_built

__all__ = ["DDPSync", "one_bucket_cap_mb"]


def one_bucket_cap_mb(model: nn.Module) -> float:
    """A ``bucket_cap_mb`` for ``DistributedDataParallel(model, bucket_cap_mb=...)`` that puts every
    trainable gradient in one DDP bucket: then every LoRA group is whole in it and the hook
    integrates a step with one fused launch (docs/training_path.md). DDP cuts buckets by bytes
    and cannot be re-cut once built, so this is chosen before wrapping the model."""
    if not isinstance(model, nn.Module) or isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("model: expected the module to wrap (not yet a DistributedDataParallel)")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return max(nbytes, 1) / 2**20 * 1.01 + 0.01  # a margin over the exact size: DDP compares bytes >= cap


def _ddp_comm_hook(state, bucket):
    # Unannotated on purpose: DDP checks hook annotations by identity, which postponed
    # (string) annotations would fail.
    return state.reduce_bucket(bucket)


class DDPSync(LocalSync):
    """Averages both objectives and integrates them inside DDP's gradient buckets (see the module docstring).

    ``trace`` lists, for the last synchronised backward and in the order the reductions
    finished, ``(bucket key, groups completed, buckets integrated)``; ``bucket key`` is the
    smallest layout position of the bucket's parameters.
    """

    saves_mid_window = False  # the reduced averages of a window live in the hook's state
    calls_rule_once = False  # the rule runs each time a set of groups completes
    kind = "DDP"
    refused_traversals = {"sum_first": sum_first_not_built(kind)}

    def __init__(self, ddp: nn.Module):
        refuse_unsupported(ddp)
        super().__init__(ddp.module)
        self.ddp = ddp
        self.group = ddp.process_group
        self.world = dist.get_world_size(self.group)
        self._plans: dict[tuple[int, ...], BucketPlan] = {}
        self._losses: torch.Tensor | None = None
        self._cur: BackwardState | None = None
        self._last: BackwardState | None = None  # for `trace`, kept after integrate()
        # gloo and NCCL run completion callbacks on their own threads, several at a time.
        self._lock = threading.Lock()

    def bind(self, layout: GradLayout, text: FlatGrads, image: FlatGrads, rule: StepRule, backend: str) -> None:
        super().bind(layout, text, image, rule, backend)
        self._impl = resolve_backend(backend, layout.device)
        ignored = getattr(self.ddp, "parameters_to_ignore", ()) or ()
        skipped = [n for n in layout.names if n in ignored]
        if skipped:
            raise ValueError(
                f"model: DDP ignores trainable parameters ParetoLoRA integrates ({', '.join(skipped[:3])}); their "
                "gradients would never be averaged, so their groups could not be integrated in the hook"
            )
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        num_units, num_groups, dev = layout.num_units, layout.num_groups, layout.device
        self._unit_size = [0] * num_units
        for p, u in zip(layout.params, layout.param_unit):
            self._unit_size[u] += p.numel()
        unit_group = layout.unit_group.tolist()
        self._group_units = [[u for u in range(num_units) if unit_group[u] == g] for g in range(num_groups)]
        self._group_onehot = list(torch.eye(num_groups, dtype=torch.bool, device=dev))
        self._group_unit_mask = list(layout.unit_group[None, :] == torch.arange(num_groups, device=dev)[:, None])
        try:
            self.ddp.register_comm_hook(self, _ddp_comm_hook)
        except RuntimeError as e:  # the reducer accepts one hook (a builtin one included)
            raise ValueError(f"model: cannot register ParetoLoRA's DDP communication hook: {e}") from e

    @property
    def trace(self) -> list[tuple[int, tuple[int, ...], int]]:
        return list(self._last.trace) if self._last is not None else []

    # -- the hook ---------------------------------------------------------------------------
    def _plan(self, params: Sequence[torch.Tensor]) -> BucketPlan:
        # Keyed by the parameters, not bucket.index(): DDP rebuilds its buckets after step 1.
        key = tuple(id(p) for p in params)
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_bucket(params, self.layout, self._index, self.text.views, self.image.views, self._unit_size)
            self._plans[key] = plan
        return plan

    def _backward_state(self) -> BackwardState:
        # A backward not started by ParetoLoRA (no before_backward) still gets fresh state.
        if self._cur is None or self._cur.done:
            lay = self.layout
            self._cur = self._last = BackwardState(lay.num_units, lay.num_groups, lay.device)
        return self._cur

    def reduce_bucket(self, bucket):
        buf = bucket.buffer()
        grads = bucket.gradients()
        plan = self._plan(bucket.parameters())
        image = [grads[j] for j in plan.order]
        parts = [t.reshape(-1) for t in plan.text_views] + [g.reshape(-1) for g in image]  # (text, image)
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

    def _arrive(self, state: BackwardState, f, plan, image, carry, buf, result) -> None:
        """All-reduce callback: record the bucket, finish the groups it completes, integrate what is ready."""
        ready: list[Arrival] = []
        failed: list[tuple[torch.futures.Future, torch.Tensor]] = []
        with self._lock:
            state.count += 1
            if state.error is not None:
                failed.append((result, buf))
            else:
                try:
                    wait_event(state.event)
                    red = f.value()[0]
                    n = buf.numel()
                    if carry is not None:
                        carry.copy_(red[2 * n :])
                    red = red[: 2 * n]
                    arrival = self._first_launch(state, plan, red, image, result, buf)
                    state.arrived[plan.key] = arrival
                    state.pending.append(arrival)
                    for u, c in plan.unit_counts.items():
                        state.covered[u] += c
                    # a whole bucket's groups were completed (rule included) by its fused launch
                    fused = sorted(plan.groups) if arrival.mixed is not None else []
                    completed = self._completed_groups(state)
                    if completed:
                        self._finish_groups(state, completed)
                    ready = self._integrate_ready(state)
                    state.trace.append((plan.key, tuple(fused + completed), len(ready)))
                    state.event = record_event(buf.device)
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

    def _first_launch(self, state: BackwardState, plan, red, image, result, buf) -> Arrival:
        """A whole bucket under a kernel rule: the fused launch, final at once. Else: its statistics."""
        n = red.numel() // 2
        lay = self.layout
        if plan.whole and self.rule.python_rule is None:
            res = self._impl.integrate(red[:n], red[n:], plan.unit_offsets, None, self.rule.spec, active=lay.active,
                                       groups=lay.group_offsets)
            self._store(state, plan, res)
            state.unit_stats = torch.where(plan.unit_mask[:, None], res.stats, state.unit_stats)
            for g in plan.groups:
                state.group_done[g] = True
            return Arrival(plan, red, image, res.stats, result, buf, mixed=res.out)
        row = self._impl.segment_stats(red[:n], red[n:], plan.unit_offsets)
        return Arrival(plan, red, image, row, result, buf)

    @staticmethod
    def _store(state: BackwardState, plan, res) -> None:
        """A fused launch's group statistics, coefficients and cases, for the bucket's groups only."""
        m = plan.group_mask
        state.group_stats = torch.where(m[:, None], res.group_stats, state.group_stats)
        state.coeffs = torch.where(m[:, None], res.coeffs, state.coeffs)
        state.cases = torch.where(m, res.cases, state.cases)

    def _completed_groups(self, state: BackwardState) -> list[int]:
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

    def _finish_groups(self, state: BackwardState, completed: list[int]) -> None:
        """Final unit statistics of the groups that just became complete (and a Python rule's coefficients)."""
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
        for g in completed:
            state.group_done[g] = True
        fn = self.rule.python_rule
        if fn is None:
            return  # the fused launches of the ready buckets run the rule (_integrate_ready)
        group_stats = group_sums(state.unit_stats, self.layout.group_offsets)
        state.group_stats = torch.where(gmask[:, None], group_stats, state.group_stats)
        coeffs, cases = fn(state.group_stats)
        state.coeffs = torch.where(gmask[:, None], coeffs, state.coeffs)
        state.cases = torch.where(gmask, cases, state.cases)
        state.unit_coeffs = state.coeffs[self.layout.unit_group]

    def _integrate_ready(self, state: BackwardState) -> list[Arrival]:
        """Integrate every pending bucket whose groups are all final into its gradient views."""
        ready = [a for a in state.pending if all(state.group_done[g] for g in a.plan.groups)]
        lay = self.layout
        for a in ready:
            if a.mixed is None and self.rule.python_rule is None:
                # Every unit of the bucket's groups is final in state.unit_stats: rule + combine.
                res = self._impl.integrate(a.text, a.image, a.plan.unit_offsets, None, self.rule.spec,
                                           active=lay.active, groups=lay.group_offsets, stats=state.unit_stats)
                self._store(state, a.plan, res)
                a.mixed = res.out
            elif a.mixed is None:
                a.mixed = self._impl.combine(a.text, a.image, a.plan.unit_offsets, state.unit_coeffs)
            torch._foreach_copy_(a.grads, [x.view_as(g) for x, g in zip(a.mixed.split(a.plan.sizes), a.grads)])
            a.mixed = None  # the gradient views hold it now
        state.pending = [a for a in state.pending if a not in ready]
        return ready

    # -- ParetoLoRA's side ------------------------------------------------------------------
    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, losses: torch.Tensor) -> None:
        # The image objective must reach DDP's hooks through an ordinary backward, and the hook
        # packs the text buffer with each bucket: the text is accumulated first. Both gradients
        # are taken before anything changes (a failed traversal leaves every buffer as it was).
        how = self.choose_traversal(text_loss, image_loss)
        params = self.layout.params
        if how == "batched":
            self._check(text_loss, image_loss, first, text_too=True)
            text, image = batched(text_loss, image_loss, params)
        else:
            text, image = self.text_grads(text_loss, image_loss, first), None
        try:
            if first:
                self.image.zero_()
            self.image.attach_as_grad(params)
            if not first:
                self.restore_reduced()
            self.text.accumulate(text, first)
            del text
            # The running loss totals ride in the last bucket: the hook makes them global in place.
            self._cur = None
            self._losses = losses
            if image is None:
                image_loss.backward()
            else:
                replay(params, image)
        except BaseException as e:  # noqa: BLE001 - the buffers are half-written: the window is lost
            raise window_lost(e) from e
        error = self.failure()
        if error is not None:
            # DDP has finished the step with NaN buckets; the accumulation is lost.
            self.image.fill_(math.nan)
            raise error
        self.last_traversal = how

    def failure(self) -> SyncFailure | None:
        """The error of a hook that failed in the last backward (once), else None."""
        state = self._cur
        if state is None or state.error is None:
            return None
        self._cur = None
        e = state.error
        err = SyncFailure(f"backward: ParetoLoRA's DDP communication hook failed: {type(e).__name__}: {e}")
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

    def finish(self, losses: torch.Tensor, settle: Settle) -> FlatStep:
        """The hook's integration (already in ``.grad``), poisoned afterwards if a global loss is not finite."""
        state = self._cur
        if state is None:
            raise RuntimeError(
                "integrate_accumulated: the last backward ran without DDP gradient synchronisation (inside ddp.no_sync()?); "
                "run the last micro-batch of an accumulated step outside no_sync() so both objectives are averaged"
            )
        if state.error is not None:
            raise RuntimeError("integrate_accumulated: ParetoLoRA's DDP communication hook failed in the last backward") from state.error
        if not state.done or state.pending:
            raise RuntimeError("integrate_accumulated: the DDP backward has not finished reducing its buckets")
        state.release()
        self._cur = None
        step = FlatStep(state.unit_stats, state.group_stats, state.coeffs, state.cases)
        # The losses rode in the last bucket: they are the global ones now.
        poison = settle(losses, True)
        if poison is not None:
            # After the fact (the hook could not know the global losses): one more pass over
            # .grad, free of host syncs; NaN makes a GradScaler skip the step.
            factor = torch.where(poison, math.nan, 1.0)
            for flat in self.image.flats:
                flat.mul_(factor)
            step.cases = poison_cases(step.cases, poison)
        return step
