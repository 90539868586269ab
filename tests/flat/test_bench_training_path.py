"""bench/bench_training_path.py on a tiny configuration: every contender runs, the kept three-op
path (the "before" of issue 23) gives the fused path's gradients, and the op counts are read."""

import importlib
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_contenders_run_and_agree(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module("bench_training_path")
    monkeypatch.setitem(mod.bts.CONFIGS, "tiny", ("llama", 4, 64, 2, 64, 4))
    fns, pl = mod.build("tiny")
    assert list(fns) == list(mod.ROWS)
    for fn in fns.values():
        fn()
    params = pl.layout.params
    fns["pareto_3op"]()
    old = [p.grad.clone() for p in params]
    fns["pareto_fused"]()
    for p, o in zip(params, old):  # the same batch: the same integrated gradient (sum orders may differ)
        torch.testing.assert_close(p.grad, o, rtol=1e-5, atol=1e-8)
    ours, top = mod.op_counts(fns["integrate_3op"])
    assert ours == {"pareto_lora::segment_stats": 1, "pareto_lora::rule_coefficients": 1, "pareto_lora::combine": 1}
    assert top >= 3
    m, lo, hi = mod.paired_ratio_ci([2.0, 2.2, 1.8], [1.0, 1.0, 1.0])
    assert m == pytest.approx(2.0) and lo < m < hi
