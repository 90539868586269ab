"""mean, constant, upgrad, pcgrad, dualproj and imtl_g against torchjd 0.18's aggregators on the 2-row
matrix [a; b] (docs/rules.md derives the closed forms), their differences by design, their edges and
their norm bounds, on every backend, and on a tiny PEFT model group by group.

Tolerances. Our coefficients are a few float64 operations on the statistics; the compiled backends
store them in float32 (relative error 2^-24 each), and |alpha| ||a|| + |beta| ||b|| <= 2 (||a|| + ||b||)
for every rule here, so outputs agree to 2^-22 (||a|| + ||b||) plus torchjd's own error. torchjd's
error: mean, constant and pcgrad are closed forms in float64 too; upgrad and dualproj solve a QP with
quadprog on G/tr G + reg_eps I, whose condition number is at most (1 + reg_eps)/reg_eps = 1e4, so its
weights carry ~1e4 * 2^-52 ~ 2e-12; imtl_g applies pinv(G), whose error grows as 2^-52 cond(G).
"""

import math
import re

import pytest
import torch
from torchjd.aggregation import IMTLG, PCGrad, Constant, DualProj, Mean, UPGrad
from torchjd.linalg import QuadprogProjector

import pareto_lora
from pareto_lora import Case, RuleSpec
from pareto_lora.rules import STATS_REL_ERR
from pareto_lora.training import ParetoLoRA

import models

FAMILY = ("mean", "constant", "upgrad", "pcgrad", "dualproj", "imtl_g")
SPECS = {name: RuleSpec(name, weights=(0.25, 1.5)) if name == "constant" else RuleSpec(name) for name in FAMILY}
COSINES = (-1.0, -1 + 1e-12, -0.999999, -0.99, -0.7, -0.3, -1e-3, 0.0, 1e-3, 0.3, 0.7, 0.99, 0.999999, 1.0)
NORMS = (0.0, 1e-3, 1e-1, 1.0, 1e1, 1e3)
EPS = 2.0**-52
NORM_EPS = 1e-4  # torchjd's QuadprogProjector: tr G below it -> the Gram is taken as 0 (mean weights)


def aggregator(spec: RuleSpec):
    """torchjd's aggregator of a rule with the spec's parameters."""
    if spec.name == "constant":
        return Constant(torch.tensor(spec.weights, dtype=torch.float64))
    if spec.name in ("upgrad", "dualproj"):
        kind = UPGrad if spec.name == "upgrad" else DualProj
        return kind(projector=QuadprogProjector(norm_eps=NORM_EPS, reg_eps=spec.reg_eps))
    return {"mean": Mean, "pcgrad": PCGrad, "imtl_g": IMTLG}[spec.name]()


def pair(na, nb, cos, n=12, seed=0):
    """a, b (float64, n entries) with ||a|| = na, ||b|| = nb and the given cosine."""
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    u, v = q[:, 0], q[:, 1]
    return na * u, nb * (cos * u + math.sqrt(max(0.0, 1 - cos * cos)) * v)


def grid():
    return [(na, nb, c) for na in NORMS for nb in NORMS for c in COSINES if na > 0 or nb > 0 or c == 0.0]


def pinv_rank(g):
    """The rank torch.linalg.pinv sees in a 2x2 float64 Gram (default rtol 2 * 2^-52)."""
    s = torch.linalg.svdvals(g)
    return int((s > 2 * EPS * s[0]).sum()) if s[0] > 0 else 0


def torchjd_out(spec, a, b):
    """torchjd's aggregate of [a; b]; for upgrad/dualproj below its norm_eps, of the pair scaled to
    trace 1 and scaled back: the direction our scale-invariant rule keeps (docs/rules.md)."""
    j = torch.stack([a, b])
    tr = float((j * j).sum())
    if spec.name in ("upgrad", "dualproj") and 0 < tr < 4 * NORM_EPS:
        return aggregator(spec)(j / math.sqrt(tr)) * math.sqrt(tr)
    return aggregator(spec)(j)


