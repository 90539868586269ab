"""The demo's models: the Llama with image tokens and the small random Chameleon (``--arch chameleon``)."""

import pytest
import torch

from pareto_lora.app.demo import data
from pareto_lora.app.demo.model import ModelConfig, attach_lora, build_base_model, chameleon_vocabulary_map, logits_of

TINY = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, lora_rank=2)


def _batch():
    return data.sample_batch(data.make_world(2), 2, torch.Generator().manual_seed(0))


def test_chameleon_vocabulary_map_names_the_demo_image_codes():
    pytest.importorskip("transformers")
    from pareto_lora.archs.vocab import chameleon_image_ids

    v = data.Vocab()
    vm = chameleon_vocabulary_map(v)
    ids = set(chameleon_image_ids(vm))
    codes = set(range(v.image_base, v.size))
    assert ids == codes | {v.BOI, v.EOI}  # Chameleon counts its image markers as image tokens too
    assert vm["<image>"] == v.size  # the input placeholder is an extra id no sequence contains
    assert len(set(vm.values())) == len(vm) == v.size + 1


def test_chameleon_logits_are_the_unmasked_lm_head():
    v = data.Vocab()
    batch = _batch()
    model = build_base_model(ModelConfig(arch="chameleon", **TINY), v.size, batch.input_ids.shape[1], 0, vocab=v)
    model.eval()
    masked = model(**batch.model_inputs()).logits
    ours = logits_of(model, batch.model_inputs())
    assert ours.shape == (2, batch.input_ids.shape[1], v.size + 1)
    image_cols = list(range(v.image_base, v.size))
    assert (masked[..., image_cols] <= torch.finfo(masked.dtype).min / 2).all()  # the model's own forward hides them
    assert torch.isfinite(ours).all() and ours[..., image_cols].abs().max() < 100
    text_cols = list(range(v.image_base))
    torch.testing.assert_close(ours[..., text_cols], masked[..., text_cols])  # same head, only the mask differs
    peft_model = attach_lora(model, ModelConfig(arch="chameleon", **TINY), 0)
    torch.testing.assert_close(logits_of(peft_model, batch.model_inputs()), ours)  # LoRA B = 0 at init
    assert not any("vqmodel" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_llama_logits_are_the_model_output():
    v = data.Vocab()
    batch = _batch()
    model = build_base_model(ModelConfig(**TINY), v.size, batch.input_ids.shape[1], 0).eval()
    torch.testing.assert_close(logits_of(model, batch.model_inputs()), model(**batch.model_inputs()).logits)


def test_unknown_arch_and_chameleon_without_vocab_are_refused():
    with pytest.raises(ValueError, match="arch"):
        build_base_model(ModelConfig(arch="gpt2", **TINY), 10, 8, 0)
    with pytest.raises(ValueError, match="vocab"):
        build_base_model(ModelConfig(arch="chameleon", **TINY), 10, 8, 0)
