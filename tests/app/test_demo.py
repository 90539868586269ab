"""The demo: its synthetic task, its verdict logic, and the `pareto-lora demo --quick` smoke run."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import pareto_lora
from pareto_lora.app.demo import data, report, verdict
from pareto_lora.app.demo.experiment import DemoConfig, RunResult


# ---- the task --------------------------------------------------------------------------------
def test_batches_are_seedable_and_worlds_differ():
    w = data.make_world(2)
    a = data.sample_batch(w, 8, torch.Generator().manual_seed(3))
    b = data.sample_batch(w, 8, torch.Generator().manual_seed(3))
    c = data.sample_batch(w, 8, torch.Generator().manual_seed(4))
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    w1 = data.make_world(1)
    assert w1.caption_templates != w.caption_templates
    assert not torch.equal(w1.palette, w.palette)


def test_sequence_layout_and_image_mask():
    v = data.Vocab()
    w = data.make_world(2, v)
    batch = data.sample_batch(w, 16, torch.Generator().manual_seed(0))
    ids = batch.input_ids
    assert ids.min() >= 0 and ids.max() < v.size
    assert (ids[:, 0] == v.BOS).all() and (ids[:, -1] == v.EOS).all()
    assert ((ids == v.BOI).sum(1) == 2).all() and ((ids == v.EOI).sum(1) == 2).all()
    assert torch.equal(batch.image_token_mask, ids >= v.image_base)
    assert (batch.image_token_mask.sum(1) == 2 * v.image_tokens).all()
    # image spans sit exactly between <boi> and <eoi>
    for row in ids:
        boi = (row == v.BOI).nonzero().flatten()
        for start in boi.tolist():
            span = row[start + 1 : start + 1 + v.image_tokens]
            assert (span >= v.image_base).all() and row[start + 1 + v.image_tokens] == v.EOI
    n_text, n_image = pareto_lora.modality_token_counts(batch.labels, image_token_mask=batch.image_token_mask)
    assert int(n_image) == 16 * 2 * v.image_tokens and int(n_text) > 0


def test_images_are_a_function_of_the_text_when_noise_is_off():
    """Without noise cells, each image's foreground/background layout and palette follow the words."""
    v = data.Vocab()
    w = data.make_world(5, v, noise=0.0)
    batch = data.sample_batch(w, 64, torch.Generator().manual_seed(1))
    fg_codes = {c: set((v.image_base + w.palette[c]).tolist()) for c in range(v.num_colors)}
    for row in batch.input_ids:
        words = row.tolist()
        color = next(t - v.color_base for t in words if v.color_base <= t < v.shape_base)
        shape = next(t - v.shape_base for t in words if v.shape_base <= t < v.verb_base)
        verb = next(t - v.verb_base for t in words if v.verb_base <= t < v.filler_base)
        boi = [i for i, t in enumerate(words) if t == v.BOI]
        new_color = (color + w.verb_shift[verb]) % v.num_colors
        # the colour word in the change sentence is the shifted colour
        t2_colors = [t - v.color_base for t in words[boi[0] + v.image_tokens + 2 : boi[1]] if v.color_base <= t < v.shape_base]
        assert t2_colors == [new_color]
        for start, col in zip(boi, (color, new_color)):
            img = words[start + 1 : start + 1 + v.image_tokens]
            for cell, tok in enumerate(img):
                if bool(w.shape_masks[shape, cell]):
                    assert tok in fg_codes[col]
                else:
                    assert tok >= v.image_base + v.num_colors * v.shades_per_color


def test_bad_world_noise_is_rejected():
    with pytest.raises(ValueError, match="noise"):
        data.make_world(0, noise=1.5)


