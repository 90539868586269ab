"""The demo's pre-trained base: cached on disk by a hash of everything that decides its weights."""

import torch

from pareto_lora.app.demo import data
from pareto_lora.app.demo import base as base_module
from pareto_lora.app.demo.base import BaseSpec, pretrained_base
from pareto_lora.app.demo.model import ModelConfig


def _spec(**kw):
    v = data.Vocab()
    return BaseSpec(**{**dict(model=ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                              vocab_size=v.size, seq_len=50, seed=0, max_steps=2, lr=1e-3, batch_size=4,
                              target_acc=1.0, check_every=1), **kw})


def test_base_is_cached_and_reloaded_bitwise(tmp_path):
    world = data.make_world(1)
    a, info_a = pretrained_base(_spec(), world, "cpu", str(tmp_path))
    assert not info_a["cached"] and info_a["steps"] == 2 and 0 <= info_a["own_world"]["cell_acc"] <= 1
    assert len(list(tmp_path.glob("base-*.pt"))) == 1
    b, info_b = pretrained_base(_spec(), world, "cpu", str(tmp_path))
    assert info_b["cached"] and info_b["steps"] == 2
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_cache_key_changes_with_the_spec_and_the_world():
    w1, w2 = data.make_world(1), data.make_world(2)
    assert _spec().key(w1) == _spec().key(w1)
    assert _spec().key(w1) != _spec(max_steps=3).key(w1)
    assert _spec().key(w1) != _spec().key(w2)


def test_stops_early_once_the_target_accuracy_is_reached(tmp_path):
    _, info = pretrained_base(_spec(target_acc=0.0 + 1e-9, max_steps=5), data.make_world(1), "cpu", None)
    assert info["steps"] == 1  # any accuracy > 0 meets the target at the first check


def _default_spec_and_world():
    """The spec and pre-training world of the default demo's base (as experiment._load_base builds them)."""
    from pareto_lora.app.demo import DEFAULT, DemoConfig
    from pareto_lora.app.demo.experiment import prepare

    cfg = DemoConfig(**DEFAULT)
    world = data.make_world(cfg.pretrain_world_seed, cfg.vocab, noise=cfg.image_noise, num_templates=cfg.num_templates)
    ft = data.make_world(cfg.finetune_world_seed, cfg.vocab, noise=cfg.image_noise, num_templates=cfg.num_templates)
    seq_len = data.sample_batch(ft, 1, torch.Generator().manual_seed(0)).input_ids.shape[1]
    spec = BaseSpec(cfg.model, cfg.vocab.size, seq_len, cfg.base_seed, cfg.pretrain_steps, cfg.pretrain_lr,
                    cfg.batch_size, cfg.pretrain_target_acc)
    return spec, world


def test_the_default_demo_base_ships_and_solves_its_world():
    # Fails when the world, the model or the pre-training spec changes without the shipped base being
    # pre-trained again (`pareto-lora demo --pretrain`, then copy the cached file to app/demo/bases/).
    spec, world = _default_spec_and_world()
    path = base_module.shipped_path(spec, world)
    assert path is not None, "the default demo's base is not shipped under its current key"
    model, info = pretrained_base(spec, world, "cpu", None)
    assert info["shipped"] and info["cached"] and info["seconds"] == 0.0 and info["pretrained_on"]
    # its own-world evaluation, measured again here, is the one stored with it and meets the target
    from pareto_lora.app.demo.evaluation import evaluate
    from pareto_lora.app.demo.floors import entropy_floors

    own = evaluate(model, data.fixed_batches(world, 2, 64, seed=30_000 + spec.seed), "cpu", world, entropy_floors(world))
    assert own == info["own_world"] and own["cell_acc"] >= spec.target_acc


def test_a_shipped_base_is_used_unless_pretrain_is_asked(tmp_path, monkeypatch):
    world = data.make_world(1)
    trained, _ = pretrained_base(_spec(), world, "cpu", None)
    with torch.no_grad():  # a shipped file that differs from what pre-training gives
        for p in trained.parameters():
            p.add_(1.0)
    monkeypatch.setattr(base_module, "_SHIPPED_DIR", str(tmp_path))
    name = f"base-{_spec().key(world, base_module.SHIPPED_TORCH)}.pt"
    torch.save({"state": trained.state_dict(), "info": {"steps": 2, "own_world": {}, "seconds": 1.0}}, tmp_path / name)
    shipped, info = pretrained_base(_spec(), world, "cpu", None)
    assert info["shipped"] and all(torch.equal(p, q) for p, q in zip(shipped.parameters(), trained.parameters()))
    again, info = pretrained_base(_spec(), world, "cpu", None, pretrain=True)
    assert not info["shipped"] and not info["cached"]
    assert not all(torch.equal(p, q) for p, q in zip(again.parameters(), trained.parameters()))
    assert base_module.shipped_path(_spec(max_steps=3), world) is None  # another spec: nothing shipped
