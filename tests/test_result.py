"""pareto_lora.result: the per-segment metrics read from the statistics."""

import math

import torch

from pareto_lora.result import stats_metrics


def test_metrics_of_valid_zero_and_missing_statistics():
    nan = math.nan
    stats = torch.tensor([[1.0, 4.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [nan, nan, nan], [1.0, 1.0, nan]],
                         dtype=torch.float64)
    na, nb, cos, ratio = stats_metrics(stats)
    assert na[:3].tolist() == [1.0, 0.0, 0.0] and nb[:3].tolist() == [2.0, 1.0, 0.0]
    assert cos[:3].tolist() == [-0.5, 0.0, 0.0]  # a zero norm: cos 0 by convention
    assert ratio[0] == 0.5 and ratio[1] == 0.0 and math.isnan(ratio[2])
    # statistics that were not taken (NaN rows) read as NaN, never as a cosine of 0
    assert torch.isnan(cos[3:]).all() and torch.isnan(na[3]) and torch.isnan(ratio[3])
