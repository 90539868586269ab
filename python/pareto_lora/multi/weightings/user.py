"""The user-defined weighting: a Python callable from the batched Gram to the weights, or a torchjd Weighting.

A plain callable takes the valid Gram [G, K, K] (float64, on the statistics' device; invalid groups
are zeros there and get the plain sum afterwards) and returns weights [G, K]: it runs once per call
on the whole batch, so a vectorised callable keeps the op free of per-group Python and of host syncs
(ours adds none: the checks below read shapes only). Its weights are made float64; NaN/Inf or a
weight float32 cannot apply gives that group the plain sum, NONFINITE (:func:`.base.finish`).

A torchjd ``Weighting`` (e.g. ``UPGradWeighting()``, ``MeanWeighting()``) takes one Gramian [K, K];
a torchjd ``GramianWeightedAggregator`` (``UPGrad()``) is taken through its ``gramian_weighting``.
Both are recognised by their classes' names and modules, so nothing imports torchjd when it is not
installed. They are first mapped over the groups with ``torch.vmap`` (one call, batched); a
weighting that vmap cannot trace (torchjd's QP projectors leave torch for numpy, its PCGrad loops
over Python floats) falls back to a Python loop over the G groups: G calls of the weighting, each
with torchjd's own host round trips. torchjd's matrix weightings (NashMTL's) need the Jacobian, not
its Gram, and are refused, except Mean, Sum and Constant, whose weights depend on K alone.

The cost, either way: the weighting runs in Python between the Gram launch and the combine launch,
so a user weighting costs two launches instead of the one fused op of a rule the kernels know.
"""

from __future__ import annotations

import torch

from ...rules import Case
from .base import full_cases

__all__ = ["is_user_weighting", "check_user", "user_weighting"]


#: torchjd matrix weightings whose weights depend on the number of rows K only: a [K, K] Gram is as
#: good an input as the [K, n] matrix. The other matrix weightings read the Jacobian itself.
_SHAPE_ONLY = ("MeanWeighting", "SumWeighting", "ConstantWeighting")


def _torchjd_base(obj, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith("torchjd") for c in type(obj).__mro__)


def is_user_weighting(rule) -> bool:
    """Whether `rule` is a user-defined weighting (a callable that is not a RuleSpec or a rule name)."""
    return callable(rule) and not isinstance(rule, (str, type))


def _resolve(rule):
    """The callable to apply: a torchjd aggregator's Gramian weighting, else `rule` itself."""
    if _torchjd_base(rule, "Aggregator"):
        inner = getattr(rule, "gramian_weighting", None)
        if inner is None:
            raise ValueError(f"rule: expected a torchjd Gramian weighting or a GramianWeightedAggregator, got "
                             f"{type(rule).__name__} (it needs the Jacobian, not its Gram)")
        return inner
    if _torchjd_base(rule, "_MatrixWeighting") and type(rule).__name__ not in _SHAPE_ONLY:
        raise ValueError(f"rule: expected a torchjd Gramian weighting, got {type(rule).__name__} (a matrix "
                         "weighting: it needs the Jacobian, not its Gram)")
    return rule


def check_user(rule) -> None:
    """Raise ValueError if `rule` is not a usable user weighting (before anything runs)."""
    _resolve(rule)


def _call(fn, gram: torch.Tensor) -> torch.Tensor:
    if not (_torchjd_base(fn, "Weighting")):
        return fn(gram)
    try:
        return torch.vmap(fn)(gram)
    except Exception:  # noqa: BLE001 - any failure to trace: the documented loop over groups
        if gram.shape[0] == 0:
            return gram.new_zeros(gram.shape[:-1])
        return torch.stack([fn(g) for g in gram])


def user_weighting(rule, gram: torch.Tensor):
    """(weights [G, K] float64, cases [G] WEIGHTED) of a user weighting on the valid Gram [G, K, K]."""
    fn = _resolve(rule)
    weights = _call(fn, gram)
    expected = tuple(gram.shape[:-1])
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != expected:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"rule: expected the weighting to return weights of shape [G, K] = {list(expected)}, "
                         f"got {got}")
    if weights.is_complex() or weights.dtype == torch.bool:
        raise ValueError(f"rule: expected real weights, got dtype {weights.dtype}")
    return weights.to(device=gram.device, dtype=torch.float64), full_cases(gram, Case.WEIGHTED)
