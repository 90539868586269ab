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
from pareto_lora.app.demo import data, report
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
     ("steps", 0, "steps"), ("lr", 0.0, "lr"), ("num_groups", 11, "num_groups")],
)
def test_config_check_names_the_field(field, value, match):
    import dataclasses

    with pytest.raises(ValueError, match=match):
        dataclasses.replace(DemoConfig(), **{field: value}).check()


# ---- numbers -> verdict --------------------------------------------------------------------------
def _fake_run(rule, seed, text, image, ratio=5.0):
    rec = {"step": 1, "active": [True, False], "loss_text": text, "loss_image": image,
           "groups": {"group0": {"ratio": ratio, "case": 1}, "group1": {"ratio": ratio, "case": 0}}, "layers": {}}
    return RunResult(rule, seed, [0, 1], [text + 1, text], [image + 1, image], [rec], 0.1)


def _summary(image_method, image_base=(2.0, 2.1, 2.2), ratio=5.0):
    runs = [_fake_run("sum", s, 1.0, x, ratio) for s, x in enumerate(image_base)]
    runs += [_fake_run("pareto_lora", s, 1.05, x, ratio) for s, x in enumerate(image_method)]
    return report.summarize(runs)


def test_verdict_says_beats_only_when_every_seed_improves():
    lines = report.verdict(_summary((1.9, 2.0, 2.1)))
    assert any(line.startswith("Pareto LoRA BEATS vanilla LoRA") and "3/3 seeds" in line for line in lines)
    assert any("text-dominant" in line for line in lines)


def test_verdict_says_not_consistent_for_mixed_seeds():
    lines = report.verdict(_summary((1.7, 2.2, 2.3)))
    assert any("NOT consistently better" in line and "1/3 seeds" in line for line in lines)


def test_verdict_says_does_not_beat_when_worse():
    lines = report.verdict(_summary((2.1, 2.2, 2.3), ratio=0.2))
    assert any("does NOT beat" in line for line in lines)
    assert any("NOT text-dominant" in line for line in lines)
    assert any("worse" in line for line in lines)  # text loss 1.05 vs 1.0


def test_summary_statistics_and_table():
    s = _summary((1.9, 2.0, 2.1))
    assert s["sum"]["image"]["mean"] == pytest.approx(2.1)
    assert s["sum"]["image"]["std"] == pytest.approx(0.1)
    assert s["pareto_lora"]["case_fractions"]["group0"] == {"RESCALED": 1.0}
    table = report.format_table(s)
    assert "pareto_lora" in table and "-0.1000" in table


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
    for name in ("results.json", "losses.png", "ratio_heatmaps.png", "cases.png", "summary.png", "balancers.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
    for name in ("losses.png", "ratio_heatmaps.png", "cases.png", "summary.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in res.stdout


def test_quick_demo_numbers(quick_demo):
    res, out, _ = quick_demo
    doc = json.loads((out / "results.json").read_text())
    rules = set(doc["config"]["rules"])
    assert rules == set(pareto_lora.RULES) | {"mimo", "gradnorm", "commit"}
    assert set(doc["summary"]) == rules
    seeds = doc["config"]["seeds"]
    assert len(doc["runs"]) == len(rules) * len(seeds)
    for run in doc["runs"]:
        assert len(run["records"]) == doc["config"]["steps"]
        finals = (run["eval_text"][-1], run["eval_image"][-1])
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in finals)
        assert {int(g["case"]) for r in run["records"] for g in r["groups"].values()} <= {int(c) for c in pareto_lora.Case}
    for rule, s in doc["summary"].items():
        for key in ("text", "image"):
            assert math.isfinite(s[key]["mean"]) and math.isfinite(s[key]["std"])
        assert f"{rule:<13}" in res.stdout
    # vanilla never modulates; the paper's rule rescales or runs MGDA in its modulated group somewhere
    sum_cases = {c for g in doc["summary"]["sum"]["case_fractions"].values() for c in g}
    assert sum_cases <= {"SUMMED", "INACTIVE", "DEGENERATE"}
    assert doc["verdict"] and any("Pareto LoRA" in v for v in doc["verdict"])
    for v in doc["verdict"]:
        assert v in res.stdout
    for other in ("mimo", "gradnorm", "commit", "mmpareto"):
        assert any(v.startswith(f"{other} vs vanilla:") for v in doc["verdict"])
    # each balancer's quantities are in its records
    first = {r["rule"]: r for r in doc["runs"]}
    assert "mimo/sigma_text" in first["mimo"]["records"][0]["balancer"]
    assert "gradnorm/w_image" in first["gradnorm"]["records"][0]["balancer"]
    assert first["commit"]["records"][0]["balancer"]["commit/kappa"] > 0
    assert all(math.isfinite(x) for x in _finite_numbers(doc["summary"]))

