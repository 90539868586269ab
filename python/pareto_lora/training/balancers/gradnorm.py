"""GradNorm: learned loss weights that equalise the objectives' gradient norms (Chen et al., ICML 2018).

Two weights ``w = (w_text, w_image)``, summing to 2, scale the objectives: the step's gradient is
``w_text * g_text + w_image * g_image``. After each step the weights move so that the weighted
gradient norms at a chosen shared group ``G_k = w_k * ||g_k||`` approach a common target
scaled by each objective's relative inverse training rate:

    r_k    = (L_k / L_k(0)) / mean_j (L_j / L_j(0))       (L_k(0): the first loss > 0 of k)
    target = mean_j G_j * r_k ** alpha                      (held constant)
    L_grad = sum_k |G_k - target_k|,   w <- w - lr * dL_grad/dw,   then w <- 2 w / sum(w)

The norms ||g_k|| are the group statistics ParetoLoRA already computes (``||g_text||^2``,
``||g_image||^2`` per group), so GradNorm costs no extra backward (the paper's version
differentiates G_k, a second-order pass). The weights apply to the groups selected by
``modulate`` (``modulate="all"`` for the paper's global weighting).
"""

from __future__ import annotations

import math

import torch

from ... import args
from .base import Balancer, describe, weighted_coefficients

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
        self.alpha = args.number("alpha", alpha, 0.0)
        self.lr = args.positive("lr", lr)
        self.group = args.integer("group", group, 0, none=True)
        self.min_weight = args.number("min_weight", min_weight, 0.0, 1.0, low_open=True, high_open=True)
        self.device = torch.device("cpu")
        self._init_state()

    def _init_state(self) -> None:
        dev = self.device
        self.weights = torch.ones(2, dtype=torch.float64, device=dev)
        self.initial = torch.full((2,), math.nan, dtype=torch.float64, device=dev)
        nan2 = torch.full((2,), math.nan, dtype=torch.float64, device=dev)
        self._last = {"target": nan2, "g": nan2, "r": nan2}
        self._used = self.weights

    def check_bind(self, num_groups: int) -> None:
        if self.group is not None and self.group >= num_groups:
            raise ValueError(f"group: expected a group index < {num_groups} (the layout's groups), got {self.group}")

    def bind(self, device: torch.device, num_groups: int) -> None:
        super().bind(device, num_groups)
        state = self.state_dict()
        self._init_state()
        self._load(state)

    def coefficients(self, stats, active, backend):
        self._active = active
        return weighted_coefficients(stats, active, self.weights[0], self.weights[1], backend)

    def _norms(self, step, active: torch.Tensor) -> torch.Tensor:
        s = step.group_stats.to(torch.float64)
        row = s[self.group] if self.group is not None else torch.where(active[:, None], s, 0.0).sum(dim=0)
        return row[:2].clamp_min(0).sqrt()

    def observe(self, step, losses) -> None:
        losses = losses.to(torch.float64)
        norms = self._norms(step, self._active)
        # A non-finite step (refused or skipped) changes nothing. L_k(0) is the first loss > 0 of
        # objective k: a batch without image tokens has image loss 0, which would freeze r_k for ever.
        step_ok = torch.isfinite(losses).all() & torch.isfinite(norms).all()
        self.initial = torch.where(torch.isnan(self.initial) & (losses > 0) & step_ok, losses, self.initial)
        new, target, g, r = gradnorm_update(self.weights, norms, losses, self.initial, self.alpha, self.lr,
                                            self.min_weight)
        # a batch without one modality's tokens (loss 0) tells nothing about its training rate
        ok = step_ok & (losses > 0).all() & torch.isfinite(new).all() & (self.initial > 0).all()  # no host sync
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

    def check_state(self, state) -> None:
        super().check_state(state)
        for key in ("weights", "initial"):
            v = state.get(key)
            if not isinstance(v, torch.Tensor) or v.shape != (2,) or not v.is_floating_point():
                raise ValueError(f"state: expected GradNorm {key} as a float tensor of shape [2], got {describe(v)}")
        w, initial = state["weights"], state["initial"]
        if not (torch.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"state: expected GradNorm weights finite and > 0, got {w.tolist()}")
        if not (torch.isnan(initial) | (torch.isfinite(initial) & (initial > 0))).all():
            raise ValueError(f"state: expected GradNorm initial losses finite and > 0 (NaN: not seen yet), "
                             f"got {initial.tolist()}")

    def _load(self, state: dict) -> None:
        self.weights = state["weights"].to(dtype=torch.float64, device=self.device).clone()
        self.initial = state["initial"].to(dtype=torch.float64, device=self.device).clone()
        self._used = self.weights

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha}, lr={self.lr}, group={self.group})"
