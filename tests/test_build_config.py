"""setup.py's choice of building the CUDA/HIP kernels (issue 11.11): a CUDA torch without a
toolkit (the default `pip install torch` on Linux) must still install, with one clear line."""

import importlib.util
import os

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("pareto_lora_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the functions, builds nothing
    return module


def test_cpu_torch_builds_the_cpu_extension(setup_module):
    assert setup_module.cuda_decision("auto", None, None) == (False, None)
    assert setup_module.cuda_decision("0", "cuda", "/usr/local/cuda") == (False, None)
    with pytest.raises(RuntimeError, match="neither CUDA nor ROCm"):
        setup_module.cuda_decision("1", None, None)


def test_cuda_torch_with_a_toolkit_builds_cuda(setup_module):
    assert setup_module.cuda_decision("auto", "cuda", "/usr/local/cuda") == (True, None)
    assert setup_module.cuda_decision("1", "hip", "/opt/rocm") == (True, None)


def test_cuda_torch_without_a_toolkit_skips_cuda_with_one_line(setup_module):
    build, note = setup_module.cuda_decision("auto", "cuda", None)
    assert build is False
    assert "CUDA kernels skipped" in note and "CUDA_HOME" in note and "\n" not in note
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        setup_module.cuda_decision("1", "cuda", None)
    with pytest.raises(RuntimeError, match="PARETO_LORA_CUDA: expected 0, 1 or auto"):
        setup_module.cuda_decision("maybe", "cuda", None)


def test_fake_no_nvcc_environment_gives_a_cpu_extension(setup_module, monkeypatch, capsys):
    # A CUDA build of torch on a machine without nvcc, as `pip install torch` gives on Linux.
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.delenv("PARETO_LORA_CUDA", raising=False)
    ext = setup_module.extension()
    assert not any(src.endswith(".cu") for src in ext.sources)
    assert "CUDA kernels skipped" in capsys.readouterr().err


def test_openmp_flags_follow_torchs_backend(setup_module):
    assert setup_module.openmp_flags("ATen parallel backend: OpenMP\n", "linux") == ["-fopenmp"]
    assert setup_module.openmp_flags("ATen parallel backend: native thread pool\n", "linux") == []
    assert setup_module.openmp_flags("ATen parallel backend: OpenMP\n", "darwin") == []


def test_the_cpu_op_runs_on_the_threads_torch_is_given():
    """ATen's parallel_for is header-only: an extension built without OpenMP runs it on one thread
    (the CPU op did, until setup.py passed -fopenmp). With 2 intra-op threads, 2 must be used."""
    from pareto_lora import _C

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.intra_op_threads() == 1
        torch.set_num_threads(2)
        assert _C.intra_op_threads() == 2
    finally:
        torch.set_num_threads(before)
