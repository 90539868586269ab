"""Result.from_logs: one study split by seed over several jobs, each with its own log."""

import pytest

from pareto_lora.study import Result, Study
from test_runner import fake_run


def _job(tmp_path, name, seeds, **kw):
    path = tmp_path / name
    Study(**{"rules": ["pareto_lora", "upgrad"], "weights": (1, 2, 4), "seeds": seeds, "log": str(path), **kw}).run(fake_run)
    return str(path)


def test_logs_split_by_seed_give_the_one_log_result(tmp_path):
    whole = Result.from_log(_job(tmp_path, "whole.jsonl", range(4)))
    parts = [_job(tmp_path, f"job{s}.jsonl", [s]) for s in (2, 0, 3, 1)]
    merged = Result.from_logs(parts)
    assert merged.as_dict() == whole.as_dict()
    assert merged.report() == whole.report()


def test_an_unfinished_job_leaves_its_runs_missing(tmp_path):
    a = _job(tmp_path, "a.jsonl", [0, 1])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(open(_job(tmp_path, "b.jsonl", [2])).readlines()[:3]))  # protocol + 2 of 5 runs
    merged = Result.from_logs([a, str(b)])
    assert merged.protocol.seeds == (0, 1, 2)
    assert [(m.name, s) for m, s in merged.missing] == [("w=4", 2), ("pareto_lora", 2), ("upgrad", 2)]


@pytest.mark.parametrize("kw, named", [({"weights": (1, 2)}, "weights: [1.0, 2.0, 4.0] vs [1.0, 2.0]"),
                                       ({"rules": ["pareto_lora"]}, "rules:"),
                                       ({"higher_is_better": {"acc"}}, "higher_is_better:")])
def test_logs_of_different_protocols_are_refused(tmp_path, kw, named):
    a = _job(tmp_path, "a.jsonl", [0])
    b = tmp_path / "b.jsonl"
    Study(**{"rules": ["pareto_lora", "upgrad"], "weights": (1, 2, 4), "seeds": [1], "log": str(b), **kw}).run(
        lambda m, s: {**fake_run(m, s), **({"acc": 0.5} if "higher_is_better" in kw else {})})
    with pytest.raises(ValueError, match=r"paths: expected logs of one protocol") as e:
        Result.from_logs([a, str(b)])
    assert named in str(e.value)


def test_a_run_in_two_logs_is_refused_naming_both(tmp_path):
    a, b = _job(tmp_path, "a.jsonl", [0, 1]), _job(tmp_path, "b.jsonl", [1, 2])
    with pytest.raises(ValueError, match=r"w=1 seed 1 is in .*a\.jsonl.* and .*b\.jsonl"):
        Result.from_logs([a, b])


@pytest.mark.parametrize("paths, match", [("one.jsonl", "paths: expected a list of study log paths"),
                                          ([], "paths: expected one or more study log paths")])
def test_bad_paths(paths, match):
    with pytest.raises(ValueError, match=match):
        Result.from_logs(paths)
