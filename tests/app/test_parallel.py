"""The study's runs in worker processes (app/demo/parallel.py) give the serial study's numbers."""

import dataclasses

import pytest

from pareto_lora.app.demo import DemoConfig, ModelConfig, parallel
from pareto_lora.app.demo.experiment import run_experiment

TINY = dict(steps=3, pretrain_steps=3, eval_every=3, eval_batches=1, batch_size=4, eval_batch_size=8,
            model=ModelConfig(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32, lora_rank=2))


def _numbers(run):
    return (run.rule, run.seed, run.eval_text, run.eval_image, run.eval_acc,
            [{k: v for k, v in r.items() if "seconds" not in k} for r in run.records])


def test_two_workers_give_the_serial_runs_bitwise(tmp_path):
    cfg = DemoConfig(rules=("sum", "w2", "pareto_lora"), seeds=(0, 1), cache_dir=str(tmp_path / "cache"), **TINY)
    serial = run_experiment(dataclasses.replace(cfg, workers=1), progress=False)
    both = run_experiment(dataclasses.replace(cfg, workers=2), progress=False, runs_dir=str(tmp_path / "runs"))
    assert [_numbers(r) for r in both["runs"]] == [_numbers(r) for r in serial["runs"]]
    assert both["timings"]["runs_loaded"] == 0 and both["timings"]["finetune_s"] > 0
    again = run_experiment(dataclasses.replace(cfg, workers=2), progress=False, runs_dir=str(tmp_path / "runs"))
    assert again["timings"]["runs_loaded"] == 6  # resumed from the workers' run files
    assert [_numbers(r) for r in again["runs"]] == [_numbers(r) for r in serial["runs"]]


def test_default_workers_need_a_cached_base_on_the_cpu():
    assert parallel.default_workers(False, "cpu", 10) == 1  # a worker would pre-train the base again
    assert parallel.default_workers(True, "cuda", 10) == 1
    assert parallel.default_workers(True, "cpu", 1) == 1
    assert parallel.default_workers(True, "cpu", 10) == min(parallel.usable_cpus(), 10)


@pytest.mark.parametrize("workers", [0, -1, True, "2", 1.5, float("nan")])
def test_workers_must_be_a_positive_integer(workers):
    with pytest.raises(ValueError, match="workers: expected None or an int >= 1"):
        DemoConfig(workers=workers).check()
