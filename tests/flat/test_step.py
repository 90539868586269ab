"""The flat-buffer step's building blocks (pareto_lora.flat.step)."""

import torch

import pareto_lora


def test_sum_into_groups_matches_index_add():
    gen = torch.Generator().manual_seed(1)
    stats = torch.rand(9, 3, generator=gen)
    stats[4, 0] = float("nan")  # stays inside its own group
    seg_group = torch.tensor([0, 0, 2, 1, 3, 2, 0, 1, 1])
    expected = torch.zeros(5, 3).index_add_(0, seg_group, stats)
    got = pareto_lora.flat.sum_into_groups(stats, seg_group, 5)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert bool(torch.isfinite(got[[0, 1, 2, 4]]).all()) and bool(got[4].eq(0).all())
