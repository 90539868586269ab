"""Runs csrc/cuda's kernels on the CPU: builds tools/cuda_emu/ (the real kernel headers compiled by
g++ through a CUDA shim, blocks as OS threads, CUDA threads as fibers) and calls it through ctypes
on CPU tensors. tests/backends/test_cuda_emulated.py checks the kernels with it; docs/cuda.md says
what the emulation shows and what it cannot.

    emu = Emulator(build(build_dir))
    res = emu.integrate(a, b, offsets, RuleSpec("mgda"), plan="two_pass", max_blocks=3)

The host orchestration of the ops (which launches, which buffers) follows csrc/cuda/ops_cuda.cu and
multi_ops.cu; what is copied here rather than shared (csrc/cuda/launch_plan.h is shared) names its
original.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = ["runtime.cpp", "harness.cpp", "selftest.cpp"]
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _inputs() -> list[str]:
    """Every file the library is built from (its cache key)."""
    files = [os.path.join(HERE, s) for s in SOURCES + ["runtime.h", "context.h", "emu.py"]]
    for top in (os.path.join(HERE, "shim"), os.path.join(ROOT, "csrc")):
        for d, _, names in os.walk(top):
            files += [os.path.join(d, n) for n in names if n.endswith((".h", ".cuh"))]
    return sorted(files)


def build(build_dir: str, warp_size: int = 32) -> str:
    """Compiles the emulation into build_dir (once per content of its sources and warp width: 32 as
    NVIDIA's, 64 as the CDNA wavefronts tools/compile_hip.py compiles for); returns the .so."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++) on PATH")
    from torch.utils import cpp_extension

    torch_dir = os.path.dirname(torch.__file__)
    flags = ["-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas",
             f"-DCUDA_EMU_WARP_SIZE={int(warp_size)}",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             # the shim first: its ATen/cuda/DeviceUtils.cuh shadows torch's
             f"-I{os.path.join(HERE, 'shim')}", *[f"-I{p}" for p in cpp_extension.include_paths()]]
    link = [f"-L{os.path.join(torch_dir, 'lib')}", "-lc10", f"-Wl,-rpath,{os.path.join(torch_dir, 'lib')}"]
    key = hashlib.sha256(" ".join([cxx, *flags]).encode())
    for f in _inputs():
        with open(f, "rb") as fh:
            key.update(f.encode() + fh.read())
    lib = os.path.join(build_dir, f"libcuda_emu_{key.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        os.makedirs(build_dir, exist_ok=True)
        tmp = lib + f".{os.getpid()}.tmp"
        cmd = [cxx, *flags, *[os.path.join(HERE, s) for s in SOURCES], "-o", tmp, *link]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.replace(tmp, lib)
    return lib


class EmulationError(RuntimeError):
    """A kernel deadlocked, mismatched a barrier or ran past its deadline (the message says which)."""


_P = ctypes.c_void_p


class _Job(ctypes.Structure):
    # harness.cpp's EmuJob, field by field.
    _fields_ = [("dtype", ctypes.c_int32), ("reduce", ctypes.c_int32), ("with_rule", ctypes.c_int32),
                ("apply", ctypes.c_int32), ("two_pass", ctypes.c_int32), ("one_pass", ctypes.c_int32),
                ("rule_id", ctypes.c_int32), ("params", ctypes.c_double * 9), ("a", _P), ("b", _P), ("out", _P),
                ("offsets", _P), ("num_segments", ctypes.c_int64), ("stats", _P), ("coeffs_out", _P),
                ("cases", _P), ("coeff_f", _P), ("coeff_d", _P), ("active", _P), ("active_on_host", ctypes.c_int32),
                ("groups", _P), ("num_groups", ctypes.c_int64), ("poison", _P), ("group_active", _P),
                ("group_stats", _P), ("group_coeffs", _P), ("group_cases", _P), ("seg_coeffs", _P),
                ("workspace", _P), ("workspace_words", ctypes.c_int64), ("max_blocks", ctypes.c_int32),
                ("workers", ctypes.c_int32), ("timeout_s", ctypes.c_double), ("seed", ctypes.c_uint64),
                ("launched", ctypes.c_int32)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Emulator:
    """The CUDA ops on CPU tensors, by the emulated kernels. One workspace of counters, as one CUDA
    stream has (ops_cuda.cu workspace()): zeroed once, grown by doubling, reused by every call."""

    def __init__(self, lib: str, timeout_s: float = 30.0):
        self.lib = ctypes.CDLL(lib)
        self.lib.emu_rule_id.argtypes = [ctypes.c_char_p]
        self.lib.emu_counter_words.restype = ctypes.c_int64
        self.lib.emu_counter_words.argtypes = [ctypes.c_int64]
        self.lib.emu_counter_capacity.restype = ctypes.c_int64
        self.lib.emu_counter_capacity.argtypes = [ctypes.c_int64]
        self.lib.emu_tile_elems.restype = ctypes.c_int64
        self.lib.emu_sizeof_job.restype = ctypes.c_int64
        job, buf, i32, i64, dbl = ctypes.POINTER(_Job), ctypes.c_char_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_double
        ptrs = ctypes.POINTER(_P)
        self.lib.emu_launch.argtypes = [job, buf, i64]
        self.lib.emu_group_rule_kernel.argtypes = [job, _P, buf, i64]
        self.lib.emu_rule_kernel.argtypes = [job, _P, i32, buf, i64]
        self.lib.emu_gram.argtypes = [i32, i32, ptrs, _P, i64, _P, i32, dbl, buf, i64]
        self.lib.emu_combine_many.argtypes = [i32, i32, ptrs, _P, _P, i64, _P, i32, i32, dbl, buf, i64]
        self.lib.emu_selftest.argtypes = [i32, dbl, buf, i64]
        assert self.lib.emu_num_params() == 9 and self.lib.emu_sizeof_job() == ctypes.sizeof(_Job)
        self.timeout_s = timeout_s
        self.seed = 0  # runtime.h LaunchConfig::seed: 0 round robin, else a shuffled schedule
        self.warp_size = int(self.lib.emu_warp_size())
        self.workspace = torch.zeros(0, dtype=torch.int32)

    def tile_elems(self, dtype: torch.dtype) -> int:
        return int(self.lib.emu_tile_elems(DTYPES[dtype]))

    def selftest(self, which: int, timeout_s: float = 2.0) -> tuple[int, str]:
        """selftest.cpp's case `which`: (0 correct | 1 reported by the emulation | 2 wrong value, message)."""
        err = ctypes.create_string_buffer(4096)
        rc = self.lib.emu_selftest(which, timeout_s, err, len(err))
        return rc, err.value.decode()

    # ---- plumbing --------------------------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        """``fn(*args, err, len(err))``, an exported entry point; EmulationError with its message if it fails."""
        err = ctypes.create_string_buffer(4096)
        if fn(*args, err, len(err)) != 0:
            raise EmulationError(err.value.decode())

    def _grow_workspace(self, num_segments: int) -> None:
        # ops_cuda.cu workspace(): capacity max(needed, 2 * capacity), zeroed when (re)allocated.
        capacity = int(self.lib.emu_counter_capacity(self.workspace.numel())) if self.workspace.numel() else 0
        needed = max(num_segments, 1)
        if capacity < needed:
            self.workspace = torch.zeros(int(self.lib.emu_counter_words(max(needed, 2 * capacity))), dtype=torch.int32)

    def _job(self, a, b, out, offsets, spec, max_blocks, workers) -> _Job:
        j = _Job()
        j.dtype = DTYPES[a.dtype]
        j.rule_id = self.lib.emu_rule_id(spec.name.encode())
        j.params[:] = [float(x) for x in spec.kernel_params()]
        j.a, j.b, j.out, j.offsets = _ptr(a), _ptr(b), _ptr(out), _ptr(offsets)
        j.num_segments = offsets.numel() - 1
        self._grow_workspace(j.num_segments)
        j.workspace, j.workspace_words = _ptr(self.workspace), self.workspace.numel()
        j.max_blocks, j.workers, j.timeout_s = max_blocks, workers if workers else max_blocks, self.timeout_s
        j.seed = self.seed
        return j

    def _launch(self, j: _Job) -> bool:
        self._call(self.lib.emu_launch, ctypes.byref(j))
        return bool(j.launched)

    # ---- the two-objective ops (ops_cuda.cu) ----------------------------------------------------------
    def integrate(self, a, b, offsets, spec, *, out=None, active=None, active_on_host=True, plan="fused",
                  one_pass=True, max_blocks=4, workers=0, groups=None, poison=None, stats=None):
        """(out, stats, coeffs, cases, group_stats), as ops_cuda.cu integrate_cuda."""
        out = torch.empty_like(a) if out is None else out
        if groups is not None or poison is not None or stats is not None:
            return self._grouped(a, b, offsets, spec, out, active, max_blocks, workers, groups, poison, stats)
        g = offsets.numel() - 1
        st = torch.empty(g, 3, dtype=torch.float64)
        coeffs = torch.empty(g, 2, dtype=torch.float32)
        cases = torch.empty(g, dtype=torch.int32)
        j = self._job(a, b, out, offsets, spec, max_blocks, workers)
        j.reduce = j.with_rule = j.apply = 1
        j.two_pass, j.one_pass = int(plan == "two_pass"), int(one_pass)
        j.stats, j.coeffs_out, j.cases, j.coeff_f = _ptr(st), _ptr(coeffs), _ptr(cases), _ptr(coeffs)
        j.active, j.active_on_host = _ptr(active), int(active_on_host)
        self._launch(j)
        return out, st, coeffs, cases, st.clone()

    def _grouped(self, a, b, offsets, spec, out, active, max_blocks, workers, groups, poison, given):
        # ops_cuda.cu integrate_grouped: the statistics job with the group epilogue in its last block
        # out (or group_rule_kernel alone on given statistics), then the combine.
        s = offsets.numel() - 1
        bounds = torch.arange(s + 1, dtype=torch.int64) if groups is None else groups
        g = bounds.numel() - 1
        st = torch.empty(s, 3, dtype=torch.float64)
        group_stats = torch.empty(g, 3, dtype=torch.float64)
        coeffs = torch.empty(g, 2, dtype=torch.float32)
        cases = torch.empty(g, dtype=torch.int32)
        seg_coeffs = torch.empty(s, 2, dtype=torch.float32)
        j = self._job(a, b, None, offsets, spec, max_blocks, workers)
        j.groups, j.num_groups, j.poison, j.group_active = _ptr(bounds), g, _ptr(poison), _ptr(active)
        j.group_stats, j.group_coeffs, j.group_cases, j.seg_coeffs = (_ptr(group_stats), _ptr(coeffs), _ptr(cases),
                                                                      _ptr(seg_coeffs))
        ruled = False
        if given is not None:
            st.copy_(given)
        else:
            j.reduce, j.stats = 1, _ptr(st)
            ruled = self._launch(j)
        if not ruled and g > 0:
            self._call(self.lib.emu_group_rule_kernel, ctypes.byref(j), _ptr(st))
        self.combine(a, b, offsets, seg_coeffs, out, max_blocks=max_blocks, workers=workers)
        return out, st, coeffs, cases, group_stats

    def segment_stats(self, a, b, offsets, *, max_blocks=4, workers=0):
        st = torch.empty(offsets.numel() - 1, 3, dtype=torch.float64)
        j = self._job(a, b, None, offsets, _SUM, max_blocks, workers)
        j.reduce, j.stats = 1, _ptr(st)
        self._launch(j)
        return st

    def combine(self, a, b, offsets, coeffs, out, *, max_blocks=4, workers=0):
        j = self._job(a, b, out, offsets, _SUM, max_blocks, workers)
        j.apply = 1
        c = coeffs.contiguous()
        if c.dtype == torch.float64:
            j.coeff_d = _ptr(c)
        else:
            j.coeff_f = _ptr(c)
        self._launch(j)
        return out

    def rule_coefficients(self, stats, spec, active=None):
        g = stats.shape[0]
        coeffs, cases = torch.empty(g, 2, dtype=torch.float32), torch.empty(g, dtype=torch.int32)
        s = stats.contiguous()
        j = self._job(torch.empty(0), torch.empty(0), None, torch.zeros(g + 1, dtype=torch.int64), spec, 1, 1)
        j.coeffs_out, j.cases, j.active = _ptr(coeffs), _ptr(cases), _ptr(active)
        self._call(self.lib.emu_rule_kernel, ctypes.byref(j), _ptr(s), int(s.dtype == torch.float64))
        return coeffs, cases

    # ---- the K-objective ops (multi_ops.cu) -----------------------------------------------------------
    def gram(self, grads, offsets, *, workers=2):
        k = len(grads)
        s = offsets.numel() - 1
        stats = torch.empty(s, k * (k + 1) // 2, dtype=torch.float64)
        ptrs = (_P * k)(*[g.data_ptr() for g in grads])
        self._call(self.lib.emu_gram, DTYPES[grads[0].dtype], k, ptrs, _ptr(offsets), s, _ptr(stats), workers,
                   self.timeout_s)
        return stats

    def combine_many(self, grads, offsets, coeffs, out, *, workers=2):
        k = len(grads)
        c = coeffs.contiguous()
        ptrs = (_P * k)(*[g.data_ptr() for g in grads])
        self._call(self.lib.emu_combine_many, DTYPES[grads[0].dtype], k, ptrs, _ptr(out), _ptr(offsets),
                   offsets.numel() - 1, _ptr(c), int(c.dtype == torch.float64), workers, self.timeout_s)
        return out


def _sum_spec():
    from pareto_lora import RuleSpec

    return RuleSpec("sum")


_SUM = _sum_spec()
