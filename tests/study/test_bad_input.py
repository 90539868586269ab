"""Every bad argument of pareto_lora.study is refused with ValueError("<argument>: expected ..."),
before any run starts and before the log is touched."""

import pytest

from pareto_lora.study import Result, Study

GOOD = {"rules": ["pareto_lora"], "weights": (1, 2), "seeds": (0, 1)}


@pytest.mark.parametrize("change, named", [
    ({"rules": "upgrad"}, "rules: expected a list of names"),
    ({"rules": ["nope"]}, "rules[0]: expected one of"),
    ({"rules": ["upgrad", "upgrad"]}, "rules: expected distinct names"),
    ({"rules": []}, "rules: expected one or more"),
    ({"rules": [3]}, "rules[0]: expected a non-empty string"),
    ({"weights": (2, 4)}, "weights: expected the weight 1"),
    ({"weights": (1, -1)}, "weights[1]: expected a finite number > 0"),
    ({"weights": (1, 0)}, "weights[1]: expected a finite number > 0"),
    ({"weights": (1, 1.0)}, "weights: expected distinct weights"),
    ({"weights": (1, 2, 2.0000001)}, "weights: expected distinct weights"),
    ({"weights": (1, "2")}, "weights[1]: expected"),
    ({"weights": (True, 2)}, "weights[0]: expected"),
    ({"weights": (1, float("nan"))}, "weights[1]: expected"),
    ({"weights": "12"}, "weights: expected a list"),
    ({"weights": 1}, "weights: expected a list"),
    ({"seeds": [0, 0]}, "seeds: expected distinct seeds"),
    ({"seeds": [0, "1"]}, "seeds[1]: expected an integer"),
    ({"seeds": [True, 1]}, "seeds[0]: expected an integer"),
    ({"seeds": [0, 1.0]}, "seeds[1]: expected an integer"),
    ({"seeds": []}, "seeds: expected one or more seeds"),
    ({"seeds": "01"}, "seeds: expected a list"),
    ({"seeds": 5}, "seeds: expected a list"),
    ({"log": 3}, "log: expected a file path"),
    ({"higher_is_better": "acc"}, "higher_is_better: expected a list of names"),
    ({"higher_is_better": {"text"}}, "higher_is_better: expected extra metrics only"),
    ({"lower_is_better": ["image"]}, "lower_is_better: expected extra metrics only"),
    ({"higher_is_better": ["acc"], "lower_is_better": ["acc"]}, "higher_is_better: expected metrics not also in"),
])
def test_study_arguments(change, named):
    with pytest.raises(ValueError, match="^" + named.replace("[", r"\[").replace("]", r"\]")):
        Study(**{**GOOD, **change})


def test_one_seed_and_balancers_are_allowed():
    Study(["mimo", "gradnorm", "upgrad"], weights=[1], seeds=[7])


@pytest.mark.parametrize("kw, named", [
    ({"run": 3}, "run: expected a callable"),
    ({"run": None}, "run: expected a callable"),
    ({"verbose": "False"}, "verbose: expected True or False"),
    ({"verbose": 0}, "verbose: expected True or False"),
])
def test_run_arguments_before_any_run_or_log(tmp_path, kw, named):
    calls = []
    log = tmp_path / "study.jsonl"
    kw = {"run": lambda m, s: calls.append(1), **kw}
    with pytest.raises(ValueError, match="^" + named):
        Study(**GOOD, log=log).run(kw.pop("run"), **kw)
    assert calls == [] and not log.exists()


def _rec(rule, weight, seed, text=1.0, image=2.0):
    return {"rule": rule, "weight": weight, "seed": seed, "metrics": {"text": text, "image": image}}


@pytest.mark.parametrize("records, named", [
    ("log.jsonl", "records: expected a list of run dicts"),
    ({"rule": None}, "records: expected a list of run dicts"),
    ([_rec(None, 1, 0), 5], r"records\[1\]: expected a dict with the keys"),
    ([_rec(None, 1, 0), {"rule": "x", "seed": 0}], r"records\[1\]: expected a dict with the keys"),
    ([{"rule": None, "seed": 0, "metrics": {}}], r"records\[0\]: expected a dict with the keys rule, seed, metrics .and weight"),
    ([_rec(None, 2, 0), _rec("upgrad", None, 0)], "records: weights: expected the weight 1"),
    ([_rec(None, 1, 0), _rec(None, -2, 0)], r"records\[1\].weight: expected a finite number > 0"),
    ([_rec(None, 1, 0), _rec(None, 1, 0), _rec("upgrad", None, 0)], "records: expected one run per method and seed"),
    ([_rec(None, 1, 0)], "records: rules: expected one or more"),
    ([_rec(None, 1, "0"), _rec("upgrad", None, "0")], r"records: seeds\[0\]: expected an integer"),
    ([_rec(None, 1, [0]), _rec("upgrad", None, [0])], r"records: seeds\[0\]: expected an integer"),
    ([_rec(None, 1, 0), _rec("upgrad", 2, 0)], r"records\[1\].weight: expected None for a rule's run"),
    ([_rec(None, 1, 0), {**_rec("upgrad", None, 0), "metrics": {"text": 1.0}}], r"records\[1\].metrics: expected the metrics"),
    ([_rec(None, 1, 0), _rec("upgrad", None, 0, image="two")], r"records\[1\].metrics: expected a number for metric 'image'"),
])
def test_from_records(records, named):
    with pytest.raises(ValueError, match="^" + named):
        Result.from_records(records)


def test_from_log_refuses_what_is_not_a_study_log(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="^log: expected a study log"):
        Result.from_log(path)
    path.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="^log: expected the first line"):
        Result.from_log(path)
    Study(**GOOD, log=path.with_name("ok.jsonl")).run(lambda m, s: {"text": 1.0, "image": 2.0})
    lines = path.with_name("ok.jsonl").read_text().splitlines()
    path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="^log: expected JSON on every line of .*line 2"):
        Result.from_log(path)
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(ValueError, match="^log: expected one line per run .* repeats w=1 seed 0"):
        Result.from_log(path)
    with pytest.raises(ValueError, match="^log: expected a file path"):
        Result.from_log(None)
    path.write_bytes(b"\xff\xfe\x00not text\n")
    with pytest.raises(ValueError, match="^log: expected a UTF-8 study log"):
        Result.from_log(path)
