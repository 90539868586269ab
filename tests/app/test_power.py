"""Issue 25: the demo's first result line says whether the run can tell w=2 from w=1 (vanilla),
from the run's own paired image-excess interval; hand-made summaries, no training."""

import pytest

from pareto_lora.app.demo import report, verdict
from pareto_lora.app.demo.output import result_lines

from pareto_lora.app.demo.experiment import RunResult

_RESULT = {"floors": {"text": 0.57, "image": 3.03},
           "base": {"steps": 300, "own_world": {"image_excess": 0.05, "cell_acc": 0.97},
                    "finetune_world_before": {"text_excess": 5.0, "image_excess": 2.0, "cell_acc": 0.3}}}


def _fake_run(rule, seed, text_excess, image_excess):
    rec = {"step": 1, "active": [True, False], "loss_text": 1.0, "loss_image": 3.0,
           "groups": {"group0": {"ratio": 2.0, "case": 0}}, "layers": {}}
    return RunResult(rule, seed, [0, 1], [2.0, 1.0], [4.0, 3.0], [rec], 0.1,
                     eval_text_excess=[2.0, text_excess], eval_image_excess=[3.0, image_excess], eval_acc=[0.2, 0.5])

# per seed (text excess, image excess): vanilla, and the brackets far apart
_BASE = {"sum": (0.10, 1.00), "text_only": (0.05, 2.0), "image_only": (3.0, 0.3)}


def _lines(w2_image, rules=None):
    """3 seeds of _BASE plus w2 at image excess w2_image[seed]; the printed results and the power check."""
    runs = []
    for seed in range(3):
        pts = {**_BASE, "w2": (0.15, w2_image[seed])}
        runs += [_fake_run(r, seed, *p) for r, p in pts.items() if rules is None or r in rules]
    summary = report.summarize(runs)
    comparison = report.compare(summary)
    check = verdict.power(comparison)
    return check, result_lines(check, summary, comparison, verdict.verdict(_RESULT, summary, comparison))


def test_a_run_that_tells_w2_from_w1_says_so_first():
    check, lines = _lines([0.90, 0.91, 0.89])  # -0.10 in every seed
    assert lines[0] == check["line"]
    assert check["detects"] is True and check["interval"]["high"] < 0
    assert lines[0].startswith("Power: w=2 minus w=1 (vanilla), paired image excess -0.100 [")
    assert "over 3 seeds: this run can tell w=2 from w=1 (the interval excludes 0)." in lines[0]
    assert "cannot" not in lines[0]


def test_a_run_that_cannot_tell_w2_from_w1_says_so_first():
    check, lines = _lines([0.70, 1.20, 0.95])  # mean -0.05, the interval straddles 0
    assert lines[0] == check["line"]
    assert check["detects"] is False and check["interval"]["low"] < 0 < check["interval"]["high"]
    assert check["interval"]["mean"] == pytest.approx(-0.05)
    assert "this run cannot tell w=2 from w=1 apart (the interval covers 0)" in lines[0]
    assert "run --full (5 seeds)" in lines[0]
    assert lines[1].startswith("Final held-out")  # the table comes after it


@pytest.mark.parametrize("rules", [("sum", "text_only", "image_only"), ("w2", "text_only", "image_only")])
def test_without_sum_or_w2_the_power_check_says_it_needs_both(rules):
    check, lines = _lines([0.90, 0.91, 0.89], rules=rules)
    assert lines[0] == check["line"] and check["detects"] is None and check["interval"] is None
    assert lines[0] == "Power: not checked; the power check needs both 'sum' (w=1) and 'w2' among the methods."


def test_one_seed_cannot_tell_anything_apart():
    runs = [_fake_run(r, 0, *p) for r, p in {**_BASE, "w2": (0.15, 0.5)}.items()]
    check = verdict.power(report.compare(report.summarize(runs)))
    assert check["detects"] is False and "(one seed: no interval)" in check["line"] and "cannot tell" in check["line"]


@pytest.mark.parametrize("rules, said", [
    (("sum", "w2"), "No brackets (text_only / image_only not run): the power check above measures the sensitivity instead."),
    (("sum",), "No brackets (text_only / image_only not run): the experiment's sensitivity is unknown."),
])
def test_without_brackets_the_power_check_stands_in_for_them(rules, said):
    """The default demo runs no brackets (5 seeds of sum, w2, w4, pareto_lora): its sensitivity is the power check's."""
    _, lines = _lines([0.90, 0.91, 0.89], rules=rules)
    assert said in lines
    assert not any(line.startswith("Brackets:") for line in lines)
