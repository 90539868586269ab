"""The weightings that do not look at the Gram: sum, mean and the constant weights."""

from __future__ import annotations

import torch

from ...rules import Case, RuleSpec
from .base import full_cases

__all__ = ["sum_weighting", "mean_weighting", "constant_weighting"]


def sum_weighting(gram: torch.Tensor, spec: RuleSpec):
    """Every weight 1 (vanilla LoRA on the summed losses); case SUMMED."""
    k = gram.shape[-1]
    return gram.new_ones((*gram.shape[:-2], k)), full_cases(gram, Case.SUMMED)


def mean_weighting(gram: torch.Tensor, spec: RuleSpec):
    """Every weight 1/K (torchjd Mean); case WEIGHTED."""
    k = gram.shape[-1]
    return gram.new_full((*gram.shape[:-2], k), 1.0 / k), full_cases(gram, Case.WEIGHTED)


def constant_weighting(gram: torch.Tensor, spec: RuleSpec):
    """``spec.weights`` (one per objective; torchjd Constant); case WEIGHTED."""
    k = gram.shape[-1]
    if len(spec.weights) != k:
        raise ValueError(f"weights: expected {k} weights (one per objective), got {len(spec.weights)}")
    w = torch.tensor(spec.weights, dtype=gram.dtype, device=gram.device)
    return w.expand(*gram.shape[:-2], k).clone(), full_cases(gram, Case.WEIGHTED)
