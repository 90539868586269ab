"""Build of pareto_lora and its C++/CUDA extension pareto_lora._C.

Install with build isolation off, so the extension compiles against the torch you already have
(an isolated build would download a fresh torch, several GB of CUDA wheels):

    pip install torch==2.13.0            # or the torch build you use
    pip install --no-build-isolation .

CUDA/ROCm sources (csrc/cuda/*.cu) join the build when the installed torch is a CUDA or ROCm
build (torch.version.cuda / torch.version.hip), whether or not a GPU is present on the build
machine. PARETO_LORA_CUDA=0 forces a CPU-only build; PARETO_LORA_CUDA=1 demands the CUDA build
and fails if the installed torch cannot do it.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    has_gpu_torch = torch.version.cuda is not None or torch.version.hip is not None
    switch = os.environ.get("PARETO_LORA_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if switch in ("1", "true", "yes", "on"):
        if not has_gpu_torch:
            raise RuntimeError("PARETO_LORA_CUDA=1 but the installed torch has neither CUDA nor ROCm")
        return True
    return has_gpu_torch


def extension():
    rel = lambda paths: sorted(os.path.relpath(p, HERE) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3"]
    if want_cuda():
        sources += rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "pareto_lora._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DPARETO_LORA_WITH_CUDA"], "nvcc": ["-O3", "-DPARETO_LORA_WITH_CUDA"]},
        )
    return CppExtension("pareto_lora._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="pareto-lora",
    version="0.1.0",
    description="Modality-balanced gradient integration (Pareto LoRA, MGDA, MMPareto) for LoRA fine-tuning of multimodal models",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "hf": ["transformers>=4.45", "peft>=0.13", "accelerate>=1.0"],
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "transformers>=4.45", "peft>=0.13", "accelerate>=1.0", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["pareto-lora=pareto_lora.app.cli:main"]},
    zip_safe=False,
)