@pytest.mark.parametrize(
    "field, value, match",
    [("rules", ("sum", "bogus"), "rules: unknown rule"), ("seeds", (), "seeds"), ("seeds", (1, 1), "seeds: expected distinct"),
     ("steps", 0, "steps"), ("lr", 0.0, "lr"), ("num_groups", 11, "num_groups"),
     ("pretrain", "False", "pretrain: expected True or False"), ("pretrain", 1, "pretrain: expected True or False"),
     ("plain_backward", "three", "plain_backward: expected one of two, one")],
)
def test_config_check_names_the_field(field, value, match):
    import dataclasses

    with pytest.raises(ValueError, match=match):
        dataclasses.replace(DemoConfig(), **{field: value}).check()


# ---- numbers -> verdict --------------------------------------------------------------------------
def _fake_run(rule, seed, text_excess, image_excess, ratio=5.0):
    rec = {"step": 1, "active": [True, False], "loss_text": 1.0, "loss_image": 3.0,
           "groups": {"group0": {"ratio": ratio, "case": 1}, "group1": {"ratio": ratio, "case": 0}}, "layers": {}}
    return RunResult(rule, seed, [0, 1], [2.0, 1.0], [4.0, 3.0], [rec], 0.1,
                     eval_text_excess=[2.0, text_excess], eval_image_excess=[3.0, image_excess], eval_acc=[0.2, 0.5])


# per seed: the curve w=1 (text 0.10, image 1.00) -> w=4 (text 0.30, image 0.60); brackets far apart
CURVE = {"sum": (0.10, 1.00), "w4": (0.30, 0.60), "text_only": (0.05, 2.0), "image_only": (3.0, 0.3)}
_RESULT = {"floors": {"text": 0.57, "image": 3.03},
           "base": {"steps": 300, "own_world": {"image_excess": 0.05, "cell_acc": 0.97},
                    "finetune_world_before": {"text_excess": 5.0, "image_excess": 2.0, "cell_acc": 0.3}}}


def _study(rule_points):
    """3 seeds of the curve and brackets (tiny seed jitter) plus `rule_points` [(text, image)] per seed."""
    runs = []
    for seed in range(3):
        jitter = 0.001 * seed
        runs += [_fake_run(r, seed, t + jitter, i + jitter) for r, (t, i) in CURVE.items()]
        runs.append(_fake_run("pareto_lora", seed, *rule_points[seed]))
    summary = report.summarize(runs)
    comparison = report.compare(summary)
    return summary, comparison, verdict.verdict(_RESULT, summary, comparison)


def test_rule_clearly_below_the_curve_is_better():
    # at text 0.2 the curve is at image 0.8; the rule sits ~0.1 below in every seed
    s, c, lines = _study([(0.2, 0.70), (0.2, 0.71), (0.2, 0.69)])
    f = c["pareto_lora"]["frontier"]
    assert f["place"] == "below" and f["mean"] == pytest.approx(-0.1, abs=0.01) and f["high"] < 0
    assert any(line.startswith("pareto_lora:") and "BELOW the curve" in line for line in lines)
    assert any("clearly apart" in line for line in lines)
    assert any("floors" in line and "0.570" in line for line in lines)


def test_noisy_rule_is_no_detectable_difference_even_with_a_better_mean():
    s, c, lines = _study([(0.2, 0.60), (0.2, 0.95), (0.2, 0.70)])  # mean distance -0.05, straddles 0
    f = c["pareto_lora"]["frontier"]
    assert f["mean"] < 0 and f["place"] == "on"
    assert any("no detectable difference from loss reweighting" in line for line in lines)


def test_rule_above_the_curve_is_worse_and_vs_sum_is_paired():
    s, c, lines = _study([(0.2, 0.95), (0.2, 0.96), (0.2, 0.97)])
    assert c["pareto_lora"]["frontier"]["place"] == "above"
    vs = c["pareto_lora"]["vs_sum_text_excess"]
    assert vs["mean"] == pytest.approx(0.2 - 0.101) and vs["word"] == "worse"  # sum: 0.10 + seed jitter


