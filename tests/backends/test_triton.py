"""What is specific to the Triton backend (python/pareto_lora/triton_ops.py).

The op-by-op comparison against the reference for every backend lives in tests/test_ops.py; here:
the tile table for odd layouts, the kernels on layouts that exercise the tiling (segments spanning
several tiles, empty and one-element segments, many segments), fused == unfused, bitwise
determinism, the float64 rule parameters, the torch.library registration and what torch.compile
sees of the ops.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
before triton is imported). torch.compile cannot trace interpreted kernels (torch.library.wrap_triton
hands them back unwrapped), so on CPU the graph capture is checked in a subprocess with the
interpreter off: tracing needs the kernels' signatures, not a device to run them.
"""

import json
import os
import subprocess
import sys
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton", reason="the Triton backend needs the optional 'triton' package")

import pareto_lora  # noqa: E402
from pareto_lora import Case, RuleSpec, reference  # noqa: E402
from pareto_lora.backends.triton import ops as T  # noqa: E402
from _inputs import make_pair, random_offsets, random_sizes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RULES = pareto_lora.RULES
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OUT_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
B = T.BLOCK

# Segment sizes that cut the buffer into tiles in every awkward way.
LAYOUTS = {
    "one_tile": [B],
    "tile_plus_one": [B + 1],
    "multi_tile_with_empties": [0, 3 * B + 17, 0, 0, 1, B - 1, 2 * B],
    "one_element_segments": [1] * 40,
    "leading_trailing_empty": [0, 0, 777, 0],
}


def _offsets(sizes):
    return random_offsets(sizes)


