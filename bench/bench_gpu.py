"""GPU benchmark of the fused integration op against its baselines (numbers, not assertions).

    python -m pytest bench/bench_gpu.py --benchmark-json=out.json      # needs a CUDA device

Implementations, all computing stats -> rule (pareto_lora, tau=0.5) -> combine over G segments:
  cuda_fused     the compiled op, one launch (PARETO_LORA_CUDA_PATH=fused)
  cuda_two_pass  the compiled op, reduce launch then apply launch (PARETO_LORA_CUDA_PATH=two_pass)
  triton         pareto_lora.integrate(..., backend="triton")
  torch_strong   plain torch as a careful user writes it: per-segment views, torch.dot stats
                 (float32; bf16 upcast per segment), the rule vectorised on the device, in-place
                 mul/addcmul_ combine (pareto_lora.app.baselines.strong)
  torch_foreach  the multi-tensor path clip_grad_norm_ uses: _foreach_norm, _foreach_mul/addcmul_
  compiled_ref   torch.compile(fullgraph=True) of the reference's float32 vectorised math
  naive_loop     research-code style: a Python loop over segments with .item() host syncs
The float64 reference is the correctness oracle and is not timed (tests/ check every row's
implementation against it; tests/test_bench_baselines.py the baselines).

Grid: numel 1M, 16M, 128M x float32, bfloat16 x G = 1, 64, 1024 (override with
PARETO_LORA_BENCH_NUMELS="1M,16M" and PARETO_LORA_BENCH_IMPLS="cuda_fused,torch_strong").
Per row: median of CUDA-event timings (warmed up; inputs rotated over buffer sets larger than
twice the L2 so small sizes are not served from cache), effective bandwidth = (read a, b once +
write out once) / time, that bandwidth as a fraction of a large device-to-device copy measured
in the same run, and the fused op's speed-up over the row. pytest-benchmark additionally times
one synchronised call per round. Rows are appended to $PARETO_LORA_BENCH_OUT/bench_gpu.csv and
the table bench_gpu.md is rewritten as rows finish, so partial results survive a timeout.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time

import pytest
import torch

import pareto_lora
from pareto_lora.app import baselines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.environ.get("PARETO_LORA_BENCH_OUT", os.path.join(ROOT, ".benchmarks", "gpu"))
RULE, TAU = "pareto_lora", 0.5


def _parse_numel(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text[:-1] if text[-1] in "KMG" else text) * mult


NUMELS = [_parse_numel(t) for t in os.environ.get("PARETO_LORA_BENCH_NUMELS", "1M,16M,128M").split(",")]
DTYPES = [torch.float32, torch.bfloat16]
GS = [1, 64, 1024]
ALL_IMPLS = ["cuda_fused", "cuda_two_pass", "triton", "torch_strong", "torch_foreach", "compiled_ref", "naive_loop"]
IMPLS = [i.strip() for i in os.environ.get("PARETO_LORA_BENCH_IMPLS", ",".join(ALL_IMPLS)).split(",")]
# Implementation-major: under a time limit the fused kernel's rows come first, slow baselines last.
GRID = [(n, d, g, i) for i in IMPLS for n in NUMELS for d in DTYPES for g in GS]


def _id(p) -> str:
    n, d, g, i = p
    return f"{n >> 20}M-{str(d).replace('torch.', '')}-G{g}-{i}"


# ---- inputs -----------------------------------------------------------------------------------------
def lora_like_offsets(numel: int, g: int, seed: int = 0) -> torch.Tensor:
    """G segments of log-normally spread sizes (like LoRA A/B matrices of different layers)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.randn(g, generator=gen, dtype=torch.float64))
    sizes = torch.floor(w / w.sum() * numel).long()
    sizes[0] += numel - int(sizes.sum())
    off = torch.zeros(g + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(sizes, 0)
    return off


class Case:
    """Input buffer sets for one (numel, dtype, G); rotated so repeated calls miss in L2.
    Same seed for every implementation: all rows of a case see identical data."""

    def __init__(self, numel: int, dtype: torch.dtype, g: int):
        self.numel, self.dtype, self.g = numel, dtype, g
        self.offsets = lora_like_offsets(numel, g)
        set_bytes = 3 * numel * torch.empty((), dtype=dtype).element_size()
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
        self.num_sets = max(1, min(16, math.ceil(2 * l2 / set_bytes)))
        gen = torch.Generator(device="cuda").manual_seed(1)
        self.sets = []
        for _ in range(self.num_sets):
            a = torch.randn(numel, device="cuda", generator=gen, dtype=torch.float32)
            b = -0.4 * a + torch.randn(numel, device="cuda", generator=gen, dtype=torch.float32)
            self.sets.append((a.to(dtype), b.to(dtype), torch.empty(numel, device="cuda", dtype=dtype)))
        self.offsets_list = self.offsets.tolist()

    def key(self):
        return (self.numel, self.dtype, self.g)


_CASE: list[Case] = []


def get_case(numel, dtype, g) -> Case:
    if _CASE and _CASE[0].key() == (numel, dtype, g):
        return _CASE[0]
    _CASE.clear()  # free the previous case's buffers first
    torch.cuda.empty_cache()
    _CASE.append(Case(numel, dtype, g))
    return _CASE[0]


# ---- implementations ----------------------------------------------------------------------------------
def _with_path(path):
    def run(case: Case, i: int):
        a, b, out = case.sets[i % case.num_sets]
        os.environ["PARETO_LORA_CUDA_PATH"] = path
        pareto_lora.integrate(a, b, case.offsets, out=out, rule=RULE, tau=TAU, backend="cpp")

    return run


def _triton(case: Case, i: int):
    a, b, out = case.sets[i % case.num_sets]
    pareto_lora.integrate(a, b, case.offsets, out=out, rule=RULE, tau=TAU, backend="triton")


def _baseline(name):
    fn = baselines.BASELINES[name][0]

    def run(case: Case, i: int):
        a, b, out = case.sets[i % case.num_sets]
        fn(a, b, case.offsets, out, RULE, TAU)

    return run


IMPL_FNS = {
    "cuda_fused": _with_path("fused"),
    "cuda_two_pass": _with_path("two_pass"),
    "triton": _triton,
    "torch_strong": _baseline("strong"),
    "torch_foreach": _baseline("foreach"),
    "compiled_ref": _baseline("compiled"),
    "naive_loop": _baseline("naive_loop"),
}


def _available(impl: str) -> str | None:
    """None if impl can run here, else why not."""
    if impl.startswith("cuda_") and "cpp" not in pareto_lora.available_backends("cuda"):
        return "extension built without CUDA kernels"
    if impl == "triton" and "triton" not in pareto_lora.available_backends("cuda"):
        return "triton backend not available"
    return None


# ---- timing ---------------------------------------------------------------------------------------------
def cuda_median_ms(fn, case: Case, budget_s: float = 0.25, min_iters: int = 5, max_iters: int = 200) -> float:
    for i in range(3):  # warm-up: compilation, allocator, caches of host structures
        fn(case, i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(case, 0)
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(min_iters, budget_s / est)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(case, i + 1)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def measure_copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a 1 GiB buffer."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


@pytest.fixture(scope="module")
def copy_gbps():
    return measure_copy_gbps()


@pytest.fixture(scope="module")
def table():
    rows: list[dict] = []
    os.makedirs(OUT_DIR, exist_ok=True)
    csv_path = os.path.join(OUT_DIR, "bench_gpu.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerow(["numel", "dtype", "G", "impl", "median_ms", "eff_GBps", "frac_copy", "copy_GBps"])
    yield rows, csv_path
    os.environ.pop("PARETO_LORA_CUDA_PATH", None)


def _write_markdown(rows):
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["numel"], r["dtype"], r["G"]), {})[r["impl"]] = r
    lines = [
        f"# GPU benchmark: {torch.cuda.get_device_name(0)}, torch {torch.__version__}",
        "",
        "fused x = (time of the row) / (time of cuda_fused); eff. bandwidth = 3 x numel x itemsize / time; "
        "/2-pass, /1-pass = time over 5N, 3N bytes at the copy bandwidth of the same run (1.00 = at the floor).",
        "",
        "| numel | dtype | G | impl | median ms | eff. GB/s | % of copy BW | /2-pass | /1-pass | fused x |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (n, d, g), impls in by_case.items():
        fused = impls.get("cuda_fused")
        for name, r in impls.items():
            speed = f"{r['median_ms'] / fused['median_ms']:.2f}" if fused else "-"
            lines.append(
                f"| {n >> 20}M | {d} | {g} | {name} | {r['median_ms']:.4f} | {r['eff_GBps']:.0f} | "
                f"{100 * r['frac_copy']:.1f} | {0.6 / r['frac_copy']:.2f} | {1 / r['frac_copy']:.2f} | {speed} |"
            )
    with open(os.path.join(OUT_DIR, "bench_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("params", GRID, ids=[_id(p) for p in GRID])
def test_integrate(benchmark, params, copy_gbps, table):
    numel, dtype, g, impl = params
    why = _available(impl)
    if why:
        pytest.skip(why)
    fn = IMPL_FNS[impl]
    case = get_case(numel, dtype, g)
    ms = cuda_median_ms(fn, case)
    nbytes = 3 * numel * case.sets[0][0].element_size()
    gbps = nbytes / (ms * 1e-3) / 1e9
    row = {
        "numel": numel,
        "dtype": str(dtype).replace("torch.", ""),
        "G": g,
        "impl": impl,
        "median_ms": ms,
        "eff_GBps": gbps,
        "frac_copy": gbps / copy_gbps,
        "copy_GBps": copy_gbps,
    }
    rows, csv_path = table
    rows.append(row)
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow([row[k] for k in ("numel", "dtype", "G", "impl", "median_ms", "eff_GBps", "frac_copy",
                                                 "copy_GBps")])
    _write_markdown(rows)
    benchmark.extra_info.update(row)
    counter = iter(range(10**9))

    def one_call():
        fn(case, next(counter))
        torch.cuda.synchronize()

    benchmark.pedantic(one_call, rounds=3, iterations=1, warmup_rounds=1)
