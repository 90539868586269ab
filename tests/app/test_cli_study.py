"""`pareto-lora study LOG`: the report (or JSON) of a pareto_lora.study log, and its usage errors
(one line, exit 2, no traceback)."""

import json

import pytest

from pareto_lora.study import Result, Study
from test_cli import _usage_error, run_cli


def _run(method, seed):
    w = method.weight or 2.5
    return {"text": 1.0 + 0.02 * w + 0.004 * seed, "image": 2.0 - 0.1 * w + 0.003 * seed * seed}


def _log(tmp_path, seeds=3, name="study.jsonl"):
    path = tmp_path / name
    Study(rules=["pareto_lora"], weights=(1, 2, 4), seeds=seeds if not isinstance(seeds, int) else range(seeds),
          log=str(path)).run(_run)
    return path


def test_study_prints_the_logs_report(tmp_path):
    path = _log(tmp_path)
    res = run_cli("study", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == Result.from_log(str(path)).report().strip()
    assert res.stdout.lstrip().startswith("Power")


def test_study_json_is_result_as_dict(tmp_path):
    path = _log(tmp_path)
    res = run_cli("study", "--json", str(path))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(json.dumps(Result.from_log(str(path)).as_dict()))


def test_study_of_an_unfinished_log_reports_what_is_there(tmp_path):
    path = _log(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:10])  # two runs missing, the last line cut mid-write
    res = run_cli("study", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == Result.from_log(str(path)).report().strip()


@pytest.mark.parametrize("content, message", [
    (None, "log: expected an existing study log file (JSON lines), got"),
    ("", "log: expected a study log starting with its protocol line, got an empty file"),
    ("not json\n", "log: expected JSON on every line of"),
    ('{"format": "something else"}\n', "log: expected the first line of"),
])
def test_study_usage_errors(tmp_path, content, message):
    path = tmp_path / "log.jsonl"
    if content is not None:
        path.write_text(content)
    _usage_error(run_cli("study", str(path)), message)


def test_study_of_a_binary_file_is_a_usage_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\xff\xfe\x00not text\n")
    _usage_error(run_cli("study", str(path)), "log: expected a UTF-8 study log (JSON lines)")


def test_study_of_a_folder_is_a_usage_error(tmp_path):
    _usage_error(run_cli("study", str(tmp_path)), "log: expected an existing study log file")



def test_study_of_several_logs_is_their_merged_report(tmp_path):
    paths = [str(_log(tmp_path, [s], name=f"job{s}.jsonl")) for s in range(3)]
    res = run_cli("study", *paths)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == Result.from_logs(paths).report().strip() == Result.from_log(
        str(_log(tmp_path, 3))).report().strip()
    _usage_error(run_cli("study", paths[0], paths[0]), "w=1 seed 0 is in")
