"""What this install is: package versions and which backends are built and usable here.

Used by ``pareto-lora info`` and recorded with every demo and benchmark result.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform

import torch

from ..backends import available_backends, cpp

__all__ = ["package_versions", "backend_availability", "missing_modules", "install_hint", "machine", "cpu_model",
           "usable_cpus"]

_PACKAGES = ("torch", "triton", "peft", "transformers", "numpy", "matplotlib", "tqdm")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the library and the demo use (None when missing)."""
    out: dict[str, str | None] = {"pareto_lora": None}
    for name in ("pareto-lora", *_PACKAGES):
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def _cpuinfo() -> dict[str, str]:
    """The first value of each key in Linux's /proc/cpuinfo ({} where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what :mod:`platform` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine() -> str:
    """This machine in one line: the CPU's model name (family/model where Linux reports them: a
    cloud VM may name only the vendor), the CPUs this process may use and torch's CPU vector build."""
    info, name = _cpuinfo(), cpu_model() or "unknown CPU"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    cpus = usable_cpus()
    return f"{name}, {cpus} usable CPU{'s' if cpus != 1 else ''}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of `names` that do not import here (an optional extra not installed)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def install_hint(extra: str) -> str:
    """The command that installs one of setup.py's extras into a source checkout."""
    return f'pip install --no-build-isolation -e ".[{extra}]"'


def backend_availability() -> list[tuple[str, bool, bool, str]]:
    """(backend, built/installed, usable here, note) for the C++ CPU, CUDA/HIP and Triton kernels."""
    gpu = torch.cuda.is_available()
    gpu_kind = "HIP" if torch.version.hip else "CUDA"
    cuda_built = cpp.is_available("cuda")
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    triton_cpu = "triton" in available_backends("cpu")
    triton_gpu = gpu and "triton" in available_backends("cuda")
    if triton_version is None:
        triton_note = "triton is not installed"
    elif triton_gpu:
        triton_note = f"triton {triton_version} on {torch.cuda.get_device_name()}"
    elif triton_cpu:
        triton_note = "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1; slow, for testing)"
    else:
        triton_note = "needs a GPU (or TRITON_INTERPRET=1 for the interpreter on CPU)"
    gpu_note = (torch.cuda.get_device_name() if gpu else "no GPU visible to torch") if cuda_built else (
        f"extension built without {gpu_kind} (torch {torch.__version__})")
    return [
        ("cpp (CPU)", True, True, "compiled extension pareto_lora._C"),
        (f"cpp ({gpu_kind})", cuda_built, cuda_built and gpu, gpu_note),
        ("triton", triton_version is not None, triton_cpu or triton_gpu, triton_note),
        ("reference", True, True, "pure torch, float64 accumulation (the test oracle)"),
    ]