def integrate_pairs(pairs, spec, backend):
    name, dev = backend
    a = torch.cat([p[0] for p in pairs]).to(dev)
    b = torch.cat([p[1] for p in pairs]).to(dev)
    offsets = torch.arange(len(pairs) + 1, dtype=torch.int64) * pairs[0][0].numel()
    res = pareto_lora.integrate(a, b, offsets, rule=spec, backend=name)
    return res.out.cpu().view(len(pairs), -1), res.cases.cpu()


@pytest.mark.parametrize("rule", FAMILY)
def test_matches_torchjd_over_angles_and_norm_ratios(any_backend, rule):
    spec = SPECS[rule]
    pairs = [pair(na, nb, c, seed=i) for i, (na, nb, c) in enumerate(grid())]
    out, _ = integrate_pairs(pairs, spec, any_backend)
    checked = 0
    for (a, b), mine in zip(pairs, out):
        g = torch.stack([a, b]) @ torch.stack([a, b]).T
        scale = float(a.norm() + b.norm())
        tol = 2.0**-22 + 1e-11
        if rule == "imtl_g":
            if pinv_rank(g) < 2 and a.norm() > 0 and b.norm() > 0:
                continue  # torchjd's pinv at rank 1: a different formula (pinned below)
            cond = float(torch.linalg.cond(g)) if pinv_rank(g) == 2 else 1.0
            tol += 16 * EPS * cond
        want = torchjd_out(spec, a, b)
        assert float((mine - want).norm()) <= tol * scale, (rule, float(a.norm()), float(b.norm()), float(a @ b))
        checked += 1
    assert checked >= len(pairs) * 3 // 4


@pytest.mark.parametrize("rule", FAMILY)
def test_float64_coefficients_match_torchjds_weights_tightly(rule):
    """The oracle's float64 coefficients on torchjd's own Gram against its weights (1e-10: the QP's
    ~2e-12, pinv's 2^-52 cond(G) on the well-conditioned pairs kept here)."""
    spec = SPECS[rule]
    for i, (na, nb, c) in enumerate(grid()):
        if abs(c) > 0.99 or min(na, nb) == 0 or na * na + nb * nb < 4 * NORM_EPS:
            continue
        a, b = pair(na, nb, c, seed=i)
        g = torch.stack([a, b]) @ torch.stack([a, b]).T
        stats = torch.stack([g[0, 0], g[1, 1], g[0, 1]])[None]
        res = pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule=spec, stats=stats, backend="reference")
        agg = aggregator(spec)
        want = agg.gramian_weighting(g) if hasattr(agg, "gramian_weighting") else agg.weighting(torch.stack([a, b]))
        err = (res.coeffs[0] - want).abs() * torch.stack([a.norm(), b.norm()])
        assert float(err.sum()) <= 1e-10 * float(a.norm() + b.norm()), (rule, na, nb, c)


def test_imtl_g_at_rank_one_is_the_rank_two_limit_not_torchjds_jump():
    """b = k a: torchjd's pinv gives (a + k b)/(1 + k) = (1 + k^2)/(1 + k) a, which diverges as k -> -1
    (e.g. k = -0.999: 2000 a); our (||b|| a + ||a|| b)/(||a|| + ||b||) is continuous there: 2k/(1 + |k|) a
    for k > 0 (equal to torchjd only at k = 1), 0 for k < 0 (the rank-2 limit of both)."""
    a = pair(1.0, 1.0, 1.0)[0]
    for k in (3.0, 1.0, 0.5, -0.5, -0.999):
        j = torch.stack([a, k * a])
        theirs = IMTLG()(j)
        torch.testing.assert_close(theirs, (1 + k * k) / (1 + k) * a, rtol=1e-9, atol=1e-12)
        mine = pareto_lora.integrate(a, k * a, torch.tensor([0, a.numel()]), rule="imtl_g", backend="reference").out
        limit = (2 * k / (1 + abs(k)) if k > 0 else 0.0) * a
        torch.testing.assert_close(mine, limit, rtol=1e-12, atol=1e-12)
        # the rank-2 limit: a pair 1e-4 rad off the line, where torchjd's pinv is still rank 2
        x, y = pair(1.0, abs(k), math.copysign(math.cos(1e-4), k))
        near = IMTLG()(torch.stack([x, y]))
        ours = pareto_lora.integrate(x, y, torch.tensor([0, x.numel()]), rule="imtl_g", backend="reference").out
        torch.testing.assert_close(ours, near, rtol=0, atol=1e-7 * (1 + abs(k)))
        assert (k == 1.0) == bool(torch.allclose(mine, theirs, rtol=1e-9, atol=1e-12))


