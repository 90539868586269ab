"""The demo's figures: per-group gradient-ratio heatmaps and case fractions labelled with their layers."""

import math

import numpy as np
import pytest

from pareto_lora.app.demo import plots
from pareto_lora.app.demo.experiment import RunResult


def _run(rule, seed, ratios, steps=4, layers=([0, 1], [2, 3], [4, 5])):
    """A run whose group g has ratio ratios[g] * (seed + 1) at every step (None = not measured)."""
    recs = []
    for step in range(1, steps + 1):
        groups = {f"group{g}": {"ratio": math.nan if r is None else r * (seed + 1), "case": 1 if g == 0 else 3}
                  for g, r in enumerate(ratios)}
        recs.append({"step": step, "active": [True, False, False], "groups": groups,
                     "layers": {f"layer{i}": {"ratio": 2.0} for i in range(6)}})
    return RunResult(rule, seed, [0, steps], [1.0, 1.0], [1.0, 1.0], recs, 0.1, eval_text_excess=[1.0, 0.5],
                     eval_image_excess=[1.0, 0.5], eval_acc=[0.1, 0.2], group_layers=[list(x) for x in layers])


def test_group_grid_is_the_median_over_seeds_of_log10_ratio():
    runs = [_run("sum", s, [10.0, 1.0, None]) for s in range(3)]  # group0: 10, 20, 30 -> median 20
    grid = plots.group_ratio_grid(runs)
    assert grid.shape == (3, 4)
    assert np.allclose(grid[0], math.log10(20.0)) and np.allclose(grid[1], math.log10(2.0))
    assert np.isnan(grid[2]).all()  # never measured: blank, not zero


def test_group_grid_leaves_out_runs_cut_short():
    runs = [_run("sum", 0, [10.0, 1.0, 1.0]), _run("sum", 1, [10.0, 1.0, 1.0], steps=2)]
    assert np.allclose(plots.group_ratio_grid(runs)[0], 1.0)


def test_group_labels_name_the_layers_and_the_modulated_group():
    assert plots.group_labels(_run("sum", 0, [1.0, 1.0, 1.0])) == ["group0*\nL0-1", "group1\nL2-3", "group2\nL4-5"]
    assert plots.group_labels(_run("sum", 0, [1.0] * 3, layers=())) == ["group0*", "group1", "group2"]


def test_figures_are_written(tmp_path):
    runs = [_run(r, s, [10.0, 1.0, None if r == "mimo" else 0.5]) for r in ("sum", "pareto_lora", "mimo") for s in range(2)]
    files = plots.write_all(runs, str(tmp_path))
    for name in ("group_ratio_heatmaps", "cases", "ratio_heatmaps", "losses", "summary"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert files[name].endswith(f"{name}.png")


def test_case_colours_are_one_per_case():
    import pareto_lora

    colours = plots.case_colors_by_name()
    assert set(colours) == {c.name for c in pareto_lora.Case} and len(set(colours.values())) == len(colours)
