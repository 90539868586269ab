"""The demo's pre-trained base: cached on disk by a hash of everything that decides its weights."""

import torch

from pareto_lora.app.demo import data
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
