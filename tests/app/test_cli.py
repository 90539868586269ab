"""The `pareto-lora` command line: help, info, bench, and clear errors for bad flags.

The demo's end-to-end run lives in test_demo.py. Commands run in a subprocess through
`python -m pareto_lora` (what the console script calls) so that exit codes and stderr are real.
"""

import json
import os
import subprocess
import sys

import pytest

import pareto_lora
from pareto_lora.app import cli, env


def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "pareto_lora", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["study", "--help"], ["bench", "--help"], ["info", "--help"]])
def test_help_exits_zero_and_names_the_subcommands(args):
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "usage: pareto-lora" in res.stdout
    if args == ["--help"]:
        for sub in ("demo", "study", "bench", "info"):
            assert sub in res.stdout


def test_info_lists_backends_and_versions():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for needle in ("cpp (CPU)", "triton", "reference", "torch", "transformers", "peft"):
        assert needle in res.stdout
    assert f"available_backends('cpu'): {', '.join(pareto_lora.available_backends('cpu'))}" in res.stdout


def test_backend_availability_agrees_with_available_backends():
    rows = {name: (built, usable) for name, built, usable, _ in env.backend_availability()}
    assert rows["cpp (CPU)"] == (True, True)
    assert rows["triton"][1] == ("triton" in pareto_lora.available_backends("cpu")
                                 or ("triton" in pareto_lora.available_backends("cuda")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--rules", "sum,nope"], "unknown rule(s) 'nope'; expected names from: " + ", ".join(pareto_lora.training.balancers.METHODS)),
        (["demo", "--steps", "0"], "--steps: expected an integer >= 1"),
        (["demo", "--steps", "ten"], "--steps: expected an integer"),
        (["demo", "--seeds", "1,1"], "--seeds: expected distinct non-negative seeds"),
        (["demo", "--seeds", "0"], "--seeds: expected a seed count >= 1"),
        (["demo", "--tau", "-1"], "--tau: expected a finite number > 0"),
        (["demo", "--device", "tpu"], "--device"),
        (["demo", "--modulate", "sideways"], "--modulate: invalid choice"),
        (["demo", "--num-groups", "99", "--quick"], "num_groups: expected 1..4"),
        (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["demo", "--optimizer", "sgd", "--lr", "0.1"], "--lr: the SGD study tunes the learning rate per method"),
        (["demo", "--lrs", "0.1,0.2"], "--lrs: a learning-rate grid is only for --optimizer sgd"),
        (["demo", "--optimizer", "sgd", "--lrs", "0.1,-2"], "--lrs: expected finite numbers > 0"),
        (["demo", "--optimizer", "sgd", "--lrs", "0.1,0.1"], "--lrs: value listed twice"),
        (["demo", "--optimizer", "adam"], "--optimizer: invalid choice"),
        (["demo", "--arch", "gpt2"], "--arch: invalid choice"),
        (["demo", "--plain-backward", "three"], "--plain-backward: invalid choice"),
        (["demo", "--world", "digits", "--pretrain"], "--world digits: --pretrain belong to the shapes world"),
        (["demo", "--world", "digits", "--plain-backward", "one"], "--world digits: --plain-backward belong to the shapes"),
        (["bench", "--dtypes", "float8"], "unknown dtype(s) 'float8'"),
        (["bench", "--rule", "nope"], "--rule: invalid choice"),
        (["bench", "--backends", "nope"], "--backends: nope not available"),
        (["explode"], "invalid choice: 'explode'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_flags_exit_nonzero_with_a_clear_message(args, message):
    res = run_cli(*args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_cuda_device_without_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")  # the error path needs no GPU
    res = run_cli("demo", "--device", "cuda", "--quick")
    assert res.returncode == 2
    assert "torch.cuda.is_available() is False" in res.stderr


def test_base_per_seed_flag_reaches_the_config(monkeypatch, tmp_path):
    import pareto_lora.app.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, out, progress=True: seen.append(cfg))
    assert cli.main(["demo", "--quick", "--base-per-seed", "--out", str(tmp_path)]) == 0
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert [c.base_per_seed for c in seen] == [True, False]
    assert [(c.pretrain, c.plain_backward) for c in seen] == [(False, "two")] * 2  # --quick: two passes
    assert cli.main(["demo", "--pretrain", "--plain-backward", "two", "--out", str(tmp_path)]) == 0
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert [(c.pretrain, c.plain_backward) for c in seen[2:]] == [(True, "two"), (False, "one")]
    assert "--base-per-seed" in run_cli("demo", "--help").stdout


def test_learning_rate_grid_argument():
    assert cli._float_list("0.05,0.1, 0.2") == (0.05, 0.1, 0.2)


def test_seed_argument_forms():
    assert cli._seeds("3") == (0, 1, 2)
    assert cli._seeds("4,7") == (4, 7)
    assert cli._seeds("5,") == (5,)


def test_bench_prints_the_results_columns_and_no_oracle_row():
    # The columns of bench/RESULTS.md, one row per compiled backend and baseline, no float64-oracle
    # row; the figures are checked for consistency with each other, never for speed.
    from pareto_lora.app.benchmarking import COLUMNS

    res = run_cli("bench", "--device", "cpu", "--sizes", "4096", "--dtypes", "float32", "--segments", "8",
                  "--repeat", "3", "--baselines", "strong,naive_loop", "--threads", "1", "--no-progress")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("date ") and "load average" in line and "torch " in line for line in lines)
    header = next(line for line in lines if line.startswith("impl "))
    names = list(COLUMNS) + ["x strong", "x naive_loop"]
    positions = [header.index(n) for n in names]
    assert positions == sorted(positions), header
    rows = [line.split() for line in lines[lines.index(header) + 2:] if line.split() and line.split()[1:2] == ["cpu"]]
    backends = [b for b in pareto_lora.available_backends("cpu") if b != "reference"]
    assert [r[0] for r in rows] == backends + ["torch:strong", "torch:naive_loop"]
    assert "reference" not in res.stdout.split(header)[1]
    for r in rows:
        assert len(r) == len(names)  # one figure per column
        dtype, numel, segs, threads = r[2], r[3], r[4], r[5]
        assert (dtype, numel, segs, threads) == ("float32", "4,096", "8", "1")
        min_ms, med_ms, gbps, copy_gbps, floor2, floor1, x_strong, x_naive = map(float, r[6:])
        assert 0 < min_ms <= med_ms and gbps > 0 and copy_gbps > 0
        assert gbps == pytest.approx(3 * 4096 * 4 / (min_ms * 1e-3) / 1e9, rel=0.01)
        # printed to 3 significant figures / 2 decimals: tolerances cover the rounding
        assert floor1 == pytest.approx(copy_gbps / gbps, rel=0.012, abs=0.01)  # 3N bytes at the copy bandwidth
        assert floor1 == pytest.approx(floor2 * 5 / 3, abs=0.015)  # 5N vs 3N at the same bandwidth
    strong = next(r for r in rows if r[0] == "torch:strong")
    assert float(strong[-2]) == 1.0


def test_bench_refuses_the_oracle_as_a_contender():
    res = run_cli("bench", "--backends", "cpp,reference", "--no-progress")
    assert res.returncode == 2
    assert "'reference' is the float64 correctness oracle, not a speed contender" in res.stderr
    assert "Traceback" not in res.stderr


def test_console_script_is_declared():
    eps = [e for e in __import__("importlib.metadata").metadata.entry_points(group="console_scripts") if e.name == "pareto-lora"]
    assert eps and eps[0].value == "pareto_lora.app.cli:main"


def test_main_returns_zero_for_info(capsys):
    assert cli.main(["info"]) == 0
    assert "rules: " + ", ".join(pareto_lora.RULES) in capsys.readouterr().out


def test_package_versions_are_strings_or_none():
    versions = env.package_versions()
    assert versions["torch"] and versions["pareto_lora"] == pareto_lora.__version__
    json.dumps(versions)


# ---- issue 27: paths and sizes are checked up front, one line, exit 2, nothing created --------------
def _usage_error(res, message):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert message in last, res.stderr


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_demo_paths_that_are_files_are_usage_errors(tmp_path, flag):
    f = tmp_path / "a_file"
    f.write_text("x")
    res = run_cli("demo", "--quick", *(["--out", str(tmp_path / "o")] if flag == "--cache-dir" else []), flag, str(f))
    _usage_error(res, f"{flag}: expected a folder, {f} is a file")
    res = run_cli("demo", "--quick", *(["--out", str(tmp_path / "o")] if flag == "--cache-dir" else []),
                  flag, str(f / "sub" / "dir"))
    _usage_error(res, f"{flag}: cannot create folder {f / 'sub' / 'dir'}: {f} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created


def test_demo_out_in_a_read_only_folder_is_a_usage_error(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))  # root ignores chmod
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--quick", "--out", str(ro / "run")])
    assert exit_.value.code == 2
    assert f"--out: cannot write to {ro} (permission denied)" in capsys.readouterr().err
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--sizes", "1e15"], "--sizes: 1,000,000,000,000,000 elements need about"),
    (["--sizes", "1e400"], "--sizes: expected comma-separated integers"),
    (["--sizes", "1000.5"], "--sizes: expected comma-separated integers"),
    (["--sizes", "4096,100", "--segments", "101"], "--segments: expected at most the smallest of --sizes (100"),
])
def test_bench_sizes_are_checked_before_anything_is_allocated(args, message):
    res = run_cli("bench", "--device", "cpu", "--no-progress", *args, timeout=60)
    _usage_error(res, message)
    assert res.stdout == ""  # not even the header: the check comes first