@pytest.mark.parametrize("rule", ["upgrad", "dualproj"])
def test_below_torchjds_norm_eps_the_direction_is_kept(rule):
    """torchjd takes a Gram with trace < 1e-4 as zero (mean weights); ours are the same at every scale."""
    a, b = pair(3.0, 1.0, -0.8)
    off = torch.tensor([0, a.numel()])
    big = pareto_lora.integrate(a, b, off, rule=rule, backend="reference").coeffs
    for s in (1e-3, 1e-9, 1e-30):
        small = pareto_lora.integrate(s * a, s * b, off, rule=rule, backend="reference").coeffs
        torch.testing.assert_close(small, big, rtol=1e-14, atol=0)
        theirs = aggregator(SPECS[rule])(torch.stack([s * a, s * b]))
        torch.testing.assert_close(theirs, 0.5 * s * (a + b), rtol=1e-9, atol=0)  # torchjd: the mean
    assert not torch.allclose(big, torch.full_like(big, 0.5))


@pytest.mark.parametrize("rule", ["upgrad", "dualproj"])
def test_reg_eps_zero_is_the_exact_projection(any_backend, rule):
    """reg_eps = 0: out.a >= 0 and out.b >= 0 (in the dual cone), equal to torchjd's with reg_eps 0.
    The default reg_eps stops each projection short of the cone's face (a's projected row keeps
    out.b = a.b reg_eps tr G/(||b||^2 + reg_eps tr G) < 0): a different output."""
    exact = RuleSpec(rule, reg_eps=0.0)
    pairs = [pair(na, nb, c, seed=i) for i, (na, nb, c) in enumerate([(1.0, 3.0, -0.5), (10.0, 0.1, -0.9), (0.2, 5.0, -0.3)])]
    out, cases = integrate_pairs(pairs, exact, any_backend)
    for (a, b), mine in zip(pairs, out):
        scale = float(mine.norm() * (a.norm() + b.norm()))
        assert float(mine @ a) >= -1e-6 * scale and float(mine @ b) >= -1e-6 * scale
        want = aggregator(exact)(torch.stack([a, b]))
        assert float((mine - want).norm()) <= 1e-6 * float(a.norm() + b.norm())
    assert cases.tolist() == [int(Case.PARETO)] * 3
    a, b = pairs[0]
    default = pareto_lora.integrate(a, b, torch.tensor([0, 12]), rule=rule, backend="reference").out
    assert float((default - out[0]).norm()) > 1e-6 * float(a.norm() + b.norm())


EDGE = {  # (a, b) -> expected output for each rule, from the closed forms (docs/rules.md)
    "equal": lambda a: (a, a.clone()),
    "opposite": lambda a: (a, -a),
    "a_zero": lambda a: (torch.zeros_like(a), a),
    "both_zero": lambda a: (torch.zeros_like(a), torch.zeros_like(a)),
    "ratio_1e6": lambda a: (1e6 * a, -0.3 * a + 0.1 * a.flip(0)),
}


def expected_edge(rule, kind, a, b):
    if kind == "both_zero" or (kind == "opposite" and rule != "constant"):
        return torch.zeros_like(a)
    if kind == "equal":
        return {"constant": 1.75 * a, "pcgrad": 2 * a}.get(rule, a)
    if kind == "a_zero":
        return {"constant": 1.5 * b, "pcgrad": b, "imtl_g": b}.get(rule, 0.5 * b)
    if kind == "opposite":
        return -1.25 * a
    return torchjd_out(SPECS[rule], a, b)


