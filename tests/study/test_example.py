"""examples/compare_on_your_data.py runs end to end (smaller: 2 seeds, 3 steps), so it cannot rot."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _example():
    spec = importlib.util.spec_from_file_location("compare_on_your_data",
                                                  os.path.join(ROOT, "examples", "compare_on_your_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_study_runs_and_reports(tmp_path):
    log = tmp_path / "study.jsonl"
    result = _example().main(seeds=2, steps=3, weights=(1, 2), log=str(log))
    assert not result.missing and not [r for r in result.records if r.failure]
    lines = result.report().splitlines()
    assert lines[0].startswith("Power: w=2 minus w=1 (vanilla), paired image")
    assert lines[1].startswith("Study: pareto_lora against the reweighting curve") and "6 of 6 runs finished" in lines[1]
    assert "pareto_lora:" in lines and any(s.startswith("  vs reweighting curve at equal text") for s in lines)
    assert len(log.read_text().splitlines()) == 1 + 6
    # the same seeds give the same runs: rerunning into a new log reproduces every number (pairing needs it)
    again = _example().main(seeds=2, steps=3, weights=(1, 2))
    assert again.as_dict() == result.as_dict()
