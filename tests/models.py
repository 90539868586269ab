"""Tiny real transformers architectures with random weights and PEFT LoRA, plus batches for them.

No downloads: every model is built from a config. Shared by the training, distributed and demo
tests. Vocabularies are split Emu3/Chameleon style: ids [0, TEXT_VOCAB) are text,
[TEXT_VOCAB, TEXT_VOCAB + IMAGE_VOCAB) are discrete image tokens (IMAGE_RANGE).
"""

from __future__ import annotations

import torch

TEXT_VOCAB = 48
IMAGE_VOCAB = 32
IMAGE_RANGE = (TEXT_VOCAB, TEXT_VOCAB + IMAGE_VOCAB)
VOCAB = TEXT_VOCAB + IMAGE_VOCAB + 1  # + LLaVA's <image> placeholder (last id)
LLAVA_IMAGE_TOKEN = VOCAB - 1
LLAVA_PATCHES = 4  # 16x16 image, 8x8 patches, CLS dropped


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


def llama_config(num_layers: int = 5, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def tiny_llama(num_layers: int = 5, hidden: int = 32, seed: int = 0):
    """LlamaForCausalLM whose vocabulary has a range of discrete image tokens (IMAGE_RANGE)."""
    from transformers import LlamaForCausalLM

    _quiet()
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(num_layers, hidden)).eval()


def lora_llama(num_layers: int = 5, hidden: int = 32, r: int = 4, seed: int = 0, use_dora: bool = False,
               modules_to_save=None, dtype: torch.dtype | None = None):
    """tiny_llama wrapped with LoRA on all linear layers; lora_B is randomised so both factors get gradients."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(num_layers, hidden, seed)
    if dtype is not None:
        model = model.to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=use_dora,
                     modules_to_save=modules_to_save, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    _randomise_lora_b(peft_model, seed)
    return peft_model


def tiny_llava(seed: int = 0):
    """LlavaForConditionalGeneration: tiny CLIP vision tower + projector + tiny Llama (3 layers)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    _quiet()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=llama_config(num_layers=3), image_token_index=LLAVA_IMAGE_TOKEN,
                      projector_hidden_act="gelu", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def lora_llava(r: int = 4, seed: int = 0):
    """tiny_llava with LoRA on the language layers' attention/MLP and on the multi-modal projector."""
    from peft import LoraConfig, get_peft_model

    target = r".*(language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|multi_modal_projector\.linear_\d)"
    peft_model = get_peft_model(tiny_llava(seed), LoraConfig(r=r, lora_alpha=2 * r, target_modules=target, lora_dropout=0.0))
    _randomise_lora_b(peft_model, seed)
    return peft_model


def _randomise_lora_b(model, seed: int) -> None:
    # PEFT initialises lora_B to zero, which makes every lora_A gradient zero on the first step;
    # tests want non-trivial gradients in every parameter.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def token_batch(batch: int = 2, seq: int = 24, seed: int = 0, image_span: tuple[int, int] | None = (6, 16)):
    """Interleaved text/image-token sequences for tiny_llama.

    Returns input_ids, labels (= input_ids), image_token_mask (aligned with labels).
    ``image_span=None`` gives a text-only batch; ``(start, end)`` puts image tokens there.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_VOCAB, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    if image_span is not None:
        s, e = image_span
        ids[:, s:e] = torch.randint(IMAGE_RANGE[0], IMAGE_RANGE[1], (batch, e - s), generator=gen)
        mask[:, s:e] = True
    return {"input_ids": ids, "labels": ids.clone(), "image_token_mask": mask}


def llava_batch(batch: int = 2, seq: int = 24, seed: int = 0):
    """tiny_llava batch: an input image (placeholders + pixel_values) and discrete image-token targets."""
    out = token_batch(batch, seq, seed, image_span=(10, 18))
    gen = torch.Generator().manual_seed(seed + 7)
    out["input_ids"][:, 1 : 1 + LLAVA_PATCHES] = LLAVA_IMAGE_TOKEN
    out["labels"] = out["input_ids"].clone()
    out["labels"][:, 1 : 1 + LLAVA_PATCHES] = -100
    out["pixel_values"] = torch.randn(batch, 3, 16, 16, generator=gen)
    return out


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that the model's forward takes."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "pixel_values", "attention_mask")}
