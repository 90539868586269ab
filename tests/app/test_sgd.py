"""The SGD study (`pareto-lora demo --optimizer sgd`): per-method learning-rate tuning on a
separate seed by a fixed criterion, then the tuned methods on the reported seeds."""

import json
import math
import os
import subprocess
import sys

import pytest

from pareto_lora.app.demo import sgd
from pareto_lora.app.demo.experiment import DemoConfig, RunResult


def _run(rule, lr, text, image, diverged=False, warning=None):
    return RunResult(rule, sgd.TUNE_SEED, [0, 1], [1.0, 1.0], [1.0, 1.0], [], 0.1, eval_text_excess=[1.0, text],
                     eval_image_excess=[1.0, image], eval_acc=[0.1, 0.2], optimizer="sgd", lr=lr,
                     optimizer_warning=warning, diverged_step=3 if diverged else None)


def test_criterion_is_text_plus_image_excess_and_inf_when_diverged():
    assert sgd.criterion(_run("sum", 0.1, 0.5, 0.75)) == pytest.approx(1.25)
    assert sgd.criterion(_run("sum", 0.1, 0.5, 0.75, diverged=True)) == math.inf
    assert sgd.criterion(_run("sum", 0.1, math.nan, 0.75)) == math.inf  # a non-finite evaluation is divergence too


def test_tune_keeps_the_best_rate_per_method_on_the_tuning_seed(monkeypatch):
    # sum is best at 0.2 (inside), rescale_only at 0.1 (grid edge), mgda diverges everywhere
    table = {("sum", 0.1): (1.0, 1.0), ("sum", 0.2): (0.5, 0.9), ("sum", 0.4): (2.0, 1.0),
             ("rescale_only", 0.1): (0.4, 0.9), ("rescale_only", 0.2): (0.6, 0.9), ("rescale_only", 0.4): (None, None)}
    calls = []

    def fake_cell(setup, cfg, rule, seed, runs_dir, progress, eval_seed=None):
        calls.append((rule, cfg.lr, seed, eval_seed))
        t, i = table.get((rule, cfg.lr), (None, None))
        warn = "lengthens" if rule == "rescale_only" else None
        return _run(rule, cfg.lr, math.nan if t is None else t, math.nan if i is None else i, diverged=t is None, warning=warn)

    monkeypatch.setattr(sgd, "run_cell", fake_cell)
    out = sgd.tune(None, DemoConfig(optimizer="sgd"), ("sum", "rescale_only", "mgda"), (0.1, 0.2, 0.4), progress=False)
    assert {(s, e) for _, _, s, e in calls} == {(sgd.TUNE_SEED, sgd.VALIDATION_SEED)}  # never a reported seed
    assert out["sum"]["lr"] == 0.2 and not out["sum"]["edge"]
    assert out["rescale_only"]["lr"] == 0.1 and out["rescale_only"]["edge"]
    assert out["mgda"]["lr"] is None and all(g["diverged"] for g in out["mgda"]["grid"])
    table_text = sgd.format_tuning(out)
    assert "1.400*" in table_text and "diverged" in table_text and "0.1 (grid edge)" in table_text
    notes = sgd._notes(out, (0.1, 0.2, 0.4))
    assert any("rescale_only" in n and "edge" in n for n in notes)
    assert any(n.startswith("Diverged at every learning rate") and "mgda" in n for n in notes)
    assert any("check_optimizer warned" in n and "rescale_only" in n and "sum" not in n.split("for:")[1] for n in notes)


def test_bad_grid_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lrs"):
        sgd.run_sgd_study(DemoConfig(), str(tmp_path), lrs=(0.1, -1.0), progress=False, echo=lambda *_: None)


@pytest.fixture(scope="module")
def quick_sgd(tmp_path_factory):
    out = tmp_path_factory.mktemp("sgd")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "pareto_lora", "demo", "--quick", "--optimizer", "sgd", "--rules",
                          "sum,w2,rescale_only,pareto_lora_norm", "--lrs", "0.2,0.4", "--seeds", "2", "--out", str(out),
                          "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    return res, out


def test_quick_sgd_study_end_to_end(quick_sgd):
    res, out = quick_sgd
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["optimizer"] == "sgd"
    tuning = doc["sgd"]["tuning"]
    assert set(tuning) == {"sum", "w2", "rescale_only", "pareto_lora_norm"} and doc["sgd"]["lrs"] == [0.2, 0.4]
    assert len(list((out / "tune").glob("*.json"))) == 4 * 2 and len(list((out / "runs").glob("*.json"))) == 4 * 2
    for run in doc["runs"]:  # every reported run used its method's tuned rate, on a reported seed
        assert run["optimizer"] == "sgd" and run["lr"] == tuning[run["rule"]]["lr"] and run["seed"] in (0, 1)
    warned = {r["rule"] for r in doc["runs"] if r["optimizer_warning"]}
    assert "rescale_only" in warned and "pareto_lora_norm" not in warned and "sum" not in warned
    assert "Tuning (validation text + image excess" in res.stdout and "SGD study: learning rate tuned" in res.stdout
    assert doc["comparison"]["rescale_only"]["vs_sum_image_excess"]["n"] == 2
    assert "frontier" in doc["comparison"]["pareto_lora_norm"]  # sum and w2 make the curve


def test_contrast_lines_pair_the_norm_preserving_mode_with_the_plain_rule():
    from pareto_lora.app.demo import report

    runs = []
    for seed in range(3):
        runs.append(_run("pareto_lora", 0.2, 0.5, 1.0)), runs.append(_run("pareto_lora_norm", 0.2, 0.6 + 0.01 * seed, 0.9))
        runs[-2].seed = runs[-1].seed = seed
    lines = sgd.contrast_lines(report.summarize(runs))
    assert len(lines) == 1 and lines[0].startswith("pareto_lora_norm vs pareto_lora (paired over 3 seeds)")
    assert "image excess -0.100" in lines[0] and "(better)" in lines[0] and "(worse)" in lines[0]
    assert sgd.contrast_lines(report.summarize(runs[:1])) == []  # the reference was not run
