"""The demo's runs: stable run-file keys, old run files, SGD divergence, the Chameleon end to end."""

import dataclasses
import json

import pytest
import torch

from pareto_lora.app.demo import FULL, DemoConfig, ModelConfig
from pareto_lora.app.demo.base import BaseSpec
from pareto_lora.app.demo import data
from pareto_lora.app.demo.experiment import RunResult, _load_run, config_key, prepare, run_cell, run_experiment

TINY = dict(steps=4, pretrain_steps=4, eval_every=2, eval_batches=1, batch_size=4, eval_batch_size=8, cache_dir=None,
            model=ModelConfig(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32, lora_rank=2))


def test_options_at_their_defaults_keep_the_run_file_keys_of_earlier_studies():
    # the full AdamW study of README (/work/study-out/full/runs/61362f890cfb-*.json) must still resume
    assert config_key(DemoConfig(**FULL)) == "61362f890cfb"
    full = DemoConfig(**FULL)
    assert config_key(dataclasses.replace(full, optimizer="sgd")) != "61362f890cfb"
    assert config_key(dataclasses.replace(full, model=ModelConfig(arch="chameleon"))) != "61362f890cfb"


def test_base_key_depends_on_the_arch():
    v, w = data.Vocab(), data.make_world(1)
    spec = BaseSpec(ModelConfig(), v.size, 50, 0, 10, 1e-3, 4)
    assert spec.key(w) != dataclasses.replace(spec, model=ModelConfig(arch="chameleon")).key(w)


def test_old_run_files_get_their_group_layers_and_optimizer(tmp_path):
    rec = {"step": 1, "groups": {"group0": {"ratio": 1.0, "case": 0}, "group1": {"ratio": 1.0, "case": 0},
                                 "group2": {"ratio": 1.0, "case": 0}}, "layers": {}, "active": [True, False, False]}
    old = {"rule": "sum", "seed": 0, "eval_steps": [0], "eval_text": [1.0], "eval_image": [1.0], "records": [rec],
           "seconds": 1.0, "eval_text_excess": [0.5], "eval_image_excess": [0.5], "eval_acc": [0.1]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    run = _load_run(str(path), DemoConfig())
    assert run.group_layers == [[0, 1], [2, 3], [4, 5]]  # split_layers(6, 3), as pl.layout does
    assert run.optimizer == "adamw" and run.lr == DemoConfig().lr and not run.diverged


def test_sgd_divergence_stops_the_run_and_is_recorded():
    cfg = DemoConfig(optimizer="sgd", rules=("sum",), seeds=(0,), **TINY)
    setup = prepare(cfg, progress=False)
    run = run_cell(setup, dataclasses.replace(cfg, lr=1e6), "sum", 0, None, progress=False)
    assert run.diverged and run.diverged_step is not None and len(run.records) == run.diverged_step - 1
    ok = run_cell(setup, dataclasses.replace(cfg, lr=0.1), "sum", 0, None, progress=False)
    assert not ok.diverged and ok.optimizer == "sgd" and ok.lr == 0.1 and len(ok.records) == cfg.steps


def test_chameleon_study_runs_end_to_end(tmp_path):
    cfg = DemoConfig(rules=("sum", "w2", "pareto_lora"), seeds=(0,), **{**TINY, "model": dataclasses.replace(TINY["model"], arch="chameleon")})
    res = run_experiment(cfg, progress=False, runs_dir=str(tmp_path))
    assert [r.rule for r in res["runs"]] == ["sum", "w2", "pareto_lora"]
    for run in res["runs"]:
        assert all(torch.isfinite(torch.tensor(run.eval_image_excess))) and run.group_layers == [[0], [1], [2]]
    assert res["runs"][0].final != res["runs"][2].final
    again = run_experiment(cfg, progress=False, runs_dir=str(tmp_path))
    assert again["timings"]["runs_loaded"] == 3
