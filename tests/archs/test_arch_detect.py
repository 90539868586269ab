"""detect_arch: the spec of each architecture, from the model's own config and modules; LoRA coverage."""

import pytest
import torch
from torch import nn

import arch_models as am
from arch_models import ARCHS
from pareto_lora import archs

EXPECTED_STACK = {
    "chameleon": "model.layers",
    "emu3": "model.text_model.layers",
    "janus": "model.language_model.layers",
    "llava": "model.language_model.layers",
}


@pytest.mark.parametrize("name", ARCHS)
def test_spec_paths_are_names_of_the_model_passed_in(lora_model, name):
    model = lora_model(name)
    spec = archs.detect_arch(model)
    modules = dict(model.named_modules())
    assert spec.name == name
    assert spec.layers_path == "base_model.model." + EXPECTED_STACK[name]
    assert isinstance(modules[spec.layers_path], nn.ModuleList) and spec.num_layers == am.NUM_LAYERS
    for path in (spec.text_head, spec.image_head, *spec.frozen_prefixes, *[p for ps in spec.extra_groups.values() for p in ps]):
        assert path in modules, path
    # the same model unwrapped: the same paths without the PEFT prefix
    bare = archs.detect_arch(model.get_base_model())
    assert bare.layers_path == EXPECTED_STACK[name]
    assert bare.image_head == spec.image_head.removeprefix("base_model.model.")


def test_chameleon_image_ids_come_from_the_vocabulary_map(lora_model):
    model = lora_model("chameleon")
    spec = archs.detect_arch(model)
    # transformers' own list of the ids that its forward masks, plus begin/end of image
    masked = model.get_base_model().model.vocabulary_mapping.image_tokens
    assert masked == list(range(am.CHAMELEON_TEXT, am.CHAMELEON_TEXT + am.CHAMELEON_CODES))
    assert spec.image_token_ids == (*masked, am.CHAMELEON_BOI, am.CHAMELEON_EOI)
    assert spec.masks_image_logits and spec.placeholder_token_id == 3 == model.config.image_token_id
    assert spec.image_head == spec.text_head == "base_model.model.lm_head"


def test_emu3_image_ids_are_visual_tokens_and_image_markers(lora_model):
    model = lora_model("emu3")
    spec = archs.detect_arch(model)
    mapping = model.get_base_model().model.vocabulary_mapping
    assert mapping.image_tokens == list(am.EMU3_CODES)
    markers = {v for k, v in am.EMU3_SPECIAL.items() if k != "<image>"}
    assert set(spec.image_token_ids) == set(am.EMU3_CODES) | markers
    assert mapping.eol_token_id in spec.image_token_ids and spec.placeholder_token_id == mapping.image_token_id
    assert not spec.masks_image_logits


def test_janus_generation_modules_are_their_own_group(lora_model):
    spec = archs.detect_arch(lora_model("janus"))
    assert spec.image_objective == "gen_head" and spec.image_token_ids is None
    assert spec.image_head == "base_model.model.model.generation_head"
    gen = spec.extra_groups["generation"]
    assert {p.rsplit(".", 1)[-1] for p in gen} == {"generation_embeddings", "generation_aligner", "generation_head"}
    assert {p.rsplit(".", 1)[-1] for p in spec.extra_groups["projector"]} == {"vision_model", "aligner"}
    assert spec.group_of("base_model.model.model.generation_head.vision_head.lora_A.default.weight") == "generation"
    assert spec.group_of("base_model.model.model.aligner.fc1.lora_B.default.weight") == "projector"
    assert spec.layer_of("base_model.model.model.language_model.layers.3.mlp.up_proj.lora_A.default.weight") == 3


def test_llava_projector_group_and_user_split(lora_model):
    spec = archs.detect_arch(lora_model("llava"))
    assert spec.image_objective == "user_split" and spec.placeholder_token_id == am.LLAVA_IMAGE_TOKEN
    assert [p.rsplit(".", 1)[-1] for p in spec.extra_groups["projector"]] == ["multi_modal_projector", "vision_tower"]


