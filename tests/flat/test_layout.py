"""Parameter discovery, layer groups and buffer layout (pareto_lora.flat.params, pareto_lora.flat.layout)."""

import re

import numpy as np
import pytest
import torch

from pareto_lora.flat.layout import build_layout, group_of_names, resolve_modulate, split_layers
from pareto_lora.flat.params import is_lora_param

import models


@pytest.fixture(scope="module")
def llama():
    return models.lora_llama(num_layers=7)


@pytest.fixture(scope="module")
def llava():
    return models.lora_llava()


@pytest.mark.parametrize("num_layers,num_groups", [(60, 5), (7, 3), (5, 5), (10, 4), (3, 1)])
def test_split_layers_matches_numpy_array_split(num_layers, num_groups):
    ours = [list(r) for r in split_layers(num_layers, num_groups)]
    theirs = [a.tolist() for a in np.array_split(np.arange(num_layers), num_groups)]
    assert ours == theirs


def test_is_lora_param_names():
    assert is_lora_param("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert is_lora_param("x.q_proj.lora_magnitude_vector.default.weight")
    assert is_lora_param("x.embed_tokens.lora_embedding_B.default")
    assert not is_lora_param("base_model.model.lm_head.modules_to_save.default.weight")
    assert not is_lora_param("model.layers.0.self_attn.q_proj.base_layer.weight")


def test_llama_groups_follow_the_documented_split(llama):
    layout = build_layout(llama, num_groups=3, modulate="middle")
    assert layout.stack_path == "base_model.model.model.layers"
    assert layout.group_names == ("group0", "group1", "group2")
    assert layout.group_layers == ((0, 1, 2), (3, 4), (5, 6))
    assert layout.active.tolist() == [False, True, False]
    expected_group = {i: g for g, r in enumerate(np.array_split(np.arange(7), 3)) for i in r.tolist()}
    for name, group in group_of_names(layout).items():
        layer = int(re.search(r"\.layers\.(\d+)\.", name).group(1))
        assert group == f"group{expected_group[layer]}", name
    # every trainable parameter is in exactly one bucket, at a distinct place
    seen = sorted(i for b in layout.buckets for i in b.param_index)
    assert seen == list(range(len(layout.params)))


@pytest.mark.parametrize(
    "modulate,expected",
    [
        ("lower", [True, False, False, False, False]),
        ("middle", [False, False, True, False, False]),
        ("upper", [False, False, False, False, True]),
        ("all", [True] * 5),
        ("none", [False] * 5),
        (3, [False, False, False, True, False]),
        (["lower", 4], [True, False, False, False, True]),
    ],
)
def test_modulate_choices(llama, modulate, expected):
    assert build_layout(llama, num_groups=5, modulate=modulate).active.tolist() == expected


def test_per_layer_mode(llama):
    layout = build_layout(llama, num_groups="per_layer", modulate="all")
    assert layout.num_groups == 7
    assert layout.group_layers == tuple((i,) for i in range(7))
    assert layout.unit_group.tolist() == list(range(7))


def test_llava_stack_is_the_language_model_and_projector_is_its_own_group(llava):
    layout = build_layout(llava, num_groups=3, modulate="projector")
    assert layout.stack_path.endswith("language_model.layers")
    assert layout.group_names == ("group0", "group1", "group2", "projector")
    assert layout.active.tolist() == [False, False, False, True]
    groups = group_of_names(layout)
    projector = {n for n, g in groups.items() if g == "projector"}
    assert projector and all("multi_modal_projector" in n for n in projector)
    assert all("language_model.layers" in n for n, g in groups.items() if g != "projector")
    # "all" covers the projector too
    assert build_layout(llava, num_groups=3, modulate="all").active.tolist() == [True] * 4


def test_dora_magnitude_and_modules_to_save():
    model = models.lora_llama(num_layers=2, use_dora=True, modules_to_save=["lm_head"])
    layout = build_layout(model, num_groups=2, modulate="all")
    groups = group_of_names(layout)
    assert any("lora_magnitude_vector" in n and g.startswith("group") for n, g in groups.items())
    other = [n for n, g in groups.items() if g == "other"]
    assert other and all("lm_head" in n for n in other)
    assert layout.group_names[-1] == "other"
    assert layout.active.tolist() == [True, True, False]  # non-LoRA parameters always get the plain sum


def test_mixed_dtypes_get_one_bucket_each():
    model = models.lora_llama(num_layers=2, modules_to_save=["lm_head"], dtype=torch.bfloat16)
    layout = build_layout(model, num_groups=2)
    dtypes = {b.dtype for b in layout.buckets}
    assert len(layout.buckets) == len(dtypes) == len({p.dtype for p in layout.params}) == 2
    for b in layout.buckets:
        off = b.unit_offsets
        assert off[0] == 0 and off[-1] == b.numel and bool((off[1:] >= off[:-1]).all())
        assert all(layout.params[i].dtype == b.dtype for i in b.param_index)


def test_gpt2_style_stack():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=4, n_head=2, n_positions=32))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    layout = build_layout(model, num_groups=2)
    assert layout.stack_path.endswith("transformer.h")
    assert layout.group_layers == ((0, 1), (2, 3))


def test_errors(llama, llava):
    with pytest.raises(ValueError, match="model: no trainable LoRA parameters"):
        build_layout(models.tiny_llama(num_layers=2))
    with pytest.raises(ValueError, match=r"num_groups: expected 1 <= num_groups <= 7"):
        build_layout(llama, num_groups=8)
    with pytest.raises(ValueError, match="num_groups"):
        build_layout(llama, num_groups=0)
    with pytest.raises(ValueError, match="num_groups"):
        build_layout(llama, num_groups="many")
    with pytest.raises(ValueError, match="modulate: unknown value 'bottom'"):
        build_layout(llama, modulate="bottom")
    with pytest.raises(ValueError, match="modulate: 'projector' requested but"):
        build_layout(llama, modulate="projector")
    with pytest.raises(ValueError, match="modulate: group index 5 out of range"):
        build_layout(llama, num_groups=5, modulate=5)
    with pytest.raises(ValueError, match="modulate"):
        resolve_modulate(True, 5, False)
    with pytest.raises(ValueError, match="layers_path"):
        build_layout(llava, layers_path="base_model.model.model.multi_modal_projector")


def test_resolve_modulate_with_named_groups():
    # Without names the projector is index num_groups (has_projector), as before.
    assert resolve_modulate("projector", 3, True) == {3}
    assert resolve_modulate("all", 3, True) == {0, 1, 2, 3}
    # Named groups (an architecture's extra groups) follow the layer groups in their order.
    named = ("generation", "projector")
    assert resolve_modulate("generation", 3, extra_groups=named) == {3}
    assert resolve_modulate(["projector", "lower"], 3, extra_groups=named) == {4, 0}
    assert resolve_modulate("all", 3, extra_groups=named) == {0, 1, 2, 3, 4}
    assert resolve_modulate(4, 3, extra_groups=named) == {4}
    # the depth names never move: they index the layer groups only
    assert [resolve_modulate(m, 3, extra_groups=named) for m in ("lower", "middle", "upper")] == [{0}, {1}, {2}]
    with pytest.raises(ValueError, match="modulate: group index 5 out of range"):
        resolve_modulate(5, 3, extra_groups=named)
    with pytest.raises(ValueError, match="modulate: unknown value 'vision'; expected one of .*generation"):
        resolve_modulate("vision", 3, extra_groups=named)
    with pytest.raises(ValueError, match="modulate: 'projector' requested but"):
        resolve_modulate("projector", 3, extra_groups=("generation",))
