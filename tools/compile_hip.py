#!/usr/bin/env python
"""Hipify csrc/cuda and compile every kernel source for AMD GPUs (gfx90a), without a GPU and
without a ROCm torch.

Catches what only a ROCm build would see: CUDA-only intrinsics (``__shfl_down_sync``,
``__nanosleep``, ...), 32-lane warp assumptions, constructs hip-clang rejects. The sources go
through torch's own hipify (``torch.utils.hipify``, exactly as ``torch.utils.cpp_extension`` runs
it for a ROCm build of setup.py) into build/hip_check/src/, then hipcc compiles each kernel source
to object code (``-c``) with ``-Werror``.

Headers: torch's CPU wheel ships c10 and ATen/cuda headers but none of ATen/hip or c10/hip.
* ``ATen/hip/DeviceUtils.cuh`` (WARP_SHFL_DOWN, ...) is generated here by hipifying the wheel's
  ``ATen/cuda/DeviceUtils.cuh``, which is how a ROCm torch produces it: the device helpers the
  kernels call are torch's real ones, with ``USE_ROCM`` on.
* ``c10/hip/HIP{Exception,Guard,Stream}.h`` (host-side runtime glue) come from tools/hip_shim/:
  declarations only, so the host code type-checks around the launches. Nothing is linked.
* tools/hip_shim/pl_hip_check.h is force-included: in device passes it asserts that
  ``C10_WARP_SIZE`` is the target's wavefront width (64 on gfx90a).

    python tools/compile_hip.py                   # gfx90a, objects under build/hip_check/
    python tools/compile_hip.py --arch gfx90a --arch gfx942 --hipcc /opt/rocm/bin/hipcc
    python tools/compile_hip.py --selftest        # shows the check fails on CUDA-only device code

Needs hipcc with the AMD platform (Debian: ``apt-get install hipcc``; HIP_PLATFORM=amd is set
here). Exits non-zero if hipcc is missing (2) or any file fails (1).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "tools", "hip_shim")
# Headers of the wheel that the kernels include under ATen/cuda/ and a ROCm torch ships hipified.
TORCH_DEVICE_HEADERS = ["ATen/cuda/DeviceUtils.cuh"]


def log(msg: str) -> None:
    print(f"compile_hip: {msg}", flush=True)


def hipify_tree(out: str) -> list[str]:
    """Copies csrc/ and the torch device headers under out/src/, hipifies them there; returns the
    hipified kernel sources."""
    from torch.utils import cpp_extension
    from torch.utils.hipify import hipify_python

    src = os.path.join(out, "src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(src, "csrc"))
    extra = []
    for rel in TORCH_DEVICE_HEADERS:
        found = [os.path.join(p, rel) for p in cpp_extension.include_paths() if os.path.exists(os.path.join(p, rel))]
        if not found:
            raise FileNotFoundError(f"{rel} is not in torch's include paths")
        dst = os.path.join(src, "include", rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(found[0], dst)
        extra.append(dst)
    kernels = sorted(glob.glob(os.path.join(src, "csrc", "cuda", "*.cu")))
    # Quiet: hipify prints a banner; failures raise.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = hipify_python.hipify(
            project_directory=src,
            output_directory=src,
            header_include_dirs=[os.path.join(src, "csrc"), os.path.join(src, "include")],
            includes=[os.path.join(src, "*")],
            extra_files=kernels + extra,
            is_pytorch_extension=True,
            hipify_extra_files_only=True,
            show_detailed=False,
            show_progress=False,
        )
    return [result[k].hipified_path or k for k in kernels]


def llvm_tool(hipcc: str, name: str) -> str | None:
    """An LLVM tool next to the clang that hipcc drives (its --version names the directory)."""
    res = subprocess.run([hipcc, "--version"], capture_output=True, text=True, env=dict(os.environ, HIP_PLATFORM="amd"))
    dirs = [line.split(":", 1)[1].strip() for line in res.stdout.splitlines() if line.startswith("InstalledDir:")]
    # Debian's InstalledDir is /usr/bin, where the tools carry a version suffix: look next to the
    # real clang binary instead.
    clangs = sorted(glob.glob(os.path.join(dirs[0], "clang*"))) if dirs else []
    return shutil.which(name, path=os.path.dirname(os.path.realpath(clangs[0]))) if clangs else None


def kernels_in(hipcc: str, obj: str, arch: str) -> list[str] | None:
    """The kernels in obj's code object for `arch` (their .kd descriptors): proof that device code
    was generated, not only parsed. None when the LLVM tools are not found."""
    tools = [llvm_tool(hipcc, t) for t in ("llvm-objcopy", "clang-offload-bundler", "llvm-readelf")]
    if not all(tools):
        return None
    objcopy, bundler, readelf = tools
    with tempfile.TemporaryDirectory() as tmp:
        fat, dev = os.path.join(tmp, "fat.bin"), os.path.join(tmp, "dev.o")
        steps = [
            [objcopy, "-O", "binary", "--only-section=.hip_fatbin", obj, fat],
            [bundler, "--unbundle", "--type=o", f"--input={fat}", f"--targets=hipv4-amdgcn-amd-amdhsa--{arch}",
             f"--output={dev}"],
            [readelf, "-s", "--wide", dev],
        ]
        for cmd in steps:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                return []
    return sorted({line.split()[-1][:-3] for line in res.stdout.splitlines() if line.endswith(".kd")})


def hipcc_flags(out: str, arch: list[str]) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    flags = [f"--offload-arch={a}" for a in arch]
    # Ours first, then torch's as system headers: -Werror is for our code, not for torch's.
    flags += [f"-I{SHIM}", f"-I{os.path.join(out, 'src', 'include')}"]
    flags += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    flags.append(f"-isystem{sysconfig.get_paths()['include']}")
    # What cpp_extension passes to hipcc for a ROCm build.
    flags += list(getattr(cpp_extension, "COMMON_HIPCC_FLAGS", []))
    flags += [
        "-D__HIP_PLATFORM_AMD__=1",
        "-DUSE_ROCM=1",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DPARETO_LORA_WITH_CUDA",
        # C++17, not the C++20 of setup.py: Debian's hip-clang 15 crashes on torch's headers in
        # C++20 HIP mode (a compiler bug: a struct with a std::vector of structs holding a
        # shared_ptr is enough). The kernels need nothing newer; ROCm's own clang builds C++20.
        "-std=c++17",
        "-O3",
        "-fPIC",
        "-Wall",
        "-Werror",
        "-include",
        os.path.join(SHIM, "pl_hip_check.h"),
    ]
    return flags


def compile_one(hipcc: str, src: str, obj: str, flags: list[str], quiet: bool = False) -> tuple[bool, float, str]:
    """Returns (ok, seconds, stderr); quiet captures the output instead of printing it."""
    cmd = [hipcc, "-c", src, "-o", obj, *flags]
    if not quiet:
        log(" ".join(cmd))
    t0 = time.time()
    env = dict(os.environ, HIP_PLATFORM="amd")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=quiet, text=True)
    return res.returncode == 0, time.time() - t0, res.stderr or ""


# Self-test: each snippet is compiled like a kernel source. The control must compile; each other one
# is device code that a ROCm build would reject or miscompute with, and must fail, with the error
# its needle names (so it fails for that reason, not for a broken setup).
# name: (body of a __global__ function, needle in the error or None for the control, flags to drop)
SELFTEST = {
    "control": ("x[threadIdx.x] += WARP_SHFL_DOWN(x[threadIdx.x], 1);", None, ()),
    "shfl_down_sync_full_mask": (
        "x[threadIdx.x] += __shfl_down_sync(0xffffffff, x[threadIdx.x], 1);", "__shfl_down_sync", ()),
    "nanosleep": ("__nanosleep(100);", "__nanosleep", ()),
    "hard_coded_warp_32": (
        'static_assert(C10_WARP_SIZE == 32, "assumes 32-lane warps");', "assumes 32-lane warps", ()),
    "without_USE_ROCM": (
        "x[threadIdx.x] += WARP_SHFL_DOWN(x[threadIdx.x], 1);", "is not the wavefront width", ("-DUSE_ROCM=1",)),
}
SELFTEST_FILE = """#include <hip/hip_runtime.h>
#include <ATen/hip/DeviceUtils.cuh>
__global__ void selftest_kernel(float* x) {{ {body} }}
"""


def selftest(hipcc: str, out: str, arch: list[str]) -> int:
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (body, needle, drop) in SELFTEST.items():
            src = os.path.join(tmp, f"{name}.hip")
            with open(src, "w") as f:
                f.write(SELFTEST_FILE.format(body=body))
            flags = [f for f in hipcc_flags(out, arch) if f not in drop]
            ok, secs, err = compile_one(hipcc, src, os.path.join(tmp, f"{name}.o"), flags, quiet=True)
            passed = ok if needle is None else (not ok and needle in err)
            got = "compiled" if ok else "failed" + (f" with '{needle}'" if needle and needle in err else "")
            log(f"selftest {name}: expected {'to compile' if needle is None else 'to fail'}, {got} ({secs:.1f}s)")
            if not passed:
                bad.append(name)
                print(err[-3000:], file=sys.stderr)
    log("selftest: " + ("passed: the check rejects CUDA-only and warp-32 device code" if not bad
                        else f"FAILED: {', '.join(bad)}"))
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="AMD GPU target(s), e.g. gfx90a (default: gfx90a)")
    parser.add_argument("--hipcc", default=os.environ.get("HIPCC") or shutil.which("hipcc"), help="hipcc to use")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "hip_check"), help="output directory")
    parser.add_argument("--selftest", action="store_true", help="check that CUDA-only device code fails")
    args = parser.parse_args()
    if not args.hipcc:
        log("hipcc not found (set HIPCC or put it on PATH; Debian: apt-get install hipcc)")
        return 2
    arch = args.arch or ["gfx90a"]
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    sources = hipify_tree(args.out)  # also generates ATen/hip/DeviceUtils.cuh, which the selftest includes
    if args.selftest:
        return selftest(args.hipcc, args.out, arch)
    flags = hipcc_flags(args.out, arch)
    failed = []
    for src in sources:
        obj = os.path.join(args.out, os.path.splitext(os.path.basename(src))[0] + ".o")
        ok, secs, _ = compile_one(args.hipcc, src, obj, flags)
        status = "ok" if ok else "FAILED"
        log(f"{os.path.relpath(src, ROOT)} -> {os.path.relpath(obj, ROOT)}: {status} in {secs:.1f}s")
        for a in arch if ok else []:
            kernels = kernels_in(args.hipcc, obj, a)
            if kernels is None:
                log(f"  {a}: kernels not listed (llvm-objcopy/clang-offload-bundler/llvm-readelf not found)")
                continue
            log(f"  {a}: {len(kernels)} kernels in the code object" + "".join(f"\n    {k}" for k in kernels))
            ok = ok and bool(kernels)
        if not ok:
            failed.append(src)
    log(f"{len(sources) - len(failed)}/{len(sources)} compiled for {', '.join(arch)} in {time.time() - t_start:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
