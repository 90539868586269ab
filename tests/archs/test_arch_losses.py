"""modality_losses_for: each architecture's (text, image) losses, checked against cross-entropy by hand."""

import pytest
import torch
import torch.nn.functional as F

import arch_models as am
import pareto_lora
from arch_models import ARCHS
from pareto_lora import archs


def _ce(logits, targets, mask):
    """Token-mean cross-entropy of next-token prediction at the targets where mask (aligned with targets)."""
    m = mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][m].float(), targets[:, 1:][m])


def _inputs(batch):
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}


def test_chameleon_forward_masks_image_logits_and_the_image_loss_explodes(lora_model):
    model = lora_model("chameleon")
    batch = am.chameleon_batch(seed=1)
    mask = archs.image_token_mask(model, batch)
    with torch.no_grad():
        masked = model(**_inputs(batch)).logits
        hidden = model.get_base_model().model(**_inputs(batch)).last_hidden_state
        unmasked = model.get_base_model().lm_head(hidden)
    codes = list(range(am.CHAMELEON_TEXT, am.CHAMELEON_TEXT + am.CHAMELEON_CODES))
    assert (masked[..., codes] == torch.finfo(masked.dtype).min).all()
    others = [i for i in range(masked.shape[-1]) if i not in codes]
    torch.testing.assert_close(masked[..., others], unmasked[..., others])  # the mask is the only difference
    per_token = F.cross_entropy(masked[:, :-1].reshape(-1, masked.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                reduction="none").view(2, -1)
    code_targets = torch.isin(batch["labels"][:, 1:], torch.tensor(codes))
    assert (per_token[code_targets] > 3e38).all()  # -finfo(float32).min = 3.4e38 per image token
    _, image_from_logits = pareto_lora.modality_losses(masked, batch["labels"], image_token_mask=mask)
    assert torch.isinf(image_from_logits)  # the sum of two such terms overflows float32


def test_chameleon_image_loss_is_the_unmasked_cross_entropy(lora_model):
    model = lora_model("chameleon")
    batch = am.chameleon_batch(seed=2)
    text, image = archs.modality_losses_for(model, batch)
    base = model.get_base_model()
    logits = base.lm_head(base.model(**_inputs(batch)).last_hidden_state)  # by hand: no mask
    labels = batch["labels"]
    mask = archs.image_token_mask(model, batch)
    valid = (labels != -100) & (labels != 3)
    assert mask.sum() == 2 * 8 and torch.isfinite(image) and 0 < image.item() < 20
    torch.testing.assert_close(image, _ce(logits, labels, mask))
    torch.testing.assert_close(text, _ce(logits, labels, valid & ~mask))
    # the same as the package's logits-level split on the unmasked logits
    torch.testing.assert_close((text, image), pareto_lora.modality_losses(logits, labels, image_token_mask=mask))


def test_chameleon_image_gradient_reaches_every_lora_layer(lora_model):
    model = lora_model("chameleon")
    _, image = archs.modality_losses_for(model, am.chameleon_batch(seed=3))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(image, params)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_emu3_losses_match_the_model_logits(lora_model):
    # Emu3's forward does not mask: its logits give the same losses as the hidden-state path.
    model = lora_model("emu3")
    batch = am.emu3_batch(seed=1)
    mask = archs.image_token_mask(model, batch)
    spec = archs.detect_arch(model)
    assert torch.equal(mask, torch.isin(batch["labels"], torch.tensor(spec.image_token_ids)))
    # <|image start|>, <|image token|>, codes + row ends, <|extra_201|>, <|image end|>; the "2*3" size stays text
    assert mask[:, 3].all() and mask[:, 6:17].all()
    assert not mask[:, :3].any() and not mask[:, 4:6].any() and not mask[:, 17:].any()
    expected = pareto_lora.modality_losses(model(**_inputs(batch)).logits, batch["labels"], image_token_mask=mask)
    torch.testing.assert_close(archs.modality_losses_for(model, batch, spec), expected)


def test_janus_image_loss_is_the_generation_head_cross_entropy(lora_model):
    model = lora_model("janus")
    batch = am.janus_batch(seed=1)
    text, image = archs.modality_losses_for(model, batch)
    base = model.get_base_model()
    codes, ids = batch["image_codes"], batch["input_ids"]
    is_code = codes != -100
    with torch.no_grad():  # lm_head cannot score image codes at all: its vocabulary is the text one
        assert model(**_inputs(batch)).logits.shape[-1] == am.JANUS_VOCAB != am.JANUS_CODES
    # by hand: codes enter through generation_embeddings -> generation_aligner, text through embed_tokens
    embeds = base.get_input_embeddings()(ids).clone()
    embeds[is_code] = base.model.generation_aligner(base.model.generation_embeddings(codes[is_code]))
    hidden = base.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(image, _ce(base.model.generation_head(hidden), codes, is_code))
    torch.testing.assert_close(text, _ce(base.lm_head(hidden), batch["labels"], ~is_code))
    assert archs.modality_token_counts_for(model, batch) == (2 * 7, 2 * 8)  # 15 targets - 8 codes; 8 codes
    # the generation head's LoRA is trained by the image loss only
    head = [p for n, p in model.named_parameters() if ".generation_head." in n and "lora_" in n]
    assert len(head) == 4
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(image, head, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(text, head, allow_unused=True))


def test_janus_understanding_image_and_generated_codes_in_one_batch(lora_model):
    model = lora_model("janus")
    batch = am.janus_batch(seed=2)
    num_patches = 16  # (image_size 20 / patch_size 5) ** 2
    ids = torch.cat([torch.full((2, num_patches), am.JANUS_IMAGE_TOKEN), batch["input_ids"]], 1)
    grown = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "image_codes": torch.cat([torch.full((2, num_patches), -100), batch["image_codes"]], 1),
             "pixel_values": torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))}
    text, image = archs.modality_losses_for(model, grown)
    assert torch.isfinite(text) and torch.isfinite(image)
    # the placeholders are inputs only: neither loss counts them as targets (the prompt's first
    # token, now predicted from the last placeholder, is one more text target per sample)
    assert archs.modality_token_counts_for(model, grown) == (2 * 8, 2 * 8)
    with_image = archs.modality_losses_for(model, grown)[1]
    grown["pixel_values"] = grown["pixel_values"] * 2
    assert not torch.equal(with_image, archs.modality_losses_for(model, grown)[1])  # the image input is used