def _assert_tile_table(offsets, tiles, seg_tiles, block):
    """Tiles cover each segment exactly, in order, never cross a boundary, and hold <= block."""
    off = offsets.tolist()
    g = len(off) - 1
    tiles, seg_tiles = tiles.cpu(), seg_tiles.cpu()
    assert tiles.dtype == seg_tiles.dtype == torch.int64
    assert seg_tiles.shape == (g + 1,) and int(seg_tiles[0]) == 0
    assert tiles.shape == (3, int(seg_tiles[-1]))
    for s in range(g):
        lo, hi = int(seg_tiles[s]), int(seg_tiles[s + 1])
        assert hi - lo == -(-(off[s + 1] - off[s]) // block)  # ceil: no wasted tiles
        pos = off[s]
        for t in range(lo, hi):
            seg, start, end = tiles[:, t].tolist()
            assert seg == s and start == pos and 0 < end - start <= block and end <= off[s + 1]
            pos = end
        assert pos == off[s + 1]


# ---- availability and registration ------------------------------------------------------------
def test_is_available_follows_device_and_interpreter(monkeypatch):
    assert T.is_available("cuda") == torch.cuda.is_available()
    assert not T.is_available("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.is_available("cpu") == T._KERNELS_INTERPRETED  # the kernels were defined interpreted
    if DEVICE == "cpu":
        assert T.is_available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not T.is_available("cpu")


def test_backend_is_offered_for_the_test_device():
    assert "triton" in pareto_lora.available_backends(DEVICE)


def test_unavailable_device_raises_before_writing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b = torch.ones(10), torch.ones(10)
    out = torch.full((10,), 7.0)
    with pytest.raises(RuntimeError, match="backend='triton'.*'cpu'"):
        T.integrate(a, b, torch.tensor([0, 10]), out)
    assert bool((out == 7.0).all())


def test_ops_registered_with_mutation_annotations():
    ops = torch.ops.pareto_lora_triton
    for name, mutated in [("segment_stats", set()), ("rule_coefficients", set()), ("combine", {"out"}), ("integrate", {"out"})]:
        schema = getattr(ops, name).default._schema
        written = {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}
        assert written == mutated, name


def _op_args():
    gen = torch.Generator().manual_seed(0)
    offsets = _offsets([100, 0, 200])
    a, b = make_pair(300, torch.float32, DEVICE, gen)
    tiles, seg_tiles = T.tile_table(offsets, a.device)
    stats = T.segment_stats(a, b, offsets)
    active = torch.tensor([True, False, True], device=DEVICE)
    coeffs = torch.rand(3, 2, generator=gen).to(DEVICE)
    ops = torch.ops.pareto_lora_triton
    return [
        (ops.segment_stats, (a, b, tiles, seg_tiles)),
        (ops.rule_coefficients, (stats, "mmpareto", True, T.rule_params(RuleSpec("mmpareto", gamma=1.5, symmetric=True), DEVICE), active)),
        (ops.combine, (a, b, tiles, coeffs, torch.empty_like(a))),
        (ops.integrate, (a, b, tiles, seg_tiles, torch.empty_like(a), "pareto_lora", False, T.rule_params(RuleSpec(), DEVICE), None)),
    ]


@pytest.mark.parametrize("index", range(4), ids=["segment_stats", "rule_coefficients", "combine", "integrate"])
def test_opcheck(index):
    """Schema (declared mutations are the real ones) and autograd registration everywhere; the
    fake-tensor and AOT checks need traceable kernels, i.e. a GPU (the interpreter is opaque)."""
    op, args = _op_args()[index]
    utils = ("test_schema", "test_autograd_registration")
    if DEVICE == "cuda":
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils)


# ---- torch.compile ----------------------------------------------------------------------------
_CAPTURE = textwrap.dedent(
    """
    import json, os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    import pareto_lora
    from pareto_lora.backends.triton import ops as T

    ops = torch.ops.pareto_lora_triton
    offsets = torch.tensor([0, 5000, 5000, 5001, 9000])
    a, b = torch.randn(9000), torch.randn(9000)
    tiles, seg_tiles = T.tile_table(offsets, a.device)
    active = torch.tensor([True, False, True, True])
    mm = T.rule_params(pareto_lora.RuleSpec("mmpareto", tau=0.3, gamma=1.5, symmetric=True), a.device)
    pl = T.rule_params(pareto_lora.RuleSpec(), a.device)

    def integrate(a, b):
        out = torch.empty_like(a)
        stats, coeffs, cases = ops.integrate(a, b, tiles, seg_tiles, out, "mmpareto", True, mm, active)
        return out * 2, stats, coeffs, cases

    def unfused(a, b):
        stats = ops.segment_stats(a, b, tiles, seg_tiles)
        coeffs, cases = ops.rule_coefficients(stats, "pareto_lora", False, pl, None)
        out = torch.empty_like(a)
        ops.combine(a, b, tiles, coeffs, out)
        return out, cases

    group_tiles, groups = T.group_table(offsets, torch.tensor([0, 3, 4]), a.device)
    poison = torch.tensor(False)

    def step(a, b):
        out = torch.empty_like(a)
        stats, group_stats, coeffs, cases = ops.integrate_step(
            a, b, tiles, seg_tiles, group_tiles, groups, out, "pareto_lora", False, pl, None, poison, None)
        return out * 2, stats, group_stats, coeffs, cases

    class Captured(Exception):
        pass

    def kernels_in(fn, dynamic):
        names = []
        def fw_compiler(gm, example_inputs):
            for node in gm.graph.nodes:
                if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                    names.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
            def run(*args):
                raise Captured()  # no device here to run the kernels on
            return run
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=aot_autograd(fw_compiler=fw_compiler))
        try:
            compiled(a, b)
        except Captured:
            pass
        return names

    json.dump({
        "integrate": kernels_in(integrate, False),
        "integrate_dynamic": kernels_in(integrate, True),
        "unfused": kernels_in(unfused, False),
        "step": kernels_in(step, False),
    }, sys.stdout)
    """
)


def test_torch_compile_traces_into_the_kernels():
    """fullgraph compile of functions calling the ops: the AOT graph holds our kernels, in order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CAPTURE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    fused = ["tile_stats_kernel", "segment_reduce_kernel", "combine_kernel"]
    assert found["integrate"] == fused
    assert found["integrate_dynamic"] == fused
    assert found["unfused"] == ["tile_stats_kernel", "segment_reduce_kernel", "rule_kernel", "combine_kernel"]
    assert found["step"] == ["tile_stats_kernel", "segment_reduce_kernel", "group_rule_kernel", "combine_kernel"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling and running Triton kernels needs a GPU")
def test_torch_compile_runs_and_matches_eager():
    gen = torch.Generator().manual_seed(1)
    offsets = _offsets(LAYOUTS["multi_tile_with_empties"])
    a, b = make_pair(int(offsets[-1]), torch.float32, "cuda", gen)
    tiles, seg_tiles = T.tile_table(offsets, a.device)
    params = T.rule_params(pareto_lora.RuleSpec(), a.device)

    def step(a, b):
        out = torch.empty_like(a)
        stats, coeffs, cases = torch.ops.pareto_lora_triton.integrate(
            a, b, tiles, seg_tiles, out, "pareto_lora", False, params, None
        )
        return out * 2, stats, coeffs, cases

    eager = step(a, b)
    compiled = torch.compile(step, fullgraph=True)(a, b)
    for x, y in zip(eager, compiled):
        assert torch.equal(x, y)


# ---- tile table -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sizes",
    [[], [0], [0, 0, 0], [1], [4], [5], [1, 0, 1, 0, 1], [3, 4, 5, 0, 9, 12, 13, 1], [2] * 1000],
    ids=lambda s: f"{len(s)}seg",
)
def test_tile_table_small_block(sizes):
    offsets = _offsets(sizes)
    tiles, seg_tiles = T._build_tile_table(offsets, block=4)
    _assert_tile_table(offsets, tiles, seg_tiles, 4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tile_table_kernel_block(layout):
    offsets = _offsets(LAYOUTS[layout])
    tiles, seg_tiles = T.tile_table(offsets, torch.device(DEVICE))
    assert tiles.device.type == seg_tiles.device.type == DEVICE
    _assert_tile_table(offsets, tiles, seg_tiles, B)


def test_tile_table_cached_per_offsets_content():
    first = T.tile_table(torch.tensor([0, 3, 10]), torch.device(DEVICE))
    again = T.tile_table(torch.tensor([0, 3, 10]), torch.device(DEVICE))  # new tensor, same values
    other = T.tile_table(torch.tensor([0, 4, 10]), torch.device(DEVICE))
    assert again[0] is first[0] and again[1] is first[1]
    assert other[0] is not first[0] and not torch.equal(other[0], first[0])


# ---- agreement with the reference on tiling-sensitive layouts ---------------------------------
def _assert_stats_close(stats, a, b, offsets):
    ref = reference.segment_stats(a.double().cpu(), b.double().cpu(), offsets)
    assert stats.dtype == torch.float64 and stats.shape == ref.shape
    scale = torch.stack([ref[:, 0], ref[:, 1], (ref[:, 0] * ref[:, 1]).sqrt()], dim=1)
    err = (stats.cpu() - ref).abs()
    assert bool((err <= 1e-12 * scale + 1e-300).all()), f"max err {err.max()}"


def _assert_out_close(out, a, b, offsets, coeffs):
    a64, b64, c = a.double().cpu(), b.double().cpu(), coeffs.double().cpu()
    ref = reference.combine(a64, b64, offsets, c)
    seg = reference.segment_ids(offsets, torch.device("cpu"))
    scale = c[seg, 0].abs() * a64.abs() + c[seg, 1].abs() * b64.abs()
    assert bool(((out.double().cpu() - ref).abs() <= OUT_TOL[out.dtype] * scale + 1e-30).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_integrate_matches_reference_on_tiled_layout(rule, dtype):
    gen = torch.Generator().manual_seed(RULES.index(rule) * 10 + DTYPES.index(dtype))
    sizes = LAYOUTS["multi_tile_with_empties"] + [1, 1, 2]
    offsets = _offsets(sizes)
    a, b = make_pair(int(offsets[-1]), dtype, DEVICE, gen, corr=float(torch.empty(1).uniform_(-0.6, 0.6, generator=gen)))
    active = (torch.rand(len(sizes), generator=gen) > 0.2).to(DEVICE)
    out = torch.empty_like(a)
    _, stats, coeffs, cases = T.integrate(a, b, offsets, out, RuleSpec(rule, 0.4, 1.5, True), active=active)
    _assert_stats_close(stats, a, b, offsets)
    ref_coeffs, ref_cases = pareto_lora.rule_coefficients(stats.cpu(), rule, 0.4, active.cpu(), 1.5, True, backend="reference")
    assert coeffs.dtype == torch.float32 and cases.dtype == torch.int32
    torch.testing.assert_close(coeffs.cpu(), ref_coeffs, rtol=1e-6, atol=0)
    assert torch.equal(cases.cpu(), ref_cases)
    _assert_out_close(out, a, b, offsets, coeffs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_equals_unfused_bitwise(dtype):
    """integrate == segment_stats -> rule_coefficients -> combine, bit for bit: the fused reduce
    applies the rule to the same float32-rounded stats the rule kernel would read."""
    gen = torch.Generator().manual_seed(17)
    offsets = _offsets(random_sizes(37, 900, gen, empty_every=5) + [2 * B + 3])
    a, b = make_pair(int(offsets[-1]), dtype, DEVICE, gen, corr=-0.3)
    active = (torch.rand(38, generator=gen) > 0.3).to(DEVICE)
    for rule in RULES:
        out = torch.empty_like(a)
        _, stats, coeffs, cases = T.integrate(a, b, offsets, out, RuleSpec(rule, 0.5, 0.8), active=active)
        stats2 = T.segment_stats(a, b, offsets)
        coeffs2, cases2 = T.rule_coefficients(stats2, RuleSpec(rule, 0.5, 0.8), active=active)
        out2 = torch.empty_like(a)
        T.combine(a, b, offsets, coeffs2, out2)
        assert torch.equal(stats, stats2) and torch.equal(coeffs, coeffs2) and torch.equal(cases, cases2), rule
        assert torch.equal(out, out2), rule


def test_many_segments():
    """More segments than one reduce program handles, not a multiple of its width, with empties."""
    gen = torch.Generator().manual_seed(23)
    g = 16 * 40 + 5
    offsets = _offsets(random_sizes(g, 3, gen, empty_every=7))
    a, b = make_pair(int(offsets[-1]), torch.float32, DEVICE, gen, corr=-0.4)
    out = torch.empty_like(a)
    _, stats, coeffs, cases = T.integrate(a, b, offsets, out, RuleSpec("pareto_lora", 0.5))
    _assert_stats_close(stats, a, b, offsets)
    ref_coeffs, ref_cases = pareto_lora.rule_coefficients(stats.cpu(), "pareto_lora", 0.5, backend="reference")
    torch.testing.assert_close(coeffs.cpu(), ref_coeffs, rtol=1e-6, atol=0)
    assert torch.equal(cases.cpu(), ref_cases)
    empty = (offsets[1:] == offsets[:-1]).to(DEVICE)
    assert bool((stats[empty] == 0).all()) and bool((cases[empty] == Case.DEGENERATE).all())
    _assert_out_close(out, a, b, offsets, coeffs)


@pytest.mark.parametrize("sizes", [[], [0, 0, 0]], ids=["no_segments", "all_empty"])
def test_empty_buffer(sizes):
    offsets = _offsets(sizes)
    a = b = out = torch.empty(0, device=DEVICE)
    g = len(sizes)
    _, stats, coeffs, cases = T.integrate(a, b, offsets, out, RuleSpec("mmpareto", 0.5))
    assert stats.shape == (g, 3) and coeffs.shape == (g, 2) and cases.shape == (g,)
    assert bool((stats == 0).all()) and bool((coeffs == 1).all()) and bool((cases == Case.DEGENERATE).all())
    assert T.segment_stats(a, b, offsets).shape == (g, 3)


# ---- determinism ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    gen = torch.Generator().manual_seed(31)
    offsets = _offsets([5 * B + 11, 0, 1, 3 * B, 900])
    a, b = make_pair(int(offsets[-1]), dtype, DEVICE, gen, corr=-0.2)
    runs = []
    for _ in range(2):
        out = torch.empty_like(a)
        runs.append(tuple(T.integrate(a, b, offsets, out, RuleSpec("mmpareto", 0.5, 1.3))))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


# ---- the rule kernel --------------------------------------------------------------------------
def test_tau_reaches_the_rule_as_float64():
    """||a|| = 0.1 + 1e-10, ||b|| = 1: above tau = 0.1 in float64 but below float32(0.1), so a
    tau narrowed to float32 on the way into the kernel would flip the case."""
    na = 0.1 + 1e-10
    stats = torch.tensor([[na * na, 1.0, 0.0]], dtype=torch.float64, device=DEVICE)
    coeffs, cases = T.rule_coefficients(stats, RuleSpec("rescale_only", 0.1))
    ref_coeffs, ref_cases = pareto_lora.rule_coefficients(stats.cpu(), "rescale_only", 0.1, backend="reference")
    assert int(ref_cases[0]) == Case.RESCALED
    assert torch.equal(cases.cpu(), ref_cases)
    torch.testing.assert_close(coeffs.cpu(), ref_coeffs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_rule_kernel_on_many_random_stats(rule, symmetric):
    """More segments than one rule program covers; decisions on both sides of every threshold."""
    gen = torch.Generator().manual_seed(3 + RULES.index(rule))
    g = 1000
    na = torch.rand(g, generator=gen) * 4
    nb = torch.rand(g, generator=gen) * 4
    cos = torch.rand(g, generator=gen) * 2 - 1
    stats = torch.stack([na**2, nb**2, cos * na * nb], dim=1)
    stats[::50, 2] = -stats[::50, 0]  # a.b = -||a||^2: lambda hits its clamp at 1
    stats[7::50] = stats[7::50, :1].expand(-1, 3).clone()  # a == b in norm and direction
    active = torch.rand(g, generator=gen) > 0.1
    coeffs, cases = T.rule_coefficients(stats.to(DEVICE), RuleSpec(rule, 0.6, 2.0, symmetric), active=active.to(DEVICE))
    ref_coeffs, ref_cases = pareto_lora.rule_coefficients(stats, rule, 0.6, active, 2.0, symmetric, backend="reference")
    assert torch.equal(cases.cpu(), ref_cases)
    torch.testing.assert_close(coeffs.cpu(), ref_coeffs, rtol=1e-6, atol=0)
