"""K objectives under FSDP2 (``fully_shard``): K reduce-scattered backwards into local shard
buffers, one all-reduce of the per-unit Gram table (with the losses), then the weighting and the
combine locally on the shards.

Each Gram entry g_i . g_j is a sum over elements, and the ranks' shards partition the elements
of the (already averaged) reduce-scattered gradients, so the ranks' local Grams add up to the
global one exactly (zero padding adds nothing): here, unlike DDP, the statistics may be reduced
instead of the gradients, because FSDP has averaged the gradients already. The all-reduce is
the launch boundary, as in :mod:`.fsdp` (two objectives). The first K - 1 backwards run with
``reshard_after_backward`` off, so the later ones reuse the unsharded parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..flat import FlatGrads, GradLayout, local_layout
from ..ops_many import gram
from ..result import MultiResult
from .fsdp import _local, _shard_group, is_fsdp2, reshard_flags, settle_or_poison
from .multi import ManyRule, ManySettle, integrate_buffers

__all__ = ["FSDPManySync"]


class FSDPManySync:
    """The K-objective sync contract for an FSDP2 model (see the module docstring)."""

    saves_mid_window = True  # each rank's shard buffers hold its whole window

    def __init__(self, model: nn.Module):
        self.module = model
        self.fsdp_modules = [m for m in model.modules() if is_fsdp2(m)]

    def layout_for(self, layout: GradLayout) -> GradLayout:
        return local_layout(layout)

    def bind(self, layout: GradLayout, grads: Sequence[FlatGrads], objectives: Sequence[str], backend: str) -> None:
        self.layout, self.grads, self.objectives, self.backend = layout, tuple(grads), tuple(objectives), backend
        self.group = _shard_group(layout.params)
        self.world = dist.get_world_size(self.group)

    def reattach(self) -> None:
        pass  # .grad is written in finish(); between steps it is not a view of the buffers

    def _local_grads(self, k: int) -> list[torch.Tensor | None]:
        grads = [None if p.grad is None else _local(p.grad) for p in self.layout.params]
        if all(g is None for g in grads):
            raise RuntimeError(
                f"backward: the {self.objectives[k]} loss produced no sharded gradient: FSDP gradient sync is off "
                "(set_requires_gradient_sync(False)) or the loss does not depend on the trainable parameters. For "
                "accumulation use pl.accumulate() with gradient sync left on: the objectives must be reduced separately")
        return grads

    def backward(self, losses: Sequence[torch.Tensor], first: bool) -> None:
        # FSDP2 computes with unsharded copies of the parameters, so autograd.grad cannot target
        # them: every objective takes an ordinary backward. Each one's local shards are kept aside
        # and added into the buffers only once all K exist; a failure restores .grad.
        params, k = self.layout.params, len(losses)
        saved = [p.grad for p in params]
        flags = reshard_flags(self.fsdp_modules)
        taken = []
        try:
            for m in self.fsdp_modules:
                m.set_reshard_after_backward(False, recurse=False)
            for j, loss in enumerate(losses):
                for p in params:
                    p.grad = None
                if j == k - 1:  # the last backward frees the unsharded parameters as configured
                    for m, f in zip(self.fsdp_modules, flags):
                        m.set_reshard_after_backward(f, recurse=False)
                loss.backward(retain_graph=j < k - 1)
                taken.append(self._local_grads(j))
        except BaseException:
            # An earlier backward left the parameters unsharded (reshard_after_backward off): reshard
            # them, else the module keeps exposing the unsharded ones.
            for m in self.fsdp_modules:
                m.reshard()
            for p, g in zip(params, saved):
                p.grad = g
            raise
        finally:
            for m, f in zip(self.fsdp_modules, flags):
                m.set_reshard_after_backward(f, recurse=False)
        for buf, g in zip(self.grads, taken):
            buf.accumulate(g, first)

    def _global_gram(self, running: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's per-unit Gram rows (buckets added in bucket order), all-reduced together with
        the running losses in one collective; returns (global Gram rows, global mean losses)."""
        local = None
        for b, bucket in enumerate(self.layout.buckets):
            s = gram([g.flats[b] for g in self.grads], bucket.unit_offsets, backend=self.backend)
            local = s if local is None else local + s
        packed = torch.cat([local.reshape(-1).to(torch.float64), running.to(torch.float64)])
        dist.all_reduce(packed, group=self.group)
        return packed[: local.numel()].view_as(local).clone(), packed[local.numel():] / self.world

    def finish(self, running: torch.Tensor, rule: ManyRule, settle: ManySettle) -> tuple[MultiResult, torch.Tensor]:
        # Global statistics and losses first, so that every rank takes the same branch in settle.
        stats, global_losses = self._global_gram(running)
        poison = settle_or_poison(settle, global_losses, self.layout.params)  # refused: .grad NaN, as under DDP
        res = integrate_buffers(self.grads, self.layout, rule, poison, self.backend, stats=stats)
        with torch.no_grad():
            for p, v in zip(self.layout.params, self.grads[-1].views):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).copy_(v)
        return res, global_losses
