"""Study.run: the order of runs, the log, resuming an interrupted study, a changed protocol refused,
what a run may return (failed runs, bugs raised), and an exception inside run."""

import json
import math
import random

import pytest

from pareto_lora.study import Method, Result, Study


def fake_run(method, seed):
    """Deterministic in (method, seed): w moves image down and text up; the rule sits below the curve."""
    shared = random.Random(seed).gauss(0, 0.05)  # the seed's common part: what pairing removes
    own = random.Random(f"{method.name}/{seed}").gauss(0, 0.01)
    if method.rule is None:
        t, i = 1.0 + 0.05 * math.log2(method.weight), 2.0 - 0.1 * math.log2(method.weight)
    else:
        t, i = 1.02, 1.85
    return {"text": t + shared + own, "image": i + shared - own}


class Counting:
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, method, seed):
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("stopped")  # a user's Ctrl-C in the middle of the study
        self.calls.append((method.name, seed))
        return fake_run(method, seed)


def _study(log, **kw):
    return Study(**{"rules": ["pareto_lora"], "weights": (1, 2, 4), "seeds": range(3), "log": log, **kw})


def test_runs_seed_by_seed_and_logs_each_run(tmp_path):
    log = tmp_path / "study.jsonl"
    run = Counting()
    res = _study(log).run(run)
    assert run.calls == [(m, s) for s in range(3) for m in ("w=1", "w=2", "w=4", "pareto_lora")]
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["protocol"]["weights"] == [1.0, 2.0, 4.0] and len(lines) == 1 + 12
    assert Result.from_log(log).as_dict() == res.as_dict()
    assert res.report().splitlines()[0].startswith("Power: w=2 minus w=1")
    assert _study(None).run(fake_run).as_dict() == res.as_dict()  # no log: the same result


def test_resume_runs_only_the_missing_runs_and_gives_the_same_result(tmp_path):
    full = _study(tmp_path / "full.jsonl").run(fake_run)
    log = tmp_path / "study.jsonl"
    first = Counting(fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        _study(log).run(first)
    assert len(log.read_text().splitlines()) == 1 + 5  # the five finished runs are in the log
    partial = Result.from_log(log)
    assert len(partial.missing) == 7 and "Not run yet" in partial.report()
    with open(log, "a") as f:
        f.write('{"method": "w=4", "rule": nu')  # a line cut off by the interruption
    second = Counting()
    res = _study(log).run(second)
    assert second.calls == [(m, s) for s in range(3) for m in ("w=1", "w=2", "w=4", "pareto_lora")][5:]
    assert res.report() == full.report() and res.as_dict() == full.as_dict()
    assert Result.from_log(log).report() == full.report()
    third = Counting()
    _study(log).run(third)
    assert third.calls == []  # finished: nothing runs again


@pytest.mark.parametrize("change, named", [
    ({"weights": (1, 2)}, "(this study vs the log: weights: [1.0, 2.0] vs [1.0, 2.0, 4.0])"),
    ({"seeds": range(4)}, "seeds: [0, 1, 2, 3] vs [0, 1, 2]"),
    ({"rules": ["pareto_lora", "upgrad"]}, "rules: ['pareto_lora', 'upgrad'] vs ['pareto_lora']"),
    ({"higher_is_better": {"acc"}}, "higher_is_better: ['acc'] vs []"),
])
def test_a_changed_protocol_refuses_the_old_log(tmp_path, change, named):
    log = tmp_path / "study.jsonl"
    _study(log).run(fake_run)
    before = log.read_text()
    run = Counting()
    with pytest.raises(ValueError, match="log: expected a log of this study's protocol") as e:
        _study(log, **change).run(run)
    assert named in str(e.value) and run.calls == [] and log.read_text() == before


def test_nonfinite_metrics_record_a_failed_run(tmp_path):
    def run(method, seed):
        out = fake_run(method, seed)
        return {**out, "image": math.nan} if (method.rule, seed) == ("pareto_lora", 1) else out

    log = tmp_path / "study.jsonl"
    res = _study(log).run(run)
    assert "pareto_lora seed 1 (image = nan)" in res.report()
    assert res.comparisons["pareto_lora"]["vs_vanilla"]["text"]["seeds"] == [0, 2]
    assert json.loads(log.read_text().splitlines()[8])["status"] == "failed"
    assert Result.from_log(log).report() == res.report()


@pytest.mark.parametrize("returned, match", [
    (None, "expected a dict of metrics"),
    ({"text": 1.0}, "expected the metrics text, image; missing 'image'"),
    ({"text": 1.0, "image": "2.0"}, "expected a number for metric 'image'"),
    ({"text": True, "image": 2.0}, "expected a number for metric 'text'"),
    ({"text": 1.0, "image": 2.0, "acc": 0.5}, "expected only the metrics text, image .declare extra ones"),
])
def test_a_run_returning_a_non_result_raises_and_keeps_the_log(tmp_path, returned, match):
    log = tmp_path / "study.jsonl"

    def run(method, seed):
        return returned if (method.name, seed) == ("w=4", 0) else fake_run(method, seed)

    with pytest.raises(ValueError, match=r"run\('w=4', seed=0\): " + match):
        _study(log).run(run)
    assert len(log.read_text().splitlines()) == 1 + 2  # w=1 and w=2 of seed 0


def test_extra_metrics_with_a_direction_are_compared_with_vanilla_only(tmp_path):
    def run(method, seed):
        return {**fake_run(method, seed), "acc": 0.5 + (0.1 + 0.01 * seed if method.rule else 0.0)}

    res = _study(None, higher_is_better={"acc"}).run(run)
    assert res.comparisons["pareto_lora"]["vs_vanilla"]["acc"]["word"] == "better"
    assert "acc (higher better)" in res.report()


def test_method_names_and_verbose(capsys):
    assert Method(None, 1.0).is_vanilla and Method(None, 2.0).name == "w=2" and Method("upgrad", None).name == "upgrad"
    Study(["upgrad"], weights=(1, 2), seeds=[3, 4]).run(fake_run, verbose=True)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[0].startswith("[1/6] w=1 seed 3: text ")