def test_rule_beyond_the_curve_in_every_seed_gets_no_verdict():
    s, c, lines = _study([(0.9, 0.30), (0.9, 0.31), (0.9, 0.29)])  # text excess far right of w4's 0.30
    assert c["pareto_lora"]["frontier"]["place"] == "outside"
    assert any(line.startswith("pareto_lora:") and "OUTSIDE" in line and "the curve's weights here: w = 1, 4;" in line
               for line in lines)
    # an OUTSIDE distance is no interval: the last line counts the two against vanilla only
    assert lines[-1].startswith("Multiplicity: the comparisons above hold 2 paired 95% intervals")


def test_brackets_not_apart_make_the_study_inconclusive():
    global CURVE
    saved = CURVE
    CURVE = {**saved, "image_only": (0.05, 2.0)}  # image-only ends where text-only does
    try:
        _, _, lines = _study([(0.2, 0.7)] * 3)
    finally:
        CURVE = saved
    assert any("NOT clearly apart" in line for line in lines)


def test_verdict_describes_each_base_of_a_per_seed_study():
    summary, comparison, _ = _study([(0.2, 0.70), (0.2, 0.71), (0.2, 0.69)])
    b = _RESULT["base"]
    lines = verdict.verdict({**_RESULT, "base": {"per_seed": {0: b, 1: {**b, "steps": 350}}, "cached": True}}, summary, comparison)
    assert [line.split(" (")[0] for line in lines if line.startswith("Base model")] == ["Base model of seed 0", "Base model of seed 1"]
    assert any("seed 1 (350 pre-training steps)" in line for line in lines)


def test_balance_line_names_the_runs_it_comes_from_when_vanilla_took_one_backward():
    runs = [_fake_run(r, s, 0.1 * s, 1.0, ratio=math.nan if r == "sum" else 2.5) for s in range(3) for r in ("sum", "pareto_lora")]
    summary = report.summarize(runs)
    lines = verdict.verdict(_RESULT, summary, report.compare(summary))
    balance = [ln for ln in lines if ln.startswith("Gradient balance")]
    assert balance == ["Gradient balance on pareto_lora's runs (raw per-modality gradients before integration; vanilla's "
                       "runs take one backward and measure none): median ||g_text||/||g_image|| over groups = 2.5 in the "
                       "first 10 steps, 2.5 over the run."]
    runs = [_fake_run(r, s, 0.1 * s, 1.0, ratio=4.0) for s in range(3) for r in ("sum", "pareto_lora")]
    summary = report.summarize(runs)
    assert "Gradient balance under vanilla LoRA: median ||g_text||/||g_image|| over groups = 4 in the first 10 steps, " \
           "4 over the run." in verdict.verdict(_RESULT, summary, report.compare(summary))


def test_summary_and_table():
    s, c, _ = _study([(0.2, 0.70), (0.2, 0.71), (0.2, 0.69)])
    assert s["sum"]["mean"]["text_excess"] == pytest.approx(0.101)
    assert s["pareto_lora"]["case_fractions"]["group0"] == {"RESCALED": 1.0}
    table = report.format_table(s, c)
    assert "pareto_lora" in table and "below" in table and "(curve point)" in table


def test_json_has_no_nan_or_inf():
    doc = report._finite({"a": [1.0, math.inf, {"b": math.nan}], "c": "x"})
    assert doc == {"a": [1.0, None, {"b": None}], "c": "x"}


# ---- end to end ---------------------------------------------------------------------------------
def _finite_numbers(x):
    if isinstance(x, float):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _finite_numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _finite_numbers(v)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pareto_lora", "demo", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)
    return res, out, time.perf_counter() - t0


