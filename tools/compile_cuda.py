#!/usr/bin/env python
"""Compile every csrc/cuda/*.cu to object code with nvcc, without a GPU and without a CUDA torch.

Catches build breaks of the CUDA sources on machines (CI, laptops) whose torch is a CPU build:
the CPU wheel ships the c10/cuda and ATen/cuda headers these sources include. The flags follow
what torch.utils.cpp_extension passes to nvcc for a CUDAExtension (setup.py).

    python tools/compile_cuda.py                 # sm_90, objects under build/cuda_check/
    python tools/compile_cuda.py --arch 80 --arch 90 --nvcc /usr/local/cuda/bin/nvcc

Prints each command and its result; exits non-zero if nvcc is missing or any file fails.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_flags() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    flags += list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
    flags += [
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DPARETO_LORA_WITH_CUDA",
        "-std=c++20",
        "-O3",
        "--compiler-options",
        "-fPIC",
        # Warnings are errors for our code; torch's own headers are included with -I and warn rarely.
        "--Werror",
        "cross-execution-space-call,all-warnings",
    ]
    # CPU wheels lack the one generated c10/cuda header (it only sets a Windows DLL-export
    # switch); c10 honours this define in its place (ROCm builds use it too).
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h"))
               for p in cpp_extension.include_paths()):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="SM version(s), e.g. 90 (default: 90)")
    parser.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc"), help="nvcc to use")
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "cuda_check"), help="object directory")
    args = parser.parse_args()
    if not args.nvcc:
        print("compile_cuda: nvcc not found (set NVCC or put it on PATH)", file=sys.stderr)
        return 2
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        print("compile_cuda: no csrc/cuda/*.cu found", file=sys.stderr)
        return 2
    arch = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (args.arch or ["90"])]
    os.makedirs(args.out, exist_ok=True)
    flags = torch_flags()
    failed = []
    for src in sources:
        obj = os.path.join(args.out, os.path.splitext(os.path.basename(src))[0] + ".o")
        cmd = [args.nvcc, "-c", src, "-o", obj, *arch, *flags]
        print("compile_cuda:", " ".join(cmd), flush=True)
        t0 = time.time()
        res = subprocess.run(cmd, cwd=ROOT)
        status = "ok" if res.returncode == 0 else f"FAILED (exit {res.returncode})"
        print(f"compile_cuda: {os.path.relpath(src, ROOT)} -> {os.path.relpath(obj, ROOT)}: {status} "
              f"in {time.time() - t0:.1f}s", flush=True)
        if res.returncode != 0:
            failed.append(src)
    print(f"compile_cuda: {len(sources) - len(failed)}/{len(sources)} compiled", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