def test_llava_image_loss_is_the_image_conditioned_text_loss(lora_model):
    model = lora_model("llava")
    batch = am.llava_batch(seed=1)
    mask = archs.image_token_mask(model, batch)
    # sample 0: targets after the 4 placeholders (positions 4..7); sample 1 has no image
    expected_mask = torch.zeros_like(mask)
    expected_mask[0, 8:] = True
    assert torch.equal(mask, expected_mask)
    logits = model(**_inputs(batch)).logits
    expected = pareto_lora.modality_losses(logits, batch["labels"], image_token_mask=mask)
    torch.testing.assert_close(archs.modality_losses_for(model, batch), expected)


def test_user_image_token_mask_overrides_the_split(lora_model):
    model = lora_model("llava")
    batch = am.llava_batch(seed=2)
    user = torch.zeros_like(batch["labels"], dtype=torch.bool)
    user[:, 12:] = True
    batch["image_token_mask"] = user
    assert torch.equal(archs.image_token_mask(model, batch), user & (batch["labels"] != -100))
    logits = model(**_inputs(batch)).logits
    expected = pareto_lora.modality_losses(logits, batch["labels"], image_token_mask=user)
    torch.testing.assert_close(archs.modality_losses_for(model, batch), expected)
    with pytest.raises(ValueError, match="image_token_mask: expected shape"):
        archs.modality_losses_for(model, {**batch, "image_token_mask": user[:, :3]})


@pytest.mark.parametrize("name", ARCHS)
def test_text_only_batch_gives_a_zero_image_loss_that_requires_grad(lora_model, name):
    model = lora_model(name)
    text, image = archs.modality_losses_for(model, am.BATCHES[name](with_image=False))
    assert image.item() == 0.0 and image.requires_grad and text.item() > 0
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(image, params, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("name", ARCHS)
def test_num_items_divides_the_sums(lora_model, name):
    model = lora_model(name)
    batch = am.BATCHES[name](seed=4)
    n_text, n_image = archs.modality_token_counts_for(model, batch)
    text, image = archs.modality_losses_for(model, batch)
    t2, i2 = archs.modality_losses_for(model, batch, num_items=(2 * n_text, 4 * n_image))
    torch.testing.assert_close((t2, i2), (text / 2, image / 4))


def _fake_ddp(module):
    # An unconstructed DistributedDataParallel holding `module`: enough for isinstance and .module
    # (a real one needs a process group; tests/distributed runs real ones).
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(ddp)
    ddp.module = module
    return ddp


def test_a_ddp_wrapper_gets_the_spec_of_the_model_inside_it(lora_model):
    # One spec serves the wrapper, the model inside and ParetoLoRA (which lays out ddp.module).
    model = lora_model("chameleon")
    assert archs.detect_arch(_fake_ddp(model)) == archs.detect_arch(model)
    with pytest.raises(ValueError, match="bypasses DistributedDataParallel.forward"):
        archs.forward.backbone_hidden_states(_fake_ddp(model), am.chameleon_batch(), archs.detect_arch(model))
