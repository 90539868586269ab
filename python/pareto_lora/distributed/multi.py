"""K objectives (issue 29): the sync contract of :class:`pareto_lora.training.multi_objective.MultiObjectiveLoRA`,
for one process and for DDP (FSDP2: :mod:`.multi_fsdp`; :func:`.select.make_many_sync` picks).

Every rank must end a step with the integration a single process computes from the gradients
of the global-batch losses. The weightings are not linear in the gradients, and the Gram of the
averaged gradients is not the average of the per-rank Grams, so each of the K gradient buffers
is averaged across ranks *before* the Gram is taken, as the two-objective path does for its two.

DDP: the first K - 1 gradients are taken with ``torch.autograd.grad`` (DDP's reducer never sees
them) into their buffers, and the last objective's ordinary ``.backward()`` drives DDP's buckets,
into ``.grad`` = the last buffer (with a zero term on every parameter only the others reach, so
that DDP's reduction covers them too). A communication hook packs, for each bucket, the bucket's views
of all K buffers into one tensor and all-reduces it once (K x LoRA gradient bytes per step),
overlapping with the rest of the backward, and writes the averages back into the K buffers.
Averaging is elementwise, so the order in which buckets arrive does not matter, and the
all-reduce returns the same bits on every rank. The integration (Gram per unit -> weighting per
group -> combine, :func:`pareto_lora.ops_many.integrate_many`) then runs after the backward, in
``finish``, on the averaged buffers: the single-process code on identical inputs, deterministic,
hence ranks bitwise equal. (Unlike the two-objective hook it does not integrate inside the hook:
one integration per step on whole buffers, no per-bucket bookkeeping.) The K running losses are
averaged by one small all-reduce in ``finish``, so every rank reports and settles the global loss.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..flat import FlatGrads, GradLayout, is_lora_param
from ..flat.step import python_rule_per_unit
from ..ops_many import combine_many, gram, integrate_many
from ..result import MultiResult
from ..rules import RuleSpec
from .. import args
from .ddp_state import refuse_unsupported
from .sync import SyncFailure, _reaches, window_lost
from .traversal import batched_many, batched_pays, checkpointing_modules, replay

__all__ = ["ManySync", "LocalManySync", "DDPManySync", "ManySettle", "ManyRule", "integrate_buffers",
           "set_many_traversal"]

#: the traversals of the K-objective step (:mod:`.traversal`); FSDP2 takes two passes (K passes) only
MANY_TRAVERSALS = ("auto", "two_pass", "batched")


def set_many_traversal(sync, traversal: str) -> None:
    """``ParetoLoRA(objectives=..., traversal=)``, validated before the sync is bound: "auto",
    "two_pass" (K passes) or "batched" (one process and DDP: :func:`~.traversal.batched_many`)."""
    args.choice("traversal", traversal, MANY_TRAVERSALS)
    if traversal == "batched" and not isinstance(sync, LocalManySync):
        raise ValueError("traversal: expected 'auto' or 'two_pass' with K objectives under FSDP2, got 'batched' "
                         "(not built there: the two-objective FSDP2 step's reduction outside FSDP2 takes two objectives)")
    sync.traversal = traversal


#: ``settle(global_losses) -> poison``: the owner's verdict on the step's (global) accumulated
#: losses, called once per step before the integration: a 0-d bool tensor (poison), None, or raises.
ManySettle = Callable[[torch.Tensor], "torch.Tensor | None"]


class ManyRule(Protocol):
    """The owner's rule as the step reads it, at every step (the K-objective :class:`pareto_lora.flat.StepRule`)."""

    #: the K-objective rule (a RuleSpec or a user weighting): runs inside ``integrate_many`` when python_rule is None
    spec: RuleSpec | Callable[[torch.Tensor], torch.Tensor]

    @property
    def python_rule(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """group Gram rows [G, K(K+1)/2] float64 -> (weights [G, K], cases [G]) where the owner needs the
        statistics first (stats_ema, preserve_norm); None: ``spec`` runs inside ``integrate_many``."""
        ...


class ManySync(Protocol):
    """What :class:`~pareto_lora.training.multi_objective.MultiObjectiveLoRA` needs from one process,
    DDP and FSDP2 alike (the K-objective counterpart of :class:`.sync.GradSync`)."""

    #: the module whose trainable parameters are laid out (the model inside any wrapper)
    module: nn.Module
    #: whether the buffers between backward() calls are the whole state of a window (checkpoints)
    saves_mid_window: bool

    def layout_for(self, layout: GradLayout) -> GradLayout:
        """The layout of this process's buffers (FSDP2: local shards)."""
        ...

    def bind(self, layout: GradLayout, grads: Sequence[FlatGrads], objectives: Sequence[str], backend: str) -> None:
        """Called once, with the K buffers (in objective order) and the objectives' names."""
        ...

    def backward(self, losses: Sequence[torch.Tensor], first: bool) -> None:
        """Backpropagate the K losses of one forward pass into the buffers (``first``: a new window).
        Raises before anything changes, or SyncFailure once the window is lost."""
        ...

    def reattach(self) -> None:
        """``.grad`` as the buffers after a checkpoint was loaded into them."""
        ...

    def finish(self, running: torch.Tensor, rule: ManyRule, settle: ManySettle) -> tuple[MultiResult, torch.Tensor]:
        """The window's (global) losses settled, then integrated into ``.grad``: (result, the losses)."""
        ...


def integrate_buffers(grads: Sequence[FlatGrads], layout: GradLayout, rule: ManyRule, poison, backend: str,
                      stats: torch.Tensor | None = None) -> MultiResult:
    """``integrate_many`` over every bucket (dtype) of `layout`, the result into the last buffer.

    A group may span dtypes: then every bucket's launch gets the same per-unit Gram totals (given
    ``stats``, or the buckets' Grams added in bucket order). Returns the first bucket's result
    (statistics, weights and cases are those of every bucket). A ``rule.python_rule``: the Gram
    launches, the group sums (the op's order), the Python rule once, one ``combine_many`` per bucket."""
    flats = [[g.flats[b] for g in grads] for b in range(len(layout.buckets))]
    offsets = [b.unit_offsets for b in layout.buckets]
    fn = rule.python_rule
    if stats is None and (len(flats) > 1 or fn is not None):
        for f, off in zip(flats, offsets):
            s = gram(f, off, backend=backend)
            stats = s if stats is None else stats + s
    if fn is None:
        res = [integrate_many(f, off, rule.spec, out=f[-1], active=layout.active, groups=layout.group_offsets,
                              poison=poison, stats=stats, backend=backend) for f, off in zip(flats, offsets)]
        return res[0]
    stats = stats.to(torch.float64)
    group_stats, weights, cases, unit_weights = python_rule_per_unit(fn, stats, layout, poison)
    for f, off in zip(flats, offsets):
        combine_many(f, off, unit_weights, out=f[-1], backend=backend)
    return MultiResult(flats[0][-1], stats, group_stats, weights, cases)


class LocalManySync:
    """One process: the K gradients by ``torch.autograd.grad`` (K passes, the first K - 1 keeping the
    graph), added into their buffers only once all K exist: a failed backward changes nothing."""

    saves_mid_window = True

    def __init__(self, model: nn.Module):
        self.module = model
        self.traversal = "auto"  # set_many_traversal
        self.last_traversal: str | None = None  # the one the last successful backward took

    def layout_for(self, layout: GradLayout) -> GradLayout:
        return layout

    def bind(self, layout: GradLayout, grads: Sequence[FlatGrads], objectives: Sequence[str], backend: str) -> None:
        self.layout, self.grads, self.objectives, self.backend = layout, tuple(grads), tuple(objectives), backend
        self._lora = [i for i, n in enumerate(layout.names) if is_lora_param(n)]
        self._lora_ids = {id(layout.params[i]) for i in self._lora}
        self._checkpointing = checkpointing_modules(self.module)

    def choose_traversal(self, losses: Sequence[torch.Tensor]) -> str:
        """"auto" resolved as for two objectives: "batched" under non-reentrant checkpointing."""
        if self.traversal != "auto":
            return self.traversal
        return "batched" if batched_pays(self._checkpointing, *losses) else "two_pass"

    def _batched(self, losses: Sequence[torch.Tensor]) -> list:
        """The K gradients in one traversal, after the checks (each loss reaches a LoRA parameter)."""
        for k, loss in enumerate(losses):
            if not _reaches(loss, self._lora_ids):
                raise ValueError(f"{self.objectives[k]}: the loss does not depend on any trainable LoRA parameter of this model")
        return batched_many(losses, self.layout.params)

    def reattach(self) -> None:
        """``.grad`` views the last buffer again (after a checkpoint's buffers were loaded)."""
        self.grads[-1].attach_as_grad(self.layout.params)

    def _grad(self, k: int, loss: torch.Tensor, retain: bool) -> tuple:
        g = torch.autograd.grad(loss, self.layout.params, retain_graph=retain, allow_unused=True)
        if not any(g[i] is not None for i in self._lora):
            raise ValueError(f"{self.objectives[k]}: the loss does not depend on any trainable LoRA parameter of this model")
        return g

    def backward(self, losses: Sequence[torch.Tensor], first: bool) -> None:
        """Backpropagate the K (scaled) losses of one forward pass into the K buffers."""
        params, out = self.layout.params, self.grads[-1]
        if not first:
            out.check_attached(params)
        how = self.choose_traversal(losses)
        if how == "batched":
            grads = self._batched(losses)
        else:
            grads = [self._grad(k, loss, k < len(losses) - 1) for k, loss in enumerate(losses)]
        # All K gradients exist: from here on nothing can fail half-way.
        for buf, g in zip(self.grads, grads):
            buf.accumulate(g, first)
        out.attach_as_grad(params)
        self.last_traversal = how

    def finish(self, running: torch.Tensor, rule: ManyRule, settle: ManySettle) -> tuple[MultiResult, torch.Tensor]:
        """Integrate the accumulated buffers into ``.grad``; returns (result, the step's losses)."""
        poison = settle(running)
        res = integrate_buffers(self.grads, self.layout, rule, poison, self.backend)
        self.grads[-1].attach_as_grad(self.layout.params)  # even if a zero_grad() detached them
        return res, running


def _ddp_many_hook(state, bucket):
    # Unannotated on purpose: DDP checks hook annotations by identity (see ddp._ddp_comm_hook).
    return state.reduce_bucket(bucket)


class DDPManySync(LocalManySync):
    """K objectives under DDP: a communication hook averages all K buffers bucket by bucket; the
    integration runs once the backward is done (see the module docstring)."""

    saves_mid_window = False  # a checkpoint mid-window would hold this rank's un-averaged part only

    def __init__(self, ddp: nn.Module):
        refuse_unsupported(ddp)  # the two-objective hook's refusals: bucket views, static_graph, another hook
        super().__init__(ddp.module)
        self.ddp, self.group = ddp, ddp.process_group
        self.world = dist.get_world_size(self.group)
        self._plans: dict[tuple[int, ...], tuple[list[torch.Tensor], list[int]]] = {}
        self._lock = threading.Lock()  # gloo and NCCL run completion callbacks on their own threads
        # Buckets of the last backward whose reduction finished, and how many it had (known once the
        # bucket flagged is_last() reaches the hook; DDP launches its buckets in index order).
        self._arrived, self._num_buckets = 0, None
        self._error: BaseException | None = None

    def bind(self, layout: GradLayout, grads: Sequence[FlatGrads], objectives: Sequence[str], backend: str) -> None:
        super().bind(layout, grads, objectives, backend)
        ignored = set(getattr(self.ddp, "parameters_to_ignore", ()) or ())
        skipped = [n for n in layout.names if n in ignored]
        if skipped:
            raise ValueError(f"model: DDP ignores trainable parameters ParetoLoRA integrates ({', '.join(skipped[:3])}); "
                             "their gradients would never be averaged")
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        try:
            self.ddp.register_comm_hook(self, _ddp_many_hook)
        except RuntimeError as e:  # the reducer accepts one hook (a builtin one included)
            raise ValueError(f"model: cannot register ParetoLoRA's DDP communication hook: {e}") from e

    # -- the hook ---------------------------------------------------------------------------
    def _plan(self, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """The bucket's views of the K buffers, objective-major, in bucket order; their sizes.
        Keyed by the parameters, not bucket.index(): DDP rebuilds its buckets after step 1."""
        key = tuple(id(p) for p in params)
        plan = self._plans.get(key)
        if plan is None:
            try:
                idx = [self._index[id(p)] for p in params]
            except KeyError:
                raise RuntimeError("DDP bucket holds a parameter ParetoLoRA does not know (trainable parameters "
                                   "changed after ParetoLoRA was created?)") from None
            views = [g.views[i] for g in self.grads for i in idx]
            plan = self._plans[key] = (views, [v.numel() for v in views])
        return plan

    @property
    def synced(self) -> bool:
        """Whether the last backward averaged every bucket (it ran outside ``no_sync()``)."""
        return self._num_buckets is not None and self._arrived == self._num_buckets

    def reduce_bucket(self, bucket):
        buf = bucket.buffer()
        if bucket.is_last():
            with self._lock:
                self._num_buckets = bucket.index() + 1
        views, sizes = self._plan(bucket.parameters())
        # .grad (the last buffer's views) holds what DDP copied into the bucket; packing the views
        # rather than the bucket also averages a parameter DDP found unused in this backward.
        packed = torch.cat([v.reshape(-1) for v in views]).div_(self.world)
        fut = dist.all_reduce(packed, group=self.group, async_op=True).get_future()

        def arrive(f):
            try:
                red = f.value()[0]
                with torch.no_grad():
                    torch._foreach_copy_(views, [x.view_as(v) for x, v in zip(red.split(sizes), views)])
                    buf.copy_(red[red.numel() - buf.numel():])  # the last objective: what DDP copies to .grad
                with self._lock:
                    self._arrived += 1
                return buf
            except BaseException as e:  # noqa: BLE001 - DDP cannot unwrap a Python exception (see ddp.py)
                self._fail(e)
                return buf.fill_(math.nan)  # backward() raises the recorded error once DDP has finished

        return fut.then(arrive)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = e

    # -- MultiObjectiveLoRA's side -----------------------------------------------------------
    def backward(self, losses: Sequence[torch.Tensor], first: bool) -> None:
        # The last objective must go through an ordinary backward (DDP's hook runs only there), and
        # the hook packs the other buffers with each bucket: they are accumulated first. Every check
        # and the K - 1 autograd.grad passes come before anything changes.
        params, out, k = self.layout.params, self.grads[-1], len(losses)
        if not first:
            out.check_attached(params)
        how, last = self.choose_traversal(losses), None
        if how == "batched":  # all K in one traversal; the last one reaches DDP's hook by a replay
            *grads, last = self._batched(losses)
        elif not _reaches(losses[-1], self._lora_ids):
            raise ValueError(f"{self.objectives[-1]}: the loss does not depend on any trainable LoRA parameter of this model")
        else:
            grads = [self._grad(j, losses[j], True) for j in range(k - 1)]
        # DDP waits for every parameter the forward used; the last objective need not reach them all
        # (Janus: "text" never reaches the image projector). A zero term on each parameter another
        # objective reached fires its DDP hook in this backward; autograd runs each parameter's
        # accumulation once per backward, so a parameter reached both ways is not marked twice,
        # and the gradient of p * 0 is exactly zero, so .grad is unchanged.
        reached = [p for i, p in enumerate(params) if any(g[i] is not None for g in grads)]
        if last is None:
            driver = losses[-1] + sum((p * 0).sum() for p in reached) if reached else losses[-1]
        else:  # the replay's zero for a parameter only the others reached, as the zero term gives
            ids = {id(p) for p in reached}
            last = [torch.zeros_like(p) if g is None and id(p) in ids else g for p, g in zip(params, last)]
        try:
            if first:
                out.zero_()
            out.attach_as_grad(params)
            for buf, g in zip(self.grads, grads):
                buf.accumulate(g, first)
            del grads
            self._arrived, self._num_buckets, self._error = 0, None, None
            if last is None:
                driver.backward()
            else:
                replay(params, last)
        except BaseException as e:  # noqa: BLE001 - the buffers are half-written: the window is lost
            raise window_lost(e) from e
        if self._error is not None:
            e, self._error = self._error, None
            for buf in self.grads:  # DDP finished the step with NaN buckets; the accumulation is lost
                buf.fill_(math.nan)
            err = SyncFailure(f"backward: ParetoLoRA's DDP communication hook failed: {type(e).__name__}: {e}")
            raise err from e
        self.last_traversal = how

    def finish(self, running: torch.Tensor, rule: ManyRule, settle: ManySettle) -> tuple[MultiResult, torch.Tensor]:
        if not self.synced:
            raise RuntimeError("integrate_accumulated: the last backward ran without DDP gradient synchronisation of every "
                               "bucket (inside ddp.no_sync()?); run the last micro-batch of an accumulated step outside "
                               "no_sync() so every objective is averaged")
        # Sums of per-rank means, over ranks: the global batch's mean losses (a non-finite one stays so).
        global_losses = running.to(torch.float64, copy=True)
        dist.all_reduce(global_losses, group=self.group)
        global_losses /= self.world
        try:
            poison = settle(global_losses)
        except BaseException:
            # A refused step (on_nonfinite="raise"): .grad holds the averaged last objective. As on
            # the two-objective DDP path it is left NaN, so that an optimizer step after a caught
            # exception cannot apply it (every rank settles the same global losses: all alike).
            for buf in self.grads:
                buf.fill_(math.nan)
            self._num_buckets = None
            raise
        res = integrate_buffers(self.grads, self.layout, rule, poison, self.backend)
        self.grads[-1].attach_as_grad(self.layout.params)
        self._num_buckets = None  # the next step needs its own synchronised backward
        return res, global_losses

