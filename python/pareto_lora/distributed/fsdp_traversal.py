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
* :func:`reduce_to_shards` averages every parameter's stacked (text, image) gradient over the
  ranks onto this rank's dim-0 shard with one ``reduce_scatter_tensor`` (bitwise FSDP2's own
  reduce-scatter on 2 gloo ranks, tests/distributed/test_traversal_ddp.py). A
  ``DTensor.from_local(..., [Partial("avg")]).redistribute(...)`` per parameter gave the same
  shards but cost 123 / 163 ms (min / median of 10 calls) for the 112 LoRA parameters of bench's
  small Llama (one collective each, DTensor's dispatch), against 7.7 / 8.8 ms for this one
  collective with its packing (bench/bench_fsdp_traversal.py, 2 gloo ranks, bench/RESULTS.md).

That matches FSDP2's reduction only under its default policy (no MixedPrecisionPolicy, no CPU
offload, gradient sync on, no hooks or divide factors). FSDP2 has no public getter for these,
so :func:`nondefault_reduction` reads them from its private state; a field it cannot read
counts as non-default, and the step then takes two passes (or ``traversal="batched"`` raises).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Leaves", "UnshardedCapture", "nondefault_reduction", "reduce_to_shards"]


@dataclasses.dataclass(frozen=True)
class Leaves:
    """What a batched traversal under FSDP2 can target: ``tensors`` (the unsharded parameters the last
    forward used, one per trainable parameter), or None and ``expected``, what it needs and did not find
    (completing "'batched' under FSDP2 expected ...")."""

    tensors: list[torch.Tensor] | None
    expected: str = ""

    def __post_init__(self):
        if (self.tensors is None) == (not self.expected):
            raise ValueError("Leaves: expected either the tensors or what was expected of them, not both or neither")

    @classmethod
    def missing(cls, expected: str) -> Leaves:
        return cls(None, expected)


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

    def leaves(self, params: Sequence[torch.Tensor]) -> Leaves:
        """The captured tensors, or why they cannot stand for `params` (what a traversal needs)."""
        from torch.distributed.tensor import DTensor, Shard

        for p, t in zip(params, self.seen):
            if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or p.placements != (Shard(0),):
                return Leaves.missing("parameters sharded on dim 0 over a 1-D mesh, got "
                                      f"{getattr(p, 'placements', type(p).__name__)}")
            if t is None or isinstance(t, DTensor):
                return Leaves.missing("a forward of this model since ParetoLoRA was created (no unsharded parameter "
                                      "was seen)")
            if t.shape != p.shape or t.dtype != p.dtype:
                return Leaves.missing(f"unsharded parameters of the sharded ones' shape and dtype, got "
                                      f"{tuple(t.shape)} {t.dtype} for {tuple(p.shape)} {p.dtype} (a MixedPrecisionPolicy?)")
        return Leaves(list(self.seen))


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
                     params: Sequence[torch.Tensor], group) -> list[torch.Tensor]:
    """Each parameter's (text, image) gradient averaged over the ranks of `group`, this rank's
    dim-0 shard (``torch.chunk``, as FSDP2 shards): a list of ``[2, *local shape]``.

    One ``reduce_scatter_tensor`` for all of them (a sum, then divided by the world size): rank
    r's part of the input is every parameter's r-th chunk of rows per objective, each padded to
    the largest chunk, so every rank's part has the same size. A gradient a loss did not reach is
    zeros here, so the ranks' collectives always match.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]
    own = []
    for a, b, p in zip(text, image, params):
        rows = p.shape[0]
        step, cols = -(-rows // world), p.numel() // max(rows, 1)
        width = step * cols  # per objective
        for g in (a, b):
            g = torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g
            for r in range(world):
                piece = g[r * step : (r + 1) * step].reshape(-1)  # rows of a contiguous tensor: no copy
                pieces[r].append(piece if piece.numel() == width else torch.nn.functional.pad(piece, (0, width - piece.numel())))
        mine = (max(0, min(step, rows - rank * step)), *p.shape[1:])
        if mine != tuple(p.to_local().shape):
            raise RuntimeError(f"reduce_to_shards: the shard {mine} is not FSDP2's {tuple(p.to_local().shape)}")
        own.append((width, mine))
    send = torch.cat([x for part in pieces for x in part])
    out = send.new_empty(send.numel() // world)
    # torch 2.13 renamed it (reduce_scatter_tensor is a deprecated alias there); torch 2.11 has only the old name.
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, send, group=group)
    out.div_(world)
    shards, at = [], 0
    for width, mine in own:
        n = math.prod(mine)  # this rank's rows of the parameter; the rest of `width` is padding
        shards.append(out[at : at + 2 * width].view(2, width)[:, :n].reshape(2, *mine))
        at += 2 * width
    return shards
