"""MIMO: worst-modality-first weighting from the objectives' optimality gaps (arXiv 2511.06686).

Each step the gap of objective k is ``L_k - L*_k`` (``L*_k`` a floor estimate of its optimum),
the weights ``sigma = softmax(gaps / mu)`` (a smoothed arg-max: the objective furthest from its
floor gets most of the weight) and the update is

    grad(L_text + L_image) + lam * (sigma_text * grad L_text + sigma_image * grad L_image),

i.e. ``alpha = 1 + lam * sigma_text``, ``beta = 1 + lam * sigma_image``. The weights depend on the
losses only, so the default mode is one backward of ``alpha*L_text + beta*L_image`` (the cost of a
vanilla step); ``per_group=True`` instead puts (alpha, beta) into the groups selected by
``modulate`` through the two-gradient flat step (the others get the plain sum), which also gives
the per-group gradient statistics.
"""

from __future__ import annotations

import math

import torch

from ... import args
from .base import Balancer, describe as _describe, weighted_coefficients

__all__ = ["MIMO", "mimo_weights", "stable_softmax"]

FLOORS = ("min", "ema")


def stable_softmax(z_num: torch.Tensor, mu: float) -> torch.Tensor:
    """softmax(z_num / mu) over the last axis, shifted by the max *before* dividing by mu.

    ``(z - max z) / mu <= 0``, so exp never overflows whatever mu (tiny mu: a hard arg-max;
    ties share the weight). Non-finite entries give NaN rows (callers decide what to do).
    """
    shifted = (z_num - z_num.max(dim=-1, keepdim=True).values) / mu
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)


def mimo_weights(losses: torch.Tensor, floors: torch.Tensor, lam: float, mu: float):
    """(coefficients [2] = (alpha, beta), sigma [2], gaps [2]) of one MIMO step, in float64.

    ``losses``, ``floors``: (text, image). A non-finite gap gives sigma = (1/2, 1/2), so the
    weights stay finite and a non-finite loss is left to the caller's non-finite handling.
    """
    gaps = losses.to(torch.float64) - floors.to(torch.float64)
    sigma = stable_softmax(gaps, mu)
    sigma = torch.where(torch.isfinite(sigma).all(), sigma, torch.full_like(sigma, 0.5))
    return 1.0 + lam * sigma, sigma, gaps


def _fixed_floors(floor) -> tuple[float, float] | None:
    """None for "min"/"ema", the two numbers of a fixed ``(floor_text, floor_image)``, else ValueError."""
    if isinstance(floor, str):
        args.choice("floor", floor, FLOORS)
        return None
    expected = f"floor: expected {' or '.join(map(repr, FLOORS))} or two finite numbers, got {args.shown(floor)}"
    if not isinstance(floor, (tuple, list)) or len(floor) != 2:
        raise ValueError(expected)
    try:
        return args.number("floor", floor[0]), args.number("floor", floor[1])
    except ValueError:
        raise ValueError(expected) from None


