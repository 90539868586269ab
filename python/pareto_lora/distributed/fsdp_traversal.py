"""FSDP2's one traversal: both objectives' gradients from one batched ``autograd.grad`` of the
unsharded parameters, then reduce-scattered to this rank's shards outside FSDP2.

Why outside: FSDP2 reduce-scatters only what an ordinary backward accumulates into the unsharded
parameters' ``.grad`` (its post-backward, once per layer), and ``autograd.grad`` accumulates
nothing. Its registered parameters are sharded ``DTensor``s that the forward never uses
(``autograd.grad`` of them: "The differentiated Tensor at index 0 appears to not have been used
in the graph"); the forward computes with unsharded plain ``Parameter``s, swapped into each
module while its forward runs. So:

* :class:`UnshardedCapture` records them with a forward pre-hook on every module that owns a
  trainable parameter (a hook runs inside the FSDP2 module's forward, after the swap);
* the batched traversal (:func:`~.traversal.batched`) targets those, which FSDP2's own hooks
  tolerate: its post-backward finds no ``.grad``, reduces nothing and reshards as usual;
* :func:`reduce_to_shards` averages each parameter's stacked (text, image) gradient over the
  ranks with ``DTensor.from_local(..., [Partial("avg")]).redistribute(mesh, placements)``:
  one reduce-scatter per parameter onto the sharded parameter's own placements (bitwise
  FSDP2's reduce-scatter on 2 gloo ranks, bench/RESULTS.md).

That matches FSDP2's reduction only under its default policy (no MixedPrecisionPolicy, no CPU
offload, gradient sync on, no hooks or divide factors). FSDP2 has no public getter for these,
so :func:`nondefault_reduction` reads them from its private state; a field it cannot read
counts as non-default, and the step then takes two passes (or ``traversal="batched"`` raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UnshardedCapture", "nondefault_reduction", "reduce_to_shards"]


class UnshardedCapture:
    """The tensors the last forward used for each of `params` (FSDP2: the unsharded parameters)."""

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]):
        index = {id(p): i for i, p in enumerate(params)}
        owned: dict[nn.Module, list[tuple[str, int]]] = {}
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in index:
                    owned.setdefault(module, []).append((name, index.pop(id(p))))
        self.seen: list[torch.Tensor | None] = [None] * len(params)
        self.handles = [m.register_forward_pre_hook(self._hook(names)) for m, names in owned.items()]

    def _hook(self, names):
        def record(module, args):
            # Runs again in a checkpointed segment's recomputation: the same objects there.
            for name, i in names:
                self.seen[i] = getattr(module, name)
        return record

    def leaves(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor] | str:
        """The captured tensors, or why they cannot stand for `params` (what a traversal needs)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        for p, t in zip(params, self.seen):
            if not isinstance(p, DTensor) or any(type(pl) not in (Shard, Replicate) for pl in p.placements):
                return f"parameters sharded as DTensors with Shard and Replicate placements, got {type(p).__name__}"
            if t is None or isinstance(t, DTensor):
                return "a forward of this model since ParetoLoRA was created (no unsharded parameter was seen)"
            if t.shape != p.shape or t.dtype != p.dtype:
                return (f"unsharded parameters of the sharded ones' shape and dtype, got {tuple(t.shape)} "
                        f"{t.dtype} for {tuple(p.shape)} {p.dtype} (a MixedPrecisionPolicy?)")
        return list(self.seen)


def nondefault_reduction(fsdp_modules: Sequence[nn.Module]) -> str | None:
    """What of FSDP2's gradient reduction differs from an average reduce-scatter in the gradient's
    dtype (None: nothing), read from FSDP2's private state; an unreadable field counts as a difference."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    expected = {  # field of FSDP2's parameter group -> (its default, what a difference means)
        "mp_policy": (MixedPrecisionPolicy(), "a MixedPrecisionPolicy"),
        "reduce_grads": (True, "gradient sync off (set_requires_gradient_sync(False))"),
        "all_reduce_grads": (True, "HSDP all-reduce off"),
        "_all_reduce_hook": (None, "an all-reduce hook"),
        "gradient_divide_factor": (None, "a gradient divide factor"),
        "reduce_scatter_unused_params": (False, "reduce_scatter_unused_params"),
        "force_sum_reduction_for_comms": (False, "a sum reduction"),
    }
    missing = object()
    for m in fsdp_modules:
        get_state = getattr(m, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", missing) if callable(get_state) else missing
        if group is None:  # a module without parameters of its own
            continue
        if group is missing:
            return "FSDP2 state this torch does not expose"
        for field, (default, what) in expected.items():
            if getattr(group, field, missing) != default:
                return what
        if type(getattr(group, "offload_policy", None)) is not OffloadPolicy:
            return "CPU offloading"
        if type(getattr(group, "_reduce_scatter_comm", None)).__name__ != "DefaultReduceScatter":
            return "a custom reduce-scatter"
    return None


def reduce_to_shards(text: Sequence[torch.Tensor | None], image: Sequence[torch.Tensor | None],
                     params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's (text, image) gradient averaged over the ranks, this rank's shard: [2, *local shape].

    One collective per parameter, on every rank alike (a gradient a loss did not reach is zeros
    here, so that the ranks' collectives always match).
    """
    from torch.distributed.tensor import DTensor, Partial, Shard

    out = []
    for a, b, p in zip(text, image, params):
        like = a if a is not None else b if b is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        stacked = torch.stack([torch.zeros_like(like) if a is None else a, torch.zeros_like(like) if b is None else b])
        mesh = p.device_mesh
        placements = [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in p.placements]
        partial = DTensor.from_local(stacked, mesh, [Partial("avg")] * mesh.ndim, shape=stacked.shape,
                                     stride=stacked.stride())
        local = partial.redistribute(mesh, placements).to_local()
        if local.shape[1:] != p.to_local().shape:
            raise RuntimeError(f"reduce_to_shards: the shard {tuple(local.shape[1:])} is not FSDP2's "
                               f"{tuple(p.to_local().shape)}")
        out.append(local)
    return out
