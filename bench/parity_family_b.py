"""How far cagrad, nash_mtl, aligned_mtl and config are from torchjd 0.18's aggregators (docs/rules.md).

Not a timing: the numbers quoted in the "differ from torchjd" part of docs/rules.md come from this
script. Random pairs: norms log-uniform in 10^-3 .. 10^3, the other gradient 10^-3 .. 10^3 times as
long, cosines uniform in [-1, 1]. For each rule it prints the largest ||ours - torchjd||/(||a|| + ||b||)
(for cagrad also divided by (1 + c)), skipping the pairs a documented difference covers, and for
nash_mtl how often torchjd's solver reached the Nash condition (residual rho) and the largest
||ours - torchjd|| / (rho ||ours||).

    python bench/parity_family_b.py [--pairs 300] [--seed 1]
"""

import argparse
import importlib.metadata
import math
import warnings

import numpy as np
import torch
from torchjd.aggregation import AlignedMTL, CAGrad, ConFIG, NashMTL

import pareto_lora
from pareto_lora.rules import CAGRAD_NORM_EPS, CAUCHY_SCHWARZ_SLACK, STATIONARY_REL


def pair(na, nb, cos, gen, n=32):
    x, y = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    x = x / x.norm()
    y = y - (y @ x) * x
    y = y / y.norm()
    return na * x, nb * (cos * x + math.sqrt(max(1.0 - cos * cos, 0.0)) * y)


def ours(a, b, rule, **kw):
    return pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule=rule, backend="reference", **kw).out


def main(pairs: int, seed: int) -> None:
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    worst = {"config": 0.0, "aligned_mtl": 0.0, "cagrad": 0.0}
    nash = {"pairs": 0, "rho<1e-4": 0, "rho<0.1": 0, "err/rho": 0.0}
    for i in range(pairs):
        na = 10 ** rng.uniform(-3, 3)
        nb, cos, c = na * 10 ** rng.uniform(-3, 3), float(rng.uniform(-1, 1)), (0.1, 0.4, 0.9)[i % 3]
        a, b = pair(na, nb, cos, gen)
        j, scale = torch.stack([a, b]), na + nb
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            worst["config"] = max(worst["config"], float((ours(a, b, "config") - ConFIG()(j)).norm()) / scale)
            if abs(cos) < 1 - CAUCHY_SCHWARZ_SLACK:  # difference 5: the rank-1 band
                d = float((ours(a, b, "aligned_mtl") - AlignedMTL()(j)).norm()) / scale
                worst["aligned_mtl"] = max(worst["aligned_mtl"], d)
            if na * na + nb * nb >= CAGRAD_NORM_EPS:  # difference 1: torchjd's absolute trace epsilon
                d = float((ours(a, b, "cagrad", c=c) - CAGrad(c=c)(j)).norm()) / scale / (1 + c)
                worst["cagrad"] = max(worst["cagrad"], d)
            if 2 + 2 * cos > 4 * STATIONARY_REL:  # difference 4: our stationary band
                agg = NashMTL(n_tasks=2)
                ref = agg(j)
                w = np.asarray(agg.weighting.prvs_alpha, dtype=np.float64)
                rho = float(np.max(np.abs(w * ((j @ j.T).numpy() @ w) - 1.0)))
                mine = ours(a, b, "nash_mtl")
                nash["pairs"] += 1
                nash["rho<1e-4"] += rho < 1e-4
                if rho < 0.1:
                    nash["rho<0.1"] += 1
                    nash["err/rho"] = max(nash["err/rho"], float((mine - ref).norm() / mine.norm()) / rho)
    print(f"pairs {pairs}, seed {seed}, torchjd {importlib.metadata.version('torchjd')}")
    print(f"config       max ||ours - torchjd||/(||a|| + ||b||)           {worst['config']:.2e}")
    print(f"aligned_mtl  same, outside the rank-1 band                    {worst['aligned_mtl']:.2e}")
    print(f"cagrad       same / (1 + c), c in (0.1, 0.4, 0.9), trace >= 1e-4 {worst['cagrad']:.2e}")
    print(f"nash_mtl     torchjd's residual rho < 1e-4 on {nash['rho<1e-4']} of {nash['pairs']} pairs, "
          f"< 0.1 on {nash['rho<0.1']}; there max ||ours - torchjd||/(rho ||ours||) = {nash['err/rho']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    ns = parser.parse_args()
    main(ns.pairs, ns.seed)