class MIMO(Balancer):
    """MIMO loss weighting.

    Args:
        lam: penalty weight lambda (the paper finds lam >= 10 best; default 10).
        mu: softmax temperature (mu <= 0.1 best; default 0.1; any mu > 0 is overflow-safe).
        floor: the floor estimates L*: "min" (running minimum of the losses seen, the
            default), "ema" (exponential moving average with decay ``ema``), or fixed
            ``(floor_text, floor_image)`` values.
        ema: decay of the "ema" floor.
        per_group: False (default): one backward of alpha*L_text + beta*L_image, every trainable
            parameter weighted. True: two gradients, (alpha, beta) on the ``modulate`` groups.

    The floors are updated with the losses each weighting sees (including the current one, so
    a running-minimum gap is >= 0): the step's loss totals in ``per_group`` mode, each
    micro-batch's losses in one-backward mode.
    """

    name = "mimo"

    def __init__(self, lam: float = 10.0, mu: float = 0.1, floor="min", ema: float = 0.9, per_group: bool = False):
        self.lam = args.number("lam", lam, 0.0)
        self.mu = args.positive("mu", mu)
        self.fixed = _fixed_floors(floor)
        self.floor = floor if self.fixed is None else "fixed"
        self.ema = args.unit_interval("ema", ema, high_open=True)
        self.per_group = args.flag("per_group", per_group)
        self.one_backward = not self.per_group
        self.device = torch.device("cpu")
        self._init_state()

    def _init_state(self) -> None:
        f = self.fixed if self.fixed is not None else (math.nan, math.nan)
        self.floors = torch.tensor(f, dtype=torch.float64, device=self.device)
        self.steps = torch.zeros((), dtype=torch.int64, device=self.device)
        nan2 = torch.full((2,), math.nan, dtype=torch.float64, device=self.device)
        self._last = {"sigma": nan2, "gaps": nan2, "coeffs": nan2}

    def bind(self, device: torch.device, num_groups: int) -> None:
        super().bind(device, num_groups)
        state = self.state_dict()
        self._init_state()
        self._load(state)

    def _update_floors(self, losses: torch.Tensor) -> None:
        if self.floor == "fixed":
            return
        losses = losses.to(self.floors)
        # Only a batch whose two losses are finite enters the floors (a NaN/inf one is refused or skipped).
        unset, ok = torch.isnan(self.floors), torch.isfinite(losses).all()
        if self.floor == "min":
            new = torch.minimum(self.floors, losses)
        else:
            new = self.ema * self.floors + (1.0 - self.ema) * losses
        new = torch.where(unset, losses, new)
        self.floors = torch.where(ok, new, self.floors)

    def _weigh(self, losses: torch.Tensor) -> torch.Tensor:
        """Update the floors with `losses`, then the coefficients; remembers sigma and the gaps."""
        self._update_floors(losses)
        coeffs, sigma, gaps = mimo_weights(losses, self.floors, self.lam, self.mu)
        self._last = {"sigma": sigma, "gaps": gaps, "coeffs": coeffs}
        return coeffs

    def loss_weights(self, losses: torch.Tensor):
        c = self._weigh(losses)
        return c[0], c[1]

    def prepare(self, losses: torch.Tensor) -> None:
        self._weigh(losses)

    def coefficients(self, stats, active, backend):
        c = self._last["coeffs"]
        return weighted_coefficients(stats, active, c[0], c[1], backend)

    def observe(self, step, losses) -> None:
        self.steps = self.steps + torch.isfinite(losses).all().to(self.steps)  # a skipped step is not counted

    def metrics(self) -> dict[str, torch.Tensor]:
        s, g, c, f = self._last["sigma"], self._last["gaps"], self._last["coeffs"], self.floors
        return {"mimo/sigma_text": s[0], "mimo/sigma_image": s[1], "mimo/gap_text": g[0], "mimo/gap_image": g[1],
                "mimo/floor_text": f[0], "mimo/floor_image": f[1], "mimo/alpha": c[0], "mimo/beta": c[1]}

    def snapshot(self):
        return self.floors, dict(self._last)

    def restore(self, snap, when: torch.Tensor | None = None) -> None:
        if when is None:
            self.floors, self._last = snap[0], dict(snap[1])
        else:  # a 0-d device bool: no host sync
            self.floors = torch.where(when, snap[0], self.floors)

    def state_dict(self) -> dict:
        return {"floors": self.floors.detach().cpu().clone(), "steps": int(self.steps)}

    def check_state(self, state) -> None:
        super().check_state(state)
        floors, steps = state.get("floors"), state.get("steps")
        if not isinstance(floors, torch.Tensor) or floors.shape != (2,) or not floors.is_floating_point():
            raise ValueError(f"state: expected MIMO floors as a float tensor of shape [2], got {_describe(floors)}")
        if torch.isinf(floors).any():
            raise ValueError(f"state: expected MIMO floors finite (NaN: not seen yet), got {floors.tolist()}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state: expected MIMO steps as an int >= 0, got {steps!r}")

    def _load(self, state: dict) -> None:
        self.floors = state["floors"].to(dtype=torch.float64, device=self.device).clone()
        self.steps = torch.tensor(state["steps"], dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        return (f"MIMO(lam={self.lam}, mu={self.mu}, floor={self.fixed if self.fixed else self.floor!r}, "
                f"per_group={self.per_group})")
