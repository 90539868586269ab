"""Build of pareto_lora and its C++/CUDA extension pareto_lora._C.

Install with build isolation off, so the extension compiles against the torch you already have
(an isolated build would download a fresh torch, several GB of CUDA wheels):

    pip install torch==2.13.0            # or the torch build you use
    pip install --no-build-isolation .   # the library: torch and numpy only

Extras: "demo" (the demo experiment: matplotlib, tqdm, scikit-learn), "hf" (transformers, peft,
accelerate), "triton", "docs" (the mkdocs site) and "test" (README's set-up line installs
".[demo,test]").

CUDA/ROCm sources (csrc/cuda/*.cu) join the build when the installed torch is a CUDA or ROCm
build (torch.version.cuda / torch.version.hip), whether or not a GPU is present on the build
machine, provided torch finds the toolkit (CUDA_HOME / ROCM_HOME); without one the CPU extension
is built and one line says CUDA kernels were skipped. PARETO_LORA_CUDA=0 forces a CPU-only build;
PARETO_LORA_CUDA=1 demands the CUDA build and fails if it cannot be made.
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_decision(switch: str, torch_gpu: str | None, toolkit: str | None) -> tuple[bool, str | None]:
    """(build the CUDA/HIP sources?, a line to print) from PARETO_LORA_CUDA, the installed torch's
    GPU flavour ("cuda"/"hip"/None) and the toolkit root torch found (CUDA_HOME/ROCM_HOME or None).

    The default `pip install torch` on Linux is a CUDA build, usually without a CUDA toolkit on the
    machine: then the CPU extension is built and one line says why CUDA kernels were skipped.
    """
    switch = switch.lower()
    if switch in ("0", "false", "no", "off"):
        return False, None
    forced = switch in ("1", "true", "yes", "on")
    if not forced and switch not in ("auto", ""):
        raise RuntimeError(f"PARETO_LORA_CUDA: expected 0, 1 or auto, got {switch!r}")
    if torch_gpu is None:
        if forced:
            raise RuntimeError("PARETO_LORA_CUDA=1 but the installed torch has neither CUDA nor ROCm")
        return False, None
    if toolkit is None:
        kit = "ROCm (ROCM_HOME)" if torch_gpu == "hip" else "CUDA toolkit with nvcc (CUDA_HOME)"
        if forced:
            raise RuntimeError(f"PARETO_LORA_CUDA=1 but no {kit} was found for this {torch_gpu} build of torch")
        return False, (
            f"pareto-lora: {torch_gpu.upper()} kernels skipped (torch is a {torch_gpu} build, but no {kit} was found); "
            f"building the CPU extension. For GPU kernels install the toolkit matching torch, set "
            f"{'ROCM_HOME' if torch_gpu == 'hip' else 'CUDA_HOME'} and reinstall (PARETO_LORA_CUDA=1 makes this an error)."
        )
    return True, None


def want_cuda() -> bool:
    from torch.utils import cpp_extension

    torch_gpu = "cuda" if torch.version.cuda is not None else ("hip" if torch.version.hip is not None else None)
    toolkit = cpp_extension.ROCM_HOME if torch_gpu == "hip" else cpp_extension.CUDA_HOME
    build, note = cuda_decision(os.environ.get("PARETO_LORA_CUDA", "auto"), torch_gpu, toolkit)
    if note:
        print(note, file=sys.stderr)
    return build


def openmp_flags(parallel_info: str, platform: str) -> list[str]:
    """Compile and link flags that make ``at::parallel_for`` parallel in this extension.

    ATen's parallel_for is a header template: compiled without OpenMP (``_OPENMP`` undefined) it
    runs every loop on the calling thread, whatever ``torch.set_num_threads`` says -- the CPU op
    used one thread only until this was added (measured: the same time on 1 and 2 threads). When
    torch's own intra-op backend is OpenMP, -fopenmp makes the extension use torch's libgomp (the
    loader shares the already loaded libgomp.so.1 by soname), so torch.set_num_threads governs it.
    """
    if platform.startswith("linux") and "ATen parallel backend: OpenMP" in parallel_info:
        return ["-fopenmp"]
    return []


def extension():
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    omp = openmp_flags(torch.__config__.parallel_info(), sys.platform)
    cxx = ["-O3"] + omp
    if want_cuda():
        sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "pareto_lora._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DPARETO_LORA_WITH_CUDA"], "nvcc": ["-O3", "-DPARETO_LORA_WITH_CUDA"]},
            extra_link_args=omp,
        )
    return CppExtension("pareto_lora._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=omp)


HF = ["transformers>=4.45", "peft>=0.13", "accelerate>=1.0"]
DEMO = ["matplotlib", "tqdm", "scikit-learn>=1.3"]  # the demo experiment: figures, progress bars, the digits world
DOCS = ["mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]  # `mkdocs build --strict` (tests/test_docs.py)


# setuptools runs this file as __main__; tests import it for cuda_decision without building.
if __name__ == "__main__":
    setup(
        name="pareto-lora",
        version="0.1.0",
        description="Modality-balanced gradient integration (Pareto LoRA, MGDA, MMPareto) for LoRA fine-tuning of multimodal models",
        package_dir={"": "python"},
        packages=find_packages("python"),
        # the default demo's pre-trained base (app/demo/base.py: why it ships)
        package_data={"pareto_lora.app.demo": ["bases/*.pt"]},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
        python_requires=">=3.10",
        # The library needs torch and numpy only; the demo, its figures and progress bars, the docs
        # site and the tests are extras (README's set-up line installs ".[demo,test]").
        install_requires=["torch>=2.4", "numpy"],
        extras_require={
            "hf": HF,
            "triton": ["triton>=3.0"],
            "demo": DEMO,
            "docs": DOCS,
            "test": [
                "pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", *HF, "triton>=3.0", "import-linter>=2.2",
                "scikit-learn>=1.3", *DOCS,
                # the oracle of the gradient-manipulation rules (docs/rules.md); [full] brings the
                # QP solvers its aggregators need (quadprog, cvxpy, ...)
                "torchjd[full]==0.18.0",
            ],
        },
        entry_points={"console_scripts": ["pareto-lora=pareto_lora.app.cli:main"]},
        zip_safe=False,
    )
