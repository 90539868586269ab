"""Persistent flat gradient buffers of a :class:`GradLayout` and the views that parameters use.

One :class:`FlatGrads` per objective holds every trainable parameter's gradient in one flat
buffer per dtype; ``views[i]`` is parameter i's part of it, shaped like the parameter (its local
shard under FSDP2). Nothing gradient-sized is allocated after construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import GradLayout

__all__ = ["FlatGrads", "buffer_bytes", "free_memory", "check_buffers_fit"]


def _local_shape(p: torch.Tensor) -> torch.Size:
    # A sharded (DTensor) parameter's gradient buffer holds only this rank's shard.
    to_local = getattr(p, "to_local", None)
    return to_local().shape if callable(to_local) else p.shape


def buffer_bytes(layout: GradLayout) -> int:
    """Bytes of one :class:`FlatGrads` of `layout` (every bucket, in its dtype)."""
    return sum(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in layout.buckets)


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`, where that is knowable: a CUDA device's free memory,
    the host's MemAvailable on Linux; None elsewhere (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_buffers_fit(layout: GradLayout, count: int, argument: str) -> None:
    """ValueError("<argument>: ...") before allocating `count` FlatGrads that `layout`'s device cannot hold."""
    need, free = count * buffer_bytes(layout), free_memory(layout.device)
    if free is not None and need > free:
        raise ValueError(f"{argument}: {count} flat gradient buffers of the trainable parameters need "
                         f"{need / 2**30:.2f} GiB on {layout.device}, and {free / 2**30:.2f} GiB is free; train "
                         "fewer objectives or fewer parameters, or shard them (FSDP2)")


class FlatGrads:
    """One persistent flat gradient buffer per bucket (dtype) of `layout`, and per-parameter views."""

    def __init__(self, layout: GradLayout):
        self.flats = [torch.zeros(b.numel, dtype=b.dtype, device=layout.device) for b in layout.buckets]
        views: list[torch.Tensor | None] = [None] * len(layout.params)
        for flat, bucket in zip(self.flats, layout.buckets):
            for i, off in zip(bucket.param_index, bucket.param_offset):
                shape = _local_shape(layout.params[i])
                views[i] = flat[off : off + shape.numel()].view(shape)
        self.views: list[torch.Tensor] = views  # type: ignore[assignment]

    def zero_(self) -> None:
        for f in self.flats:
            f.zero_()

    def fill_(self, value: float) -> None:
        for f in self.flats:
            f.fill_(value)

    def accumulate(self, grads: Sequence[torch.Tensor | None], first: bool) -> None:
        """Copy (``first``) or add one backward's gradients into the views; None means zero."""
        got = [(v, g) for v, g in zip(self.views, grads) if g is not None]
        with torch.no_grad():
            if first:
                if len(got) < len(self.views):
                    self.zero_()
                torch._foreach_copy_([v for v, _ in got], [g for _, g in got])
            else:
                torch._foreach_add_([v for v, _ in got], [g for _, g in got])

    def attach_as_grad(self, params: Sequence[torch.Tensor]) -> None:
        """Make every ``param.grad`` a view of these buffers (what the optimizer reads, and where
        an ordinary ``.backward()`` accumulates)."""
        for p, v in zip(params, self.views):
            if p.grad is not v:
                p.grad = v

    def check_attached(self, params: Sequence[torch.Tensor]) -> None:
        """Raise if a ``zero_grad()`` (or anything else) replaced ``.grad`` during an accumulation:
        that usually means a loop that expects the micro-batches so far to be dropped. Nothing is
        changed by the check; the accumulated buffers are intact."""
        if any(p.grad is not v for p, v in zip(params, self.views)):
            raise RuntimeError(
                "backward: the gradients were reset or replaced during gradient accumulation "
                "(optimizer.zero_grad() between accumulate() calls?); call it after integrate_accumulated()"
            )