def _lora_modules(model):
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def test_all_linear_reaches_janus_generation_head_and_aligner_but_not_its_embedding(lora_model):
    # PEFT "all-linear" wraps every nn.Linear except the output embedding (lm_head); Janus'
    # generation_embeddings is an nn.Embedding, so it needs target_modules=[..., "generation_embeddings"].
    lora = _lora_modules(lora_model("janus"))
    gen = {n for n in lora if ".generation_" in n}
    assert gen == {f"base_model.model.model.{m}" for m in ("generation_aligner.fc1", "generation_aligner.hidden_layers.0",
                                                           "generation_head.proj_out", "generation_head.vision_head")}
    assert not any("lm_head" in n or "generation_embeddings" in n for n in lora)
    assert any(".vision_model." in n for n in lora) and any(".aligner." in n for n in lora)


def test_emu3_all_linear_wraps_the_frozen_vq_tokenizer_unless_excluded():
    base = am.tiny_emu3()
    spec = archs.detect_arch(base)
    assert spec.frozen_prefixes == ("model.vqmodel",)
    assert any(n.startswith("base_model.model.model.vqmodel.") for n in _lora_modules(am.lora(am.tiny_emu3())))
    excluded = _lora_modules(am.lora(base, exclude_modules=spec.lora_exclude_modules))
    assert excluded and not any(".vqmodel." in n for n in excluded)


def test_chameleon_all_linear_leaves_the_vq_model_alone(lora_model):
    # Chameleon's VQ encoder is convolutions only: nothing to exclude.
    assert not any(".vqmodel." in n for n in _lora_modules(lora_model("chameleon")))


def test_overrides_for_an_unknown_causal_lm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = am.lora(transformers.LlamaForCausalLM(cfg))
    spec = archs.detect_arch(model)
    assert spec.name == "causal_lm" and spec.layers_path == "base_model.model.model.layers"
    ids = torch.randint(0, 50, (2, 8))
    with pytest.raises(ValueError, match="no image split is defined"):
        archs.modality_losses_for(model, {"input_ids": ids}, spec)
    spec = archs.detect_arch(model, archs.ArchOverrides(image_token_ids=range(40, 50), layers_path="model.layers"))
    assert spec.image_objective == "vocab_tokens" and spec.image_token_ids == tuple(range(40, 50))
    mask = archs.image_token_mask(model, {"input_ids": ids}, spec)
    assert torch.equal(mask, ids >= 40)
    with pytest.raises(ValueError, match="expected a submodule 'nope'"):
        archs.detect_arch(model, archs.ArchOverrides(image_head="nope"))


def test_janus_rejects_vocabulary_overrides(lora_model):
    with pytest.raises(ValueError, match="generation head"):
        archs.detect_arch(lora_model("janus"), archs.ArchOverrides(image_token_ids=[1, 2]))


def test_empty_vocabulary_map_is_a_clear_error():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ChameleonConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, vocabulary_map={"<image>": 3},
                                       vq_config=dict(embed_dim=8, num_embeddings=4, latent_channels=8, base_channels=32,
                                                      channel_multiplier=[1], resolution=8, attn_resolutions=[]))
    with pytest.raises(ValueError, match="no IMGIMG"):
        archs.detect_arch(transformers.ChameleonForConditionalGeneration(cfg))


@pytest.mark.parametrize("ids, match", [
    ([-1], r"^image_token_ids: expected token ids \(ints >= 0\), got -1"),
    ([3, 2.5], r"^image_token_ids: expected token ids \(ints >= 0\), got 2.5"),
    ([True], r"^image_token_ids: expected token ids"),
    ("40", r"^image_token_ids: expected a sequence of token ids"),
    (5, r"^image_token_ids: expected a sequence of token ids"),
    ([], r"^image_token_ids: expected at least one token id"),
])
def test_override_ids_must_be_token_ids(ids, match):
    """Issue 27: ArchOverrides(image_token_ids=[-1]) was accepted."""
    with pytest.raises(ValueError, match=match):
        archs.ArchOverrides(image_token_ids=ids)


def test_override_ids_beyond_the_vocabulary_are_refused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = am.lora(transformers.LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match=r"^image_token_ids: expected ids in \[0, 50\) \(the model's vocabulary\), got 50"):
        archs.detect_arch(model, archs.ArchOverrides(image_token_ids=range(40, 51)))
    assert archs.detect_arch(model, archs.ArchOverrides(image_token_ids=range(40, 50))).image_token_ids[-1] == 49
