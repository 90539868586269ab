"""The CUDA kernel's work schedule (csrc/cuda/schedule.h), host logic only: runs on any machine.

schedule_selftest.cpp is compiled with the host C++ compiler and run: every element covered once
per phase, apply after reduce, the ticket -> run lookups.
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_schedule_selftest(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH to build csrc/cuda/schedule_selftest.cpp")
    exe = tmp_path / "schedule_selftest"
    src = os.path.join(ROOT, "csrc", "cuda", "schedule_selftest.cpp")
    subprocess.run([cxx, "-std=c++17", "-O1", src, "-o", str(exe)], check=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "passed" in res.stdout
