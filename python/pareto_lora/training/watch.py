"""Whether the model still holds the parameters ParetoLoRA laid out, as they were laid out.

The flat gradient buffers are built once, for one set of parameter objects with one dtype and
device each. A parameter newly frozen or unfrozen, replaced by a new ``nn.Parameter``, or moved
to another dtype or device (``model.to(torch.float64)``) no longer matches them: its gradient
would be lost or only g_image would reach it. :class:`TrainableWatch` detects all of these
before a step changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TrainableWatch"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TrainableWatch:
    """A snapshot of `module`'s parameters (where each is registered and whether it trains) and of
    the laid-out parameters' dtype and device; :meth:`check` compares the model against it."""

    def __init__(self, module: nn.Module, params: Sequence[torch.Tensor], names: Sequence[str]):
        self._module = module
        self._params, self._names = list(params), list(names)
        self._meta = [(p.dtype, p.device) for p in self._params]
        # get_device() is an int (-1: CPU): comparing it each step costs no torch.device object.
        self._fast = [(p, p.dtype, p.get_device()) for p in self._params]
        self._snapshot()

    def _snapshot(self) -> None:
        # (owner's parameter dict, attribute, parameter, requires_grad, sharded, qualified name). A
        # sharded (DTensor) parameter is swapped for its unsharded form around forward/backward by
        # FSDP2, so only its flag is compared, not the object registered under its name.
        self._slots = []
        for prefix, sub in self._module.named_modules():
            for attr, p in sub._parameters.items():
                if p is not None:
                    sharded = callable(getattr(p, "to_local", None))
                    self._slots.append((sub._parameters, attr, p, p.requires_grad, sharded,
                                        f"{prefix}.{attr}" if prefix else attr))

    def _unchanged(self) -> bool:
        # A flag, a dict lookup and a dtype per parameter: walking the module tree each step cost ~1 ms.
        for owner, attr, p, was, sharded, _ in self._slots:
            if p.requires_grad is not was or (not sharded and owner.get(attr) is not p):
                return False
        for p, dt, dev in self._fast:
            if p.dtype is not dt or p.get_device() != dev:
                return False
        return True

    def check(self) -> None:
        """ValueError("model: ...") naming what changed; nothing is modified."""
        if self._unchanged():
            return
        known = {id(p) for p in self._params}
        # A frozen weight replaced by another frozen one changes no gradient; a trainable one does.
        replaced = [n for owner, attr, p, was, sharded, n in self._slots
                    if not sharded and owner.get(attr) is not p
                    and (was or getattr(owner.get(attr), "requires_grad", False))]
        replaced_set = set(replaced)
        unfrozen = [n for n, p in self._module.named_parameters()
                    if p.requires_grad and id(p) not in known and n not in replaced_set]
        frozen = [n for p, n in zip(self._params, self._names) if not p.requires_grad]
        dtypes = [f"{n} {_dtype_name(dt)} -> {_dtype_name(p.dtype)}"
                  for p, n, (dt, _) in zip(self._params, self._names, self._meta) if p.dtype is not dt]
        devices = [f"{n} {dev} -> {p.device}"
                   for p, n, (_, dev) in zip(self._params, self._names, self._meta) if p.device != dev]
        parts = [f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for what, items in (("newly trainable", unfrozen), ("newly frozen", frozen),
                                     ("replaced by a new Parameter", replaced), ("dtype changed", dtypes),
                                     ("device changed", devices)) if items]
        if not parts:  # only frozen weights were swapped: follow them, so the next check is fast again
            self._snapshot()
            return
        raise ValueError(
            f"model: the trainable parameters changed since ParetoLoRA was built ({'; '.join(parts)}); "
            "build a new ParetoLoRA for the new set (and a new optimizer)"
        )