@pytest.mark.parametrize("kind", list(EDGE))
@pytest.mark.parametrize("rule", FAMILY)
def test_edges(any_backend, rule, kind):
    name, dev = any_backend
    a, b = EDGE[kind](torch.randn(40, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    res = pareto_lora.integrate(a.float().to(dev), b.float().to(dev), torch.tensor([0, 40]), rule=SPECS[rule], backend=name)
    want = expected_edge(rule, kind, a, b)
    scale = float(a.norm() + b.norm()) + 1e-30
    assert float((res.out.cpu().double() - want).norm()) <= 1e-6 * scale, (rule, kind)
    degenerate = kind in ("a_zero", "both_zero") and rule == "imtl_g"
    assert (int(res.cases[0]) == Case.DEGENERATE) == degenerate


@pytest.mark.parametrize("rule", FAMILY)
def test_nan_in_one_segment_stays_there(any_backend, rule):
    name, dev = any_backend
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, generator=gen).to(dev), torch.randn(300, generator=gen).to(dev)
    a[150] = float("nan")
    res = pareto_lora.integrate(a, b, torch.tensor([0, 100, 200, 300]), rule=SPECS[rule], backend=name)
    assert res.cases.cpu().tolist()[1] == Case.NONFINITE and Case.NONFINITE not in res.cases.cpu().tolist()[::2]
    assert bool(torch.isnan(res.out[150])) and bool(torch.isfinite(res.out[:100]).all() & torch.isfinite(res.out[200:]).all())


def bound(rule, na, nb):
    """The norm bound of docs/rules.md: ||out|| <= bound(rule, ||a||, ||b||)."""
    if rule in ("mean", "upgrad", "dualproj"):
        return 0.5 * (na + nb)
    if rule == "constant":
        return 0.25 * na + 1.5 * nb
    if rule == "imtl_g":
        return torch.where((na > 0) & (nb > 0), 2 * na * nb / (na + nb).clamp_min(1e-300), na + nb)
    return na + nb


def random_stats(count, seed):
    """Statistics over 1e-30 .. 1e30 norms, every angle, a third of them within 1e-9 of anti-parallel."""
    gen = torch.Generator().manual_seed(seed)
    na = 10 ** (torch.rand(count, generator=gen, dtype=torch.float64) * 60 - 30)
    nb = na * 10 ** (torch.rand(count, generator=gen, dtype=torch.float64) * 12 - 6)
    cos = torch.rand(count, generator=gen, dtype=torch.float64) * 2 - 1
    cos[::3] = -1 + 1e-9 * torch.rand(len(cos[::3]), generator=gen, dtype=torch.float64)
    return torch.stack([na * na, nb * nb, cos * na * nb], 1)


def out_norm(c, s):
    """||alpha a + beta b|| from the statistics alone."""
    return (c[:, 0] ** 2 * s[:, 0] + c[:, 1] ** 2 * s[:, 1] + 2 * c[:, 0] * c[:, 1] * s[:, 2]).clamp_min(0).sqrt()


@pytest.mark.parametrize("rule", FAMILY)
def test_norm_bound_and_no_amplified_rounding(any_backend, rule):
    """||out|| <= the rule's bound, and statistics moved by their trusted error STATS_REL_ERR move the
    output by at most 2 STATS_REL_ERR (||a|| + ||b||): q_a ||a|| <= ||b|| whatever the angle, so no
    rule here divides by a norm or an output made of rounding (mmpareto needs STATIONARY for that)."""
    name, dev = any_backend
    s = random_stats(600, seed=11)
    na, nb = s[:, 0].sqrt(), s[:, 1].sqrt()
    coeffs, cases = pareto_lora.rule_coefficients(s.to(dev), SPECS[rule], backend=name)
    c = coeffs.cpu().double()
    assert bool((cases.cpu() != Case.NONFINITE).all())
    assert bool((out_norm(c, s) <= bound(rule, na, nb) * (1 + 1e-6)).all())
    gen = torch.Generator().manual_seed(12)
    wiggle = (torch.rand(600, 3, generator=gen, dtype=torch.float64) * 2 - 1) * STATS_REL_ERR
    moved = torch.stack([s[:, 0] * (1 + wiggle[:, 0]), s[:, 1] * (1 + wiggle[:, 1]), s[:, 2] + wiggle[:, 2] * na * nb], 1)
    c2 = pareto_lora.rule_coefficients(moved.to(dev), SPECS[rule], backend=name)[0].cpu().double()
    # ||(c2 - c) . [a; b]|| on the true statistics, against 2 STATS_REL_ERR (||a|| + ||b||) and float32 rounding
    slack = 2.0**-23 * (c.abs()[:, 0] * na + c.abs()[:, 1] * nb)
    assert bool((out_norm(c2 - c, s) <= 2.0 * STATS_REL_ERR * (na + nb) * (1 + 1e-6) + slack).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", FAMILY)
def test_half_precision_inputs(backend, rule, dtype):
    """bf16/fp16 gradients: the coefficients of the float64 statistics of the values as stored."""
    name, dev = backend
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(500, generator=gen).to(dtype).to(dev)
    b = (-0.4 * a.float().cpu() + 0.2 * torch.randn(500, generator=gen)).to(dtype).to(dev)
    off = torch.tensor([0, 200, 500])
    res = pareto_lora.integrate(a, b, off, rule=SPECS[rule], backend=name)
    ref = pareto_lora.integrate(a.cpu().double(), b.cpu().double(), off, rule=SPECS[rule], backend="reference")
    assert res.out.dtype == dtype and res.cases.cpu().tolist() == ref.cases.tolist()
    torch.testing.assert_close(res.coeffs.cpu().double(), ref.coeffs, rtol=1e-6, atol=0)
    torch.testing.assert_close(res.out.cpu().double(), ref.out, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("rule", ["mean", "upgrad", "pcgrad", "dualproj", "imtl_g"])
def test_swap_symmetry(any_backend, rule):
    name, dev = any_backend
    s = random_stats(200, seed=4).to(dev)
    c1, k1 = pareto_lora.rule_coefficients(s, rule, backend=name)
    c2, k2 = pareto_lora.rule_coefficients(s[:, [1, 0, 2]], rule, backend=name)
    assert torch.equal(k1, k2) and torch.equal(c1, c2.flip(1))


def _losses(model, batch):
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


@pytest.fixture(scope="module")
def llama():
    return models.lora_llama(num_layers=3)


@pytest.mark.parametrize("rule", FAMILY)
def test_peft_model_per_group_equals_torchjd(llama, rule):
    """ParetoLoRA on a tiny LoRA Llama, one layer per group: each group's gradient is torchjd's aggregate
    of that group's 2-row Jacobian [g_text; g_image] from plain autograd (float32 model: the tolerance
    of the oracle tests, 2e-5 relative)."""
    spec = SPECS[rule]
    batch = models.token_batch(seed=4)  # every group conflicts (cos -0.4 .. -0.7)
    named = [(n, p) for n, p in llama.named_parameters() if p.requires_grad]
    lt, li = _losses(llama, batch)
    li = 5.0 * li  # ||b|| > ||a||/|cos| in every group: dualproj's constraint is active too
    text = torch.autograd.grad(lt, [p for _, p in named], retain_graph=True)
    image = torch.autograd.grad(li, [p for _, p in named])
    layer = {n: int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n, _ in named}
    pl = ParetoLoRA(llama, rule=spec, num_groups=3, modulate="all")
    lt2, li2 = _losses(llama, batch)
    report = pl.backward(lt2, 5.0 * li2)
    for g in range(3):
        idx = [i for i, (n, _) in enumerate(named) if layer[n] == g]
        a = torch.cat([text[i].reshape(-1) for i in idx]).double()
        b = torch.cat([image[i].reshape(-1) for i in idx]).double()
        want = torchjd_out(spec, a, b)
        got = torch.cat([named[i][1].grad.reshape(-1) for i in idx]).double()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7 * float(a.norm() + b.norm()))
        if rule in ("upgrad", "pcgrad", "dualproj"):
            assert report.cases[g] == Case.PARETO
        else:
            assert report.cases[g] == Case.WEIGHTED
    llama.zero_grad(set_to_none=True)
