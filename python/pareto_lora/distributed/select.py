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


def _refuse_unsharded_root(model: nn.Module) -> None:
    """A model whose layers are sharded by ``fully_shard`` but not the model itself is not an FSDP2
    model (its root's forward and backward hooks never run): refused, rather than run as one process."""
    if any(is_fsdp2(m) for m in model.modules()):
        raise ValueError("model: expected fully_shard(model) on the root too: some of its submodules are sharded by "
                         "FSDP2 (fully_shard) but the model itself is not")


def make_sync(model: nn.Module) -> GradSync:
    """The :class:`GradSync` for `model`: :class:`DDPSync` for a ``DistributedDataParallel``,
    :class:`FSDPSync` for an FSDP2 ``fully_shard`` model, else :class:`LocalSync`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPSync(model)
    if is_fsdp2(model):
        return FSDPSync(model)
    _refuse_unsharded_root(model)
    return LocalSync(model)


def make_many_sync(model: nn.Module):
    """The K-objective sync for `model` (:mod:`.multi`): :class:`DDPManySync` for a
    ``DistributedDataParallel``, :class:`FSDPManySync` for an FSDP2 model, else :class:`LocalManySync`."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return DDPManySync(model)
    if is_fsdp2(model):
        return FSDPManySync(model)
    _refuse_unsharded_root(model)
    return LocalManySync(model)
