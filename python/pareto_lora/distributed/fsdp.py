"""FSDP2 (``fully_shard``): two reduce-scattered backwards into local shard buffers (or one
batched traversal reduce-scattered outside FSDP2, :mod:`.fsdp_traversal`), then one all-reduce
of the small statistics table, and the rule and combine run locally on the shards.

The statistics are sums, so the per-rank statistics of the shards add up to the global ones;
zero padding adds nothing. The all-reduce is the launch boundary: one statistics launch per
bucket before it, one fused launch per bucket after it, with the global statistics given
(``stats=``: group sum, rule and combine in the kernel; a Python rule runs between instead).
The text backward runs with ``reshard_after_backward`` off, so the image backward reuses the
unsharded parameters instead of all-gathering them again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..archs.spec import is_fsdp2
from ..flat import FlatGrads, FlatStep, GradLayout, StepRule, flat_step, local_layout, unit_stats
from .fsdp_traversal import Leaves, UnshardedCapture, nondefault_reduction, reduce_to_shards
from .sync import Settle, window_lost
from .traversal import batched, batched_pays, checkpointing_modules, sum_first_not_built

__all__ = ["FSDPSync", "is_fsdp2", "settle_or_poison"]  # is_fsdp2: archs.spec's, re-exported


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor
    return to_local() if callable(to_local) else t


def _shard_group(params: Sequence[torch.Tensor]):
    from torch.distributed.tensor import DTensor, Shard

    # Meshes compare by value: FSDP2 gives parameters of one module equal meshes that are not always
    # the same object (a Janus vision layer under the root's fully_shard), so identity would refuse them.
    p = params[0] if params else None
    if p is None or not all(isinstance(q, DTensor) and q.device_mesh == p.device_mesh for q in params):
        raise ValueError("model: expected every trainable parameter to be a DTensor on one device mesh (fully_shard)")
    dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(dims) != 1:
        raise ValueError(f"model: expected parameters sharded over one mesh dimension, got placements {p.placements}")
    return p.device_mesh.get_group(dims[0])


def settle_or_poison(settle, losses: torch.Tensor, params: Sequence[torch.Tensor], *args):
    """``settle(losses, *args)``; where it raises (a step refused by ``on_nonfinite="raise"``), every
    ``.grad`` of `params` is first left NaN on this rank's shards, then the error propagates.

    ``.grad`` then holds a gradient the step never integrated (two passes: FSDP2's last reduce-scatter;
    the batched traversal: whatever it held before the window), which an optimizer step after the
    caught exception would apply. As under DDP it is made NaN (one fill of the local shards) rather
    than restored: the two-pass backward has already replaced what it held before the window, and
    keeping that alive through every window would cost a gradient's shard. Every rank settles the
    same global losses, so every rank refuses, alike."""
    try:
        return settle(losses, *args)
    except BaseException:
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).fill_(math.nan)
        raise


def reshard_flags(fsdp_modules) -> list[bool]:
    """Each FSDP2 module's reshard_after_backward (the two-objective and the K-objective syncs set
    and restore it). No public getter; the default (True) is assumed where the private field is missing."""
    flags = []
    for m in fsdp_modules:
        pg = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        flags.append(getattr(pg, "reshard_after_backward", True))
    return flags


class FSDPSync:
    """The sync contract for an FSDP2 model (see the module docstring)."""

    saves_mid_window = True  # each rank's shard buffers hold its whole window
    calls_rule_once = True
    kind = "FSDP2"
    refused_traversals = {"sum_first": sum_first_not_built(kind)}

    def __init__(self, model: nn.Module):
        self.module = model
        self.fsdp_modules = [m for m in model.modules() if is_fsdp2(m)]
        self.traversal = "auto"  # set_traversal
        self.last_traversal: str | None = None

    def layout_for(self, layout: GradLayout) -> GradLayout:
        return local_layout(layout)

    def bind(self, layout: GradLayout, text: FlatGrads, image: FlatGrads, rule: StepRule, backend: str) -> None:
        self.layout, self.text, self.image, self.rule, self.backend = layout, text, image, rule, backend
        self.group = _shard_group(layout.params)
        self.world = dist.get_world_size(self.group)
        self._checkpointing = checkpointing_modules(self.module)
        self._capture = UnshardedCapture(self.module, layout.params)

    def choose_traversal(self, text_loss: torch.Tensor, image_loss: torch.Tensor):
        """("batched", the unsharded leaves) or ("two_pass", None); ``"auto"`` resolved as for one
        process, and only where the batched gradients reduce as FSDP2 would (:mod:`.fsdp_traversal`)."""
        if self.traversal == "two_pass" or (self.traversal == "auto" and not batched_pays(
                self._checkpointing, text_loss, image_loss)):
            return "two_pass", None
        why = nondefault_reduction(self.fsdp_modules)
        found = self._capture.leaves(self.layout.params) if why is None else Leaves.missing(
            f"FSDP2's default reduction, got {why}")
        if found.tensors is not None:
            return "batched", found.tensors
        if self.traversal == "batched":
            raise ValueError(f"traversal: 'batched' under FSDP2 expected {found.expected}")
        return "two_pass", None

    def backward(self, text_loss: torch.Tensor, image_loss: torch.Tensor, first: bool, losses: torch.Tensor) -> None:
        how, leaves = self.choose_traversal(text_loss, image_loss)
        if how == "batched":
            # Both gradients and their reduction before any buffer changes: a failure changes nothing.
            text, image = batched(text_loss, image_loss, leaves)
            for name, grads in (("text", text), ("image", image)):
                if all(g is None for g in grads):
                    raise ValueError(f"{name}: the loss does not depend on any trainable parameter of this model")
            shards = reduce_to_shards(text, image, self.layout.params, self.group)
            self.text.accumulate([s[0] for s in shards], first)
            self.image.accumulate([s[1] for s in shards], first)
            self.last_traversal = how
            return
        # Two passes: the registered parameters are sharded DTensors the graph does not use, so
        # each objective takes an ordinary backward (FSDP2 reduce-scatters what it accumulates).
        params = self.layout.params
        for p in params:
            p.grad = None
        flags = reshard_flags(self.fsdp_modules)
        for m in self.fsdp_modules:
            m.set_reshard_after_backward(False, recurse=False)
        try:
            text_loss.backward(retain_graph=True)
        finally:
            for m, f in zip(self.fsdp_modules, flags):
                m.set_reshard_after_backward(f, recurse=False)
        self._collect(self.text, first, "text")
        try:
            for p in params:
                p.grad = None
            image_loss.backward()
            self._collect(self.image, first, "image")
        except BaseException as e:  # noqa: BLE001 - the text buffer already holds this micro-batch
            raise window_lost(e) from e
        self.last_traversal = how

    def _collect(self, buffers: FlatGrads, first: bool, which: str) -> None:
        grads = [None if p.grad is None else _local(p.grad) for p in self.layout.params]
        if all(g is None for g in grads):
            raise RuntimeError(
                f"backward: the {which} loss produced no sharded gradient: FSDP gradient sync is off "
                "(set_requires_gradient_sync(False)) or the loss does not depend on the trainable parameters. "
                "For accumulation use pl.accumulate() with gradient sync left on: the two objectives must be "
                "reduced separately"
            )
        buffers.accumulate(grads, first)

    def _global_stats(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local per-unit stats of the shards, all-reduced together with the losses (one collective).

        Per unit rather than per group (U x 3 instead of G x 3 floats, a few hundred bytes) so
        that the per-layer diagnostics are global too.
        """
        pairs = [(a, b, bk.unit_offsets) for a, b, bk in zip(self.text.flats, self.image.flats, self.layout.buckets)]
        local = unit_stats(pairs, self.backend)
        packed = torch.cat([local.reshape(-1).to(torch.float64), losses.to(torch.float64)])
        dist.all_reduce(packed, group=self.group)
        stats = packed[: local.numel()].view_as(local).to(local.dtype)
        return stats, packed[local.numel() :] / self.world

    def finish(self, losses: torch.Tensor, settle: Settle) -> FlatStep:
        # Global statistics and losses first, so that every rank takes the same branch in settle.
        stats, global_losses = self._global_stats(losses)
        poison = settle_or_poison(settle, global_losses, self.layout.params, False)
        step = flat_step(
            self.text.flats, self.image.flats, self.layout, self.rule,
            poison=poison, backend=self.backend, stats_per_unit=stats,
        )
        with torch.no_grad():
            for p, v in zip(self.layout.params, self.image.views):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).copy_(v)
        return step
