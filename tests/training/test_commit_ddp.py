"""CoMMIT under DDP (issue 27): 2 gloo ranks, each with its own batch. The drifts are token means
over both ranks' batches (all-reduced), so both ranks measure the same kappa, set the same learning
rates and keep bitwise equal parameters; without it rank 0 and rank 1 measured kappa 0.91 and 53."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
from _launch import free_port, run_ranks  # noqa: E402

WORLD = 2


def test_commit_ranks_share_kappa_rates_and_parameters(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "_commit_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = free_port()
    r0, r1 = run_ranks(worker, WORLD, tmp_path, 180, lambda r: [str(r), str(WORLD), str(port), str(tmp_path)],
                       lambda r: env)
    assert all(k is not None for k in r0["kappa"])
    assert r0["kappa"] == r1["kappa"] and r0["lrs"] == r1["lrs"]
    assert len(set(map(tuple, r0["lrs"]))) > 1  # the rates did follow kappa
    for step, (p0, p1) in enumerate(zip(r0["params"], r1["params"])):
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)), f"step {step}"
