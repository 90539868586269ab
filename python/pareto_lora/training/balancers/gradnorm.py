"""GradNorm: learned loss weights that equalise the objectives' gradient norms (Chen et al., ICML 2018).

Two weights ``w = (w_text, w_image)``, summing to 2, scale the objectives: the step's gradient is
``w_text * g_text + w_image * g_image``. After each step the weights move so that the weighted
gradient norms at a chosen shared group ``G_k = w_k * ||g_k||`` approach a common target
scaled by each objective's relative inverse training rate:

    r_k    = (L_k / L_k(0)) / mean_j (L_j / L_j(0))       (L_k(0): the first step's loss)
    target = mean_j G_j * r_k ** alpha                      (held constant)
    L_grad = sum_k |G_k - target_k|,   w <- w - lr * dL_grad/dw,   then w <- 2 w / sum(w)

The norms ||g_k|| are the group statistics ParetoLoRA already computes (``||g_text||^2``,
``||g_image||^2`` per group), so GradNorm costs no extra backward (the paper's version
differentiates G_k, a second-order pass). The weights apply to the groups selected by
``modulate`` (``modulate="all"`` for the paper's global weighting).
May import: :mod:`.base`.
"""

from __future__ import annotations

import math

import torch

from .base import Balancer, weighted_coefficients

__all__ = ["GradNorm", "gradnorm_update"]


def gradnorm_update(w: torch.Tensor, norms: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor,
                    alpha: float, lr: float, min_weight: float = 1e-3):
    """One GradNorm weight update (float64): returns (new w [2], targets [2], G [2], r [2]).

    ``norms``: ||grad L_k|| at the shared group (unweighted); ``losses``, ``initial``: L_k(t),
    L_k(0). The subgradient of |G_k - target_k| in w_k is sign(G_k - target_k) * ||g_k||.
    """
    w, norms, losses, initial = (t.to(torch.float64) for t in (w, norms, losses, initial))
    g = w * norms
    rate = losses / initial
    r = rate / rate.mean()
    target = g.mean() * r**alpha
    new = (w - lr * torch.sign(g - target) * norms).clamp_min(min_weight)
    return new * (2.0 / new.sum()), target, g, r


class GradNorm(Balancer):
    """GradNorm loss weights.

    Args:
        alpha: asymmetry (default 1.5; 0 pulls the weighted norms to equality).
        lr: learning rate of the weights (plain gradient descent on L_grad; default 0.025).
        group: the shared group whose gradient norms are balanced: a group index, or None
            (default) for all modulated groups together (their statistics summed).
        min_weight: the weights are kept >= this before renormalising.
    """

    name = "gradnorm"

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, group: int | None = None, min_weight: float = 1e-3):
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha: expected a finite number >= 0, got {alpha!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
            raise ValueError(f"group: expected a group index >= 0 or None, got {group!r}")
        if not 0 < min_weight < 1:
            raise ValueError(f"min_weight: expected a number in (0, 1), got {min_weight!r}")
        self.alpha, self.lr, self.group, self.min_weight = float(alpha), float(lr), group, float(min_weight)
        self.device = torch.device("cpu")
        self._init_state()

    def _init_state(self) -> None:
        dev = self.device
        self.weights = torch.ones(2, dtype=torch.float64, device=dev)
        self.initial = torch.full((2,), math.nan, dtype=torch.float64, device=dev)
        nan2 = torch.full((2,), math.nan, dtype=torch.float64, device=dev)
        self._last = {"target": nan2, "g": nan2, "r": nan2}
        self._used = self.weights

    def bind(self, device: torch.device) -> None:
        super().bind(device)
        state = self.state_dict()
        self._init_state()
        self.load_state_dict(state)

    def coefficients(self, stats, active, backend):
        if self.group is not None and self.group >= stats.shape[0]:
            raise ValueError(f"group: {self.group} out of range (the layout has {stats.shape[0]} groups)")
        self._active = active
        return weighted_coefficients(stats, active, self.weights[0], self.weights[1], backend)

    def _norms(self, step, active: torch.Tensor) -> torch.Tensor:
        s = step.group_stats.to(torch.float64)
        row = s[self.group] if self.group is not None else torch.where(active[:, None], s, 0.0).sum(dim=0)
        return row[:2].clamp_min(0).sqrt()

    def observe(self, step, losses) -> None:
        losses = losses.to(torch.float64)
        self.initial = torch.where(torch.isnan(self.initial), losses, self.initial)
        norms = self._norms(step, self._active)
        new, target, g, r = gradnorm_update(self.weights, norms, losses, self.initial, self.alpha, self.lr,
                                            self.min_weight)
        ok = torch.isfinite(new).all() & (self.initial > 0).all()  # skip a non-finite step (no host sync)
        self._used = self.weights
        self.weights = torch.where(ok, new, self.weights)
        self._last = {"target": target, "g": g, "r": r}

    def metrics(self) -> dict[str, torch.Tensor]:
        # w: the weights this step used (observe has already moved self.weights on)
        w, t, g, r = self._used, self._last["target"], self._last["g"], self._last["r"]
        return {"gradnorm/w_text": w[0], "gradnorm/w_image": w[1], "gradnorm/gnorm_text": g[0],
                "gradnorm/gnorm_image": g[1], "gradnorm/target_text": t[0], "gradnorm/target_image": t[1],
                "gradnorm/rate_text": r[0], "gradnorm/rate_image": r[1]}

    def state_dict(self) -> dict:
        return {"weights": self.weights.detach().cpu().clone(), "initial": self.initial.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = torch.as_tensor(state["weights"], dtype=torch.float64).to(self.device).clone()
        self.initial = torch.as_tensor(state["initial"], dtype=torch.float64).to(self.device).clone()

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha}, lr={self.lr}, group={self.group})"
