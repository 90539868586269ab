"""Several processes (and one): the sync contract and its DDP, FSDP2 and sharded implementations.

Every rank must end a step with the same integrated gradient: the one a single process would
compute from the gradients of the global-batch losses, i.e. of the *average of the per-rank
losses* (what DDP and FSDP average). Both objectives therefore have to be averaged across ranks
before the statistics are taken; the rule is not linear, so integrating locally and averaging
the results afterwards would be wrong.

:mod:`.sync` (the contract, single process), :mod:`.ddp` (communication hook), :mod:`.fsdp`
(FSDP2), :mod:`.sharded` (:func:`sharded_integrate` for any sharded flat buffers),
:mod:`.select` (:func:`make_sync`; :func:`make_many_sync` for K objectives: :mod:`.multi` for one
process and DDP, :mod:`.multi_fsdp` for FSDP2 -- the K gradient buffers are averaged across
ranks before their Gram is taken, for the same reason).
"""

from .ddp import DDPSync, one_bucket_cap_mb
from .fsdp import FSDPSync
from .select import make_many_sync, make_sync
from .sharded import sharded_integrate
from .sync import GradSync, LocalSync, SyncFailure

__all__ = ["DDPSync", "FSDPSync", "GradSync", "LocalSync", "SyncFailure", "make_many_sync", "make_sync",
           "one_bucket_cap_mb", "sharded_integrate"]
