"""The demo's runs: stable run-file keys, old run files, SGD divergence, the Chameleon end to end."""

import dataclasses
import json
import math

import pytest
import torch

import pareto_lora
from pareto_lora.app.demo import FULL, DemoConfig, ModelConfig
from pareto_lora.app.demo.base import BaseSpec
from pareto_lora.app.demo import data
from pareto_lora.app.demo.experiment import RunResult, _load_run, config_key, prepare, run_cell, run_experiment

TINY = dict(steps=4, pretrain_steps=4, eval_every=2, eval_batches=1, batch_size=4, eval_batch_size=8, cache_dir=None,
            model=ModelConfig(hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32, lora_rank=2))


def test_options_at_their_defaults_keep_the_run_file_keys_of_earlier_studies():
    # the full AdamW study of docs/study.md (/work/study-out/full/runs/61362f890cfb-*.json) must still resume
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


def test_base_per_seed_has_its_own_run_keys_and_the_default_keys_stay():
    full = DemoConfig(**FULL)
    per_seed = dataclasses.replace(full, base_per_seed=True)
    assert config_key(full) == "61362f890cfb"  # the shared-base study still resumes
    assert config_key(per_seed) != config_key(full)
    # base_seed is unused with one base per seed: it does not split the per-seed runs
    assert config_key(dataclasses.replace(per_seed, base_seed=3)) == config_key(per_seed)
    assert config_key(dataclasses.replace(full, base_seed=3)) != config_key(full)


def test_base_per_seed_pretrains_one_cached_base_per_seed(tmp_path):
    cache = tmp_path / "bases"
    cfg = DemoConfig(rules=("sum",), seeds=(0, 1), base_per_seed=True, **{**TINY, "cache_dir": str(cache)})
    setup = prepare(cfg, progress=False)
    b0, b1 = setup.base_for(0), setup.base_for(1)
    assert any(not torch.equal(p, q) for p, q in zip(b0.state_dict().values(), b1.state_dict().values()))
    assert len(list(cache.glob("base-*.pt"))) == 2  # one file per seed, each under its own key
    info = setup.base_info["per_seed"]
    assert sorted(info) == [0, 1] and not any(i["cached"] for i in info.values()) and not setup.base_info["cached"]
    assert setup.timings["pretrain_s"] > 0
    # seed 0's base is the shared base (base_seed 0): the same key, loaded from the cache
    shared = prepare(dataclasses.replace(cfg, base_per_seed=False), progress=False)
    assert shared.base_info["cached"] and shared.base_for(1) is shared.base
    for p, q in zip(shared.base.state_dict().values(), b0.state_dict().values()):
        assert torch.equal(p, q)
    again = prepare(cfg, progress=False)  # a rerun skips pre-training
    assert again.base_info["cached"] and all(i["cached"] for i in again.base_info["per_seed"].values())
    assert again.timings["pretrain_s"] == 0.0 and len(list(cache.glob("base-*.pt"))) == 2
    for p, q in zip(again.base_for(1).state_dict().values(), b1.state_dict().values()):
        assert torch.equal(p, q)
    late = again.base_for(2)  # a seed outside cfg.seeds (the SGD tuning seed) gets its base on demand
    assert 2 in again.base_info["per_seed"] and late is again.base_for(2) and len(list(cache.glob("base-*.pt"))) == 3


def test_shared_and_per_seed_base_runs_never_mix(tmp_path):
    cfg = DemoConfig(rules=("sum",), seeds=(1,), **TINY)
    shared = run_experiment(cfg, progress=False, runs_dir=str(tmp_path))
    per_seed = run_experiment(dataclasses.replace(cfg, base_per_seed=True), progress=False, runs_dir=str(tmp_path))
    assert per_seed["timings"]["runs_loaded"] == 0 and len(list(tmp_path.glob("*.json"))) == 2
    assert shared["runs"][0].final != per_seed["runs"][0].final  # seed 1 starts from another base
    assert per_seed["config"].base_per_seed and list(per_seed["base"]["per_seed"]) == [1]
    again = run_experiment(dataclasses.replace(cfg, base_per_seed=True), progress=False, runs_dir=str(tmp_path))
    assert again["timings"]["runs_loaded"] == 1 and again["runs"][0].final == per_seed["runs"][0].final


def test_plain_runs_in_one_backward_step_on_the_two_pass_gradient_and_measure_no_statistics():
    """plain_backward="one": a curve point's gradient is one backward of the weighted loss, equal to
    the two-pass sum up to rounding (float32: a few ulps of the largest entry), with NaN statistics."""
    from pareto_lora.app.demo.methods import build_method, is_plain
    from pareto_lora.app.demo.model import attach_lora, logits_of

    cfg = DemoConfig(rules=("w2",), seeds=(0,), **TINY)
    setup = prepare(cfg, progress=False)
    batch = data.sample_batch(setup.ft_world, 4, torch.Generator().manual_seed(0))
    grads, reports = {}, {}
    for how in ("one", "two"):
        c = dataclasses.replace(cfg, plain_backward=how)
        model = attach_lora(setup.base, c.model, 0)
        method = build_method(model, "w2", c)
        lt, li = pareto_lora.modality_losses(logits_of(model, batch.model_inputs()), batch.labels,
                                             image_token_mask=batch.image_token_mask)
        reports[how] = method.pl.backward(text=lt, image=2.0 * li).to_record()
        grads[how] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for g1, g2 in zip(grads["one"], grads["two"]):
        assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6 * float(g2.abs().max()))
    assert all(math.isnan(g["ratio"]) for g in reports["one"]["groups"].values())
    assert all(math.isfinite(g["ratio"]) for g in reports["two"]["groups"].values())
    assert is_plain("sum") and is_plain("w2") and is_plain("text_only") and not is_plain("pareto_lora")
    assert not is_plain("commit") and not is_plain("mimo")


def test_plain_backward_one_and_pretrain_have_their_own_run_keys():
    full = DemoConfig(**FULL)
    assert config_key(dataclasses.replace(full, plain_backward="one")) != config_key(full)
    assert config_key(dataclasses.replace(full, pretrain=True)) != config_key(full)
    assert config_key(dataclasses.replace(full, plain_backward="two", pretrain=False)) == "61362f890cfb"


def test_the_step0_evaluation_is_shared_by_the_methods_of_a_seed_bitwise():
    cfg = DemoConfig(rules=("sum", "pareto_lora"), seeds=(0, 1), **TINY)
    setup = prepare(cfg, progress=False)
    fresh = {(rule, seed): run_cell(setup, cfg, rule, seed, progress=False) for rule in ("sum", "pareto_lora")
             for seed in (0, 1)}
    assert sorted(k[:2] for k in setup.step0) == [(0, 20_000), (1, 20_001)]  # one evaluation per seed
    alone = prepare(cfg, progress=False)  # pareto_lora seed 1 with its own step-0 evaluation
    own = run_cell(alone, cfg, "pareto_lora", 1, progress=False)
    reused = fresh["pareto_lora", 1]
    assert (own.eval_text, own.eval_image, own.eval_acc) == (reused.eval_text, reused.eval_image, reused.eval_acc)
    assert own.eval_text[0] == fresh["sum", 1].eval_text[0] != fresh["sum", 0].eval_text[0]
