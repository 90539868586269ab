"""Which sync a model needs: DDP, FSDP2 or a single process (two objectives, and K).
"""

from __future__ import annotations

from torch import nn

from .ddp import DDPSync
from .fsdp import FSDPSync, is_fsdp2
from .multi import DDPManySync, LocalManySync
from .multi_fsdp import FSDPManySync
from .sync import GradSync, LocalSync

__all__ = ["make_sync", "make_many_sync"]


def make_sync(model: nn.Module) -> GradSync:
    """The :class:`GradSync` for `model`: :class:`DDPSync` for a ``DistributedDataParallel``,
    :class:`FSDPSync` for an FSDP2 ``fully_shard`` model, else :class:`LocalSync`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPSync(model)
    if is_fsdp2(model):
        return FSDPSync(model)
    return LocalSync(model)


def make_many_sync(model: nn.Module):
    """The K-objective sync for `model` (:mod:`.multi`): :class:`DDPManySync` for a
    ``DistributedDataParallel``, :class:`FSDPManySync` for an FSDP2 model, else :class:`LocalManySync`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPManySync(model)
    if is_fsdp2(model):
        return FSDPManySync(model)
    return LocalManySync(model)
