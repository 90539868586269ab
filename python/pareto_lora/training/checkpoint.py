"""Validation of a whole ``ParetoLoRA.state_dict()`` before any of it is applied.

A checkpoint is applied only once every entry has the type and shape this ParetoLoRA needs:
a loss vector of another shape would otherwise be broadcast silently, a string micro-batch count
would fail half-way through loading. Every problem is a ``ValueError("state: ...")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..rules import RuleSpec

__all__ = ["CheckedState", "check_state"]

_KEYS = ("version", "rule", "micro_batches", "losses", "nonfinite", "scaled", "text", "image")


@dataclasses.dataclass
class CheckedState:
    """The parts of a checked state that ParetoLoRA applies itself."""

    spec: RuleSpec
    micro: int
    losses: torch.Tensor
    nonfinite: torch.Tensor
    scaled: bool
    flats: list  # (text, image) tensor pairs, one per buffer; empty between steps


def _fail(msg: str) -> None:
    raise ValueError(f"state: {msg}")


def _vector(state: dict, key: str, dtypes: tuple, what: str) -> torch.Tensor:
    t = state[key]
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != (2,):
        got = f"{str(t.dtype).removeprefix('torch.')} shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(f"{key}: expected a {what} Tensor of shape [2] (text, image), got {got}")
    return t


def _flat_pairs(state: dict, micro: int, mine: Sequence[torch.Tensor]) -> list:
    for key in ("text", "image"):
        if not isinstance(state[key], (list, tuple)):
            _fail(f"{key}: expected a list of Tensors, got {type(state[key]).__name__}")
    if not micro:
        return []
    text, image = state["text"], state["image"]
    if len(text) != len(mine) or len(image) != len(mine):
        _fail("the checkpoint's gradient buffers do not match this model's layout")
    for t, i, m in zip(text, image, mine):
        if not all(isinstance(x, torch.Tensor) and x.shape == m.shape and x.dtype == m.dtype for x in (t, i)):
            _fail("the checkpoint's gradient buffers do not match this model's layout")
    return list(zip(text, image))


def check_state(state, flats: Sequence[torch.Tensor], saves_mid_window: bool) -> CheckedState:
    """The checked contents of a ``ParetoLoRA.state_dict()`` for buffers shaped like `flats`.

    The balancer and options entries are checked by their owners (ParetoLoRA calls them)."""
    if not isinstance(state, dict) or state.get("version") != 1:
        _fail("expected a ParetoLoRA.state_dict() (version 1)")
    missing = [k for k in _KEYS if k not in state]
    if missing:
        _fail(f"missing key(s) {', '.join(map(repr, missing))}")
    rule = state["rule"]
    if not isinstance(rule, dict):
        _fail(f"rule: expected a dict of RuleSpec fields, got {type(rule).__name__}")
    try:
        spec = RuleSpec(**rule)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state: rule: {e}") from None
    micro = state["micro_batches"]
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
        _fail(f"micro_batches: expected an int >= 0, got {micro!r}")
    if micro and not saves_mid_window:
        _fail("a mid-accumulation checkpoint cannot be loaded under DDP; save between steps")
    losses = _vector(state, "losses", (torch.float64, torch.float32), "float")
    nonfinite = _vector(state, "nonfinite", (torch.bool,), "bool")
    if not isinstance(state["scaled"], bool):
        _fail(f"scaled: expected a bool, got {state['scaled']!r}")
    for key in ("balancer", "options"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            _fail(f"{key}: expected a dict or None, got {type(state[key]).__name__}")
    pairs = _flat_pairs(state, micro, flats)
    return CheckedState(spec, micro, losses, nonfinite, state["scaled"], pairs)
