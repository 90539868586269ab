"""The accumulation window that both training steps keep (two objectives, K objectives).

Between two ``integrate_accumulated()`` calls a step holds the running sum of each objective's
(unscaled) loss, which of them were not finite, whether a GradScaler scaled them and how many
micro-batches went in. A micro-batch enters the window in one way only (:meth:`AccumulationWindow.
_add_micro_batch`): its backward runs first, and the window takes the micro-batch only if that
succeeded, so a failed backward leaves it as it was; a SyncFailure means the sync lost the window
(its buffers are half-written), and a new one starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..distributed import SyncFailure

__all__ = ["AccumulationWindow"]


class AccumulationWindow:
    """Mixin of :class:`~pareto_lora.ParetoLoRA` and :class:`~pareto_lora.MultiObjectiveLoRA`: the
    window's state. The owner has ``layout`` (the device), ``on_nonfinite`` and ``_num_losses``."""

    _num_losses: int

    @property
    def micro_batches(self) -> int:
        """Micro-batches accumulated since the last ``integrate_accumulated()``."""
        return self._micro

    def _reset(self) -> None:
        n, dev = self._num_losses, self.layout.device
        self._micro = 0
        self._losses = torch.zeros(n, dtype=torch.float64, device=dev)
        self._bad = torch.zeros(n, dtype=torch.bool, device=dev)
        self._scaled = False

    def _add_micro_batch(self, batch: torch.Tensor, scaled: bool, backward: Callable[[torch.Tensor], None]) -> None:
        """``backward(the running losses with this micro-batch's)``, then the window takes the micro-batch.

        The running losses exist before the backward because under DDP the two-objective hook
        carries them across ranks (in place); they are kept only if the backward succeeds.
        """
        losses = self._losses + batch
        try:
            backward(losses)
        except SyncFailure:
            self._reset()
            raise
        self._losses = losses
        self._bad |= ~torch.isfinite(batch)
        self._scaled |= scaled
        self._micro += 1

    def _skipped(self) -> torch.Tensor:
        """Whether the step being integrated is skipped (0-d device bool, no host sync): some accumulated
        loss is not finite. Read by the rule, which the syncs run after ``settle`` recorded the global
        losses ("raise" mode raised there on a non-finite one). The two-objective DDP hook runs the rule
        during the backward instead, which is why ``stats_ema``, the reader, is refused there."""
        return self._bad.any()

    def _nonfinite_mode(self, losses: torch.Tensor) -> str:
        """Record the step's (global) accumulated losses; what a non-finite one does: "raise" or "skip"
        (``on_nonfinite``, where "auto" is "skip" when a scaler was passed, else "raise")."""
        self._losses = losses
        self._bad = self._bad | ~torch.isfinite(losses)
        if self.on_nonfinite != "auto":
            return self.on_nonfinite
        return "skip" if self._scaled else "raise"