def test_quick_demo_writes_json_and_plots(quick_demo):
    res, out, seconds = quick_demo
    assert res.returncode == 0, res.stderr[-3000:]
    print(f"demo --quick took {seconds:.1f}s")
    for name in ("results.json", "losses.png", "ratio_heatmaps.png", "group_ratio_heatmaps.png", "cases.png", "summary.png", "balancers.png",
                 "tradeoff.png", "paired.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
    for name in ("losses.png", "ratio_heatmaps.png", "cases.png", "summary.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in res.stdout


def test_quick_demo_numbers(quick_demo):
    res, out, _ = quick_demo
    doc = json.loads((out / "results.json").read_text())
    rules = set(doc["config"]["rules"])
    assert {"text_only", "image_only", "sum", "w3", "pareto_lora", "mimo", "gradnorm", "commit", "mmpareto"} <= rules
    assert set(doc["summary"]) == rules
    seeds = doc["config"]["seeds"]
    assert len(doc["runs"]) == len(rules) * len(seeds)
    assert len(list((out / "runs").glob("*.json"))) == len(doc["runs"])  # one resumable file per run
    assert 0.5 < doc["floors"]["text"] < 0.65 and 2.9 < doc["floors"]["image"] < 3.15
    for run in doc["runs"]:
        assert len(run["records"]) == doc["config"]["steps"]
        finals = (run["eval_text"][-1], run["eval_image"][-1])
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in finals)
        assert run["eval_image_excess"][-1] == pytest.approx(run["eval_image"][-1] - doc["floors"]["image"])
        assert 0.0 <= run["eval_acc"][-1] <= 1.0
        assert {int(g["case"]) for r in run["records"] for g in r["groups"].values()} <= {int(c) for c in pareto_lora.Case}
    for rule, s in doc["summary"].items():
        for key in ("text_excess", "image_excess", "cell_acc"):
            assert math.isfinite(s["mean"][key])
        assert f"{rule:<16}" in res.stdout
    # every non-curve method is placed against the curve (sum and w3) with an interval over 2 seeds
    for rule in rules - {"sum", "w3", "text_only", "image_only"}:
        f = doc["comparison"][rule]["frontier"]
        assert f["n"] == 2 and f["place"] in ("below", "on", "above", "outside")
    sum_cases = {c for g in doc["summary"]["sum"]["case_fractions"].values() for c in g}
    assert sum_cases <= {"SUMMED", "INACTIVE", "DEGENERATE"}
    assert doc["verdict"] and any(v.startswith("pareto_lora:") for v in doc["verdict"])
    assert any(v.startswith("Brackets:") for v in doc["verdict"])
    for v in doc["verdict"]:
        assert v in res.stdout
    first = {r["rule"]: r for r in doc["runs"]}
    # issue 25: the power check is the first result line (the quick demo runs w3, not w2: not checked)
    out_lines = res.stdout.splitlines()
    at = out_lines.index(doc["power"]["line"])
    assert doc["power"]["line"].startswith("Power: not checked") and doc["power"]["detects"] is None
    assert out_lines[at - 1] == "" and out_lines[at + 1].startswith("Final held-out")
    assert not any(v in line for v in doc["verdict"] for line in out_lines[:at])
    assert "mimo/sigma_text" in first["mimo"]["records"][0]["balancer"]
    assert "gradnorm/w_image" in first["gradnorm"]["records"][0]["balancer"]
    assert first["commit"]["records"][0]["balancer"]["commit/kappa"] > 0


def _refuse(name):
    raise ValueError(f"not JSON: {name}")


def test_every_json_file_the_demo_writes_is_strict_json(quick_demo):
    """Issue 27: per-run files held Infinity/NaN (text_only's gradient ratio), which jq and
    JavaScript reject. Every file parses strictly; null stands for a non-finite number."""
    from pareto_lora.app.demo.experiment import RunResult
    from pareto_lora.app.demo.output import load_json

    res, out, _ = quick_demo
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(out.rglob("*.json"))
    assert len(files) > 1
    nulls = 0
    for path in files:
        text = path.read_text()
        json.loads(text, parse_constant=_refuse)
        nulls += text.count("null")
    assert nulls > 0  # text_only's ratio is not finite: written as null
    text_only = next(p for p in (out / "runs").glob("*-text_only-seed*.json"))
    run = RunResult(**load_json(str(text_only)))  # read back as NaN, as the runs in memory were
    ratios = [g["ratio"] for rec in run.records for g in rec["groups"].values()]
    assert any(math.isnan(r) for r in ratios) and not run.diverged
