"""The benchmarks' plain-torch baselines compute what the op computes (results only, never times).

Every baseline of pareto_lora.app.baselines is compared with the float64 reference on the
benchmark's own inputs; the benchmark table code and the bench/ scripts are exercised on tiny
cases so that a GPU-only script at least imports and its host-side pieces work.
"""

import importlib
import json
import os
import sys

import pytest
import torch

import pareto_lora
from pareto_lora.app import baselines, benchmarking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(baselines.BASELINES))
def test_baseline_matches_reference(name, dtype, g, device):
    case = benchmarking.BenchCase(20_000, g, dtype, device)
    a, b, offsets = benchmarking.make_inputs(case, seed=g)
    expected = pareto_lora.integrate(a, b, offsets, rule="pareto_lora", tau=0.5, backend="reference").out
    out = torch.full_like(a, float("nan"))
    fn = baselines.BASELINES[name][0]
    assert fn(a, b, offsets, out, "pareto_lora", 0.5) is out
    # float32 statistics (the baselines) vs float64 ones (the oracle) move the coefficients by a
    # few float32 ulps; a bf16 output computed in float32 may round to the neighbouring bf16.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = float(expected.float().abs().max())
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * scale)


def test_naive_loop_refuses_other_rules():
    a, b, offsets = benchmarking.make_inputs(benchmarking.BenchCase(64, 2, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="pareto_lora"):
        baselines.naive_loop(a, b, offsets, torch.empty_like(a), "mgda", 0.5)


def test_segment_views_are_views():
    t = torch.arange(10.0)
    views = baselines.segment_views(t, torch.tensor([0, 3, 10]))
    assert [v.numel() for v in views] == [3, 7]
    assert all(v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for v in views)


def test_bench_case_rows_have_every_column():
    case = benchmarking.BenchCase(4096, 4, torch.float32, "cpu")
    rows = benchmarking.bench_case(case, ["cpp"], ["strong", "naive_loop"], rounds=2)
    assert [r["impl"] for r in rows] == ["cpp", "torch:strong", "torch:naive_loop"]
    for r in rows:
        assert r["min_ms"] > 0 and r["median_ms"] >= r["min_ms"] and r["x_floor2"] > 0 and r["x_floor1"] > r["x_floor2"]
        assert set(r["speedup"]) == {"strong", "naive_loop"} and r["threads"] == torch.get_num_threads()
    text = benchmarking.format_rows(rows)
    assert "/2-pass" in text and "copy GB/s" in text and "x strong" in text
    assert benchmarking.format_rows(rows, markdown=True).startswith("| impl |")


def test_the_oracle_is_no_contender():
    # The float64 reference is a correctness tool: never timed, never in a speed table.
    case = benchmarking.BenchCase(4096, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="correctness oracle"):
        benchmarking.bench_case(case, ["cpp", "reference"], ["strong"], rounds=1)
    assert "reference" not in benchmarking.default_backends("cpu")
    assert "load average" in benchmarking.environment("cpu")


@pytest.mark.parametrize("module", ["bench_gpu", "bench_ops_cpu", "bench_training_step"])
def test_bench_scripts_import(module, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module(module)
    if module == "bench_gpu":
        off = mod.lora_like_offsets(1000, 7)
        assert off[0] == 0 and off[-1] == 1000 and off.numel() == 8
        assert set(mod.IMPL_FNS) >= {"cuda_fused", "torch_strong", "torch_foreach", "compiled_ref", "naive_loop"}


@pytest.mark.parametrize("arch", ["llama", "chameleon"])
def test_training_step_configs_run(arch, monkeypatch):
    # bench_training_step on a tiny version of its configurations: every row runs (no times asserted);
    # Chameleon's image targets are the image codes and markers of its own vocabulary map.
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module("bench_training_step")
    monkeypatch.setitem(mod.CONFIGS, "tiny", (arch, 4, 64, 2, 64, 4))
    fns, nparams = mod.build("tiny")
    assert list(fns) == list(mod.ROWS) and nparams > 0
    for fn in fns.values():
        fn()
    row = mod.table_row("tiny", nparams, {k: float(i + 1) for i, k in enumerate(mod.ROWS)})
    assert row.startswith(f"| tiny: {arch} (4, 64, 2, 64, 4) |") and row.count("|") == 12
    if arch == "chameleon":
        model = mod.lora_chameleon(2, 64, 4)
        batch = mod.chameleon_batch(2, 64)
        spec = pareto_lora.archs.detect_arch(model)
        mask = pareto_lora.archs.image_token_mask(model, batch, spec)
        assert mask.sum(1).tolist() == [32, 32]
        assert set(spec.image_token_ids) == set(range(mod.CHAMELEON_TEXT, mod.CHAMELEON_EOI + 1))


TINY_GPU_STEP = ["--device", "cpu", "--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--text-vocab",
                 "64", "--codes", "16", "--batch", "auto", "--max-batch", "2", "--rounds", "1", "--dtype", "float32"]


def test_gpu_step_bench_runs_on_cpu(monkeypatch, tmp_path, capsys):
    # bench_gpu_step (issue 28's GPU training step) on a tiny Chameleon on the CPU: every contender
    # runs in both checkpointing modes, the batch search stops at --max-batch, the table and the raw
    # file are written (no times asserted).
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module("bench_gpu_step")
    assert mod.main(TINY_GPU_STEP + ["--out", str(tmp_path)]) == 0
    table = (tmp_path / "gpu_step.md").read_text()
    assert table.count("\n| off |") == 1 and table.count("\n| on |") == 1 and "batch 2 x 16" in table
    raw = json.loads((tmp_path / "gpu_step.json").read_text())
    assert set(raw["times"]) == {c + s for c in mod.CONTENDERS for s in ("", "_ckpt")}
    assert raw["batch"] == 2 and raw["lora_params"] > 0 and raw["kernels"] is None
    # the image targets are the image codes and both markers of the vocabulary map
    args = mod.argparse.Namespace(text_vocab=64, codes=16, seq=16)
    batch = mod.make_batch(args, 2, torch.device("cpu"))
    model = mod.build_model(mod.argparse.Namespace(codes=16, text_vocab=64, hidden=32, intermediate=64, layers=2,
                                                   heads=2, seq=16, rank=2), torch.device("cpu"), torch.float32)
    mask = pareto_lora.archs.image_token_mask(model, batch, pareto_lora.archs.detect_arch(model))
    assert mask.sum(1).tolist() == [16 // 2 + 2] * 2


@pytest.mark.parametrize("bad, name", [(["--batch", "0"], "--batch"), (["--seq", "4"], "--seq"),
                                       (["--layers", "0"], "--layers"), (["--device", "cuda"], "--device")])
def test_gpu_step_bench_refuses_bad_arguments(bad, name, monkeypatch, capsys):
    if name == "--device" and torch.cuda.is_available():
        pytest.skip("cuda is available here: the refusal is for machines without it")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module("bench_gpu_step")
    with pytest.raises(SystemExit) as e:
        mod.main(TINY_GPU_STEP + bad)
    assert e.value.code == 2 and name in capsys.readouterr().err


def test_training_step_traversal_rows_run(monkeypatch):
    # bench_training_step's traversal table (and the helpers bench_gpu_step shares with it): every
    # row runs in both checkpointing modes on a tiny Chameleon (no times asserted).
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    mod = importlib.import_module("bench_training_step")
    monkeypatch.setitem(mod.CONFIGS, "tiny", ("chameleon", 4, 64, 2, 64, 4))
    fns, bitwise = mod.build_traversals("tiny")
    rows = {"forward", "vanilla", "two_pass", "batched", *(f"sum_first_{m}" for m in mod.MODULATES)}
    assert set(fns) == rows | {r + "_ckpt" for r in rows} and isinstance(bitwise, bool)
    for fn in fns.values():
        fn()
