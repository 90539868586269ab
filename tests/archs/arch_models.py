"""Tiny random Chameleon, Emu3, Janus and LLaVA models with PEFT LoRA, and a training batch for each.

Sizes follow each model's own tester in transformers' tests (tests/models/<name>/
test_modeling_<name>.py): hidden 32, a VQ config with 32 base channels (GroupNorm has 32
groups), small code books. Vocabulary maps are built here the way real checkpoints name their
tokens, since the image-token ids must come from them. Nothing is downloaded.

Every builder returns ``(peft_model, batch)``; ``BUILDERS`` maps an architecture name to it.
Stacks have 4 layers so that ``num_groups=2`` splits them 2 + 2.
"""

from __future__ import annotations

import pytest
import torch

NUM_LAYERS = 4


def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _cls(name: str):
    cls = getattr(_transformers(), name, None)
    if cls is None:
        pytest.skip(f"the installed transformers has no {name}")
    return cls


def lora(model, r: int = 2, seed: int = 0, exclude_modules=None):
    """LoRA on all linear layers; lora_B randomised so that lora_A gets a gradient on step one."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0, exclude_modules=exclude_modules)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model.eval()


# ----------------------------------------------------------------------------------------- Chameleon
CHAMELEON_TEXT = 40  # ids [0, 40) text; 3 is <image>
CHAMELEON_CODES = 16  # ids [40, 56) IMGIMG codes
CHAMELEON_BOI, CHAMELEON_EOI = 56, 57


def _chameleon_code_name(k: int) -> str:
    # ChameleonImageVocabularyMapping: "IMGIMG" + digits spelled A..J + one trailing char.
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z"


def chameleon_vocabulary_map() -> dict[str, int]:
    vm = {f"<t{i}>": i for i in range(CHAMELEON_TEXT) if i != 3}
    vm["<image>"] = 3
    vm.update({_chameleon_code_name(k): CHAMELEON_TEXT + k for k in range(CHAMELEON_CODES)})
    vm["<racm3:break>"], vm["<eoss>"] = CHAMELEON_BOI, CHAMELEON_EOI
    return vm


def tiny_chameleon(seed: int = 0):
    Config, Model = _cls("ChameleonConfig"), _cls("ChameleonForConditionalGeneration")
    torch.manual_seed(seed)
    vq = dict(embed_dim=8, num_embeddings=CHAMELEON_CODES, latent_channels=8, base_channels=32,
              channel_multiplier=[1, 2], resolution=8, attn_resolutions=[])
    cfg = Config(vocab_size=CHAMELEON_EOI + 1, hidden_size=32, intermediate_size=37, num_hidden_layers=NUM_LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, vocabulary_map=chameleon_vocabulary_map(), vq_config=vq)
    return Model(cfg).eval()


def chameleon_batch(seed: int = 0, with_image: bool = True):
    """text, <racm3:break>, 6 image codes, <eoss>, text; one padded tail (-100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, CHAMELEON_TEXT, (2, 16), generator=gen)
    if with_image:
        ids[:, 4] = CHAMELEON_BOI
        ids[:, 5:11] = torch.randint(CHAMELEON_TEXT, CHAMELEON_TEXT + CHAMELEON_CODES, (2, 6), generator=gen)
        ids[:, 11] = CHAMELEON_EOI
    labels = ids.clone()
    labels[1, 14:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------- Emu3
EMU3_VOCAB = 64
EMU3_SPECIAL = {"<image>": 3, "<|extra_200|>": 4, "<|image start|>": 5, "<|image end|>": 6, "<|image token|>": 7,
                "<|extra_201|>": 8}
EMU3_CODES = range(10, 30)  # <|visual token 000000|> .. 000019


def emu3_vocabulary_map() -> dict[str, int]:
    taken = set(EMU3_SPECIAL.values()) | set(EMU3_CODES)
    vm = {f"<t{i}>": i for i in range(EMU3_VOCAB) if i not in taken}
    vm.update(EMU3_SPECIAL)
    vm.update({f"<|visual token {i - EMU3_CODES.start:06d}|>": i for i in EMU3_CODES})
    return vm


def tiny_emu3(seed: int = 0):
    TextConfig, Config, Model = _cls("Emu3TextConfig"), _cls("Emu3Config"), _cls("Emu3ForConditionalGeneration")
    torch.manual_seed(seed)
    text = TextConfig(vocab_size=EMU3_VOCAB, hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=37, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    vq = dict(codebook_size=len(EMU3_CODES), temporal_downsample_factor=1, base_channels=32, channel_multiplier=[1, 2, 1],
              hidden_size=32, attn_resolutions=[])
    return Model(Config(text_config=text, vq_config=vq, vocabulary_map=emu3_vocabulary_map())).eval()


def emu3_batch(seed: int = 0, with_image: bool = True):
    """text, <|image start|> 2*3 <|image token|>, 2 rows of 3 codes + <|extra_200|>, <|extra_201|>, <|image end|>, text."""
    gen = torch.Generator().manual_seed(seed)
    text_ids = [i for i in range(EMU3_VOCAB) if i not in set(EMU3_SPECIAL.values()) | set(EMU3_CODES) and i > 2]
    ids = torch.tensor(text_ids)[torch.randint(0, len(text_ids), (2, 22), generator=gen)]
    if with_image:
        s = EMU3_SPECIAL
        codes = lambda: torch.randint(EMU3_CODES.start, EMU3_CODES.stop, (2, 3), generator=gen)  # noqa: E731
        ids[:, 3] = s["<|image start|>"]
        ids[:, 6] = s["<|image token|>"]  # 4, 5: the "2*3" size prefix stays text
        ids[:, 7:10], ids[:, 10] = codes(), s["<|extra_200|>"]
        ids[:, 11:14], ids[:, 14] = codes(), s["<|extra_200|>"]
        ids[:, 15], ids[:, 16] = s["<|extra_201|>"], s["<|image end|>"]
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------- Janus
JANUS_VOCAB = 99
JANUS_IMAGE_TOKEN = 98  # <image_placeholder> (understanding input)
JANUS_BOI = 97  # <begin_of_image>: a text token that precedes the generated codes
JANUS_CODES = 12  # VQ code book of the generation head


def tiny_janus(seed: int = 0):
    # vq projection_dim must equal the text hidden size: generation_aligner maps code embeddings
    # into the LLM's input space (transformers' own tester uses 10 and never feeds codes back).
    Config, Model = _cls("JanusConfig"), _cls("JanusForConditionalGeneration")
    torch.manual_seed(seed)
    text = {"model_type": "llama", "vocab_size": JANUS_VOCAB, "hidden_size": 32, "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 512, "pad_token_id": 1}
    vision = {"image_size": 20, "patch_size": 5, "num_image_tokens": 16, "num_channels": 3, "hidden_size": 32,
              "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2}
    vq = dict(embed_dim=12, num_embeddings=JANUS_CODES, latent_channels=12, in_channels=3, base_channels=32,
              channel_multiplier=[1, 1], projection_dim=32, image_token_embed_dim=32)
    return Model(Config(text_config=text, vision_config=vision, vq_config=vq, image_token_id=JANUS_IMAGE_TOKEN)).eval()


def janus_batch(seed: int = 0, with_image: bool = True):
    """Text-to-image: prompt, <begin_of_image>, 8 generated VQ codes (image_codes), text."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, JANUS_BOI, (2, 16), generator=gen)
    codes = torch.full_like(ids, -100)
    if with_image:
        ids[:, 4] = JANUS_BOI
        codes[:, 5:13] = torch.randint(0, JANUS_CODES, (2, 8), generator=gen)
        ids[:, 5:13] = 0  # not embedded: image positions take generation_embeddings(code)
    labels = ids.clone()
    return {"input_ids": ids, "labels": labels, "image_codes": codes, "attention_mask": torch.ones_like(ids)}


# ----------------------------------------------------------------------------------------- LLaVA
LLAVA_VOCAB = 81
LLAVA_IMAGE_TOKEN = 80
LLAVA_PATCHES = 4  # 16x16 image, 8x8 patches, CLS dropped


def tiny_llava(seed: int = 0):
    Config, Model = _cls("LlavaConfig"), _cls("LlavaForConditionalGeneration")
    tf = _transformers()
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=16, patch_size=8)
    text = tf.LlamaConfig(vocab_size=LLAVA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = Config(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
                 projector_hidden_act="gelu", vision_feature_layer=-1)
    return Model(cfg).eval()


def llava_batch(seed: int = 0, with_image: bool = True):
    """Sample 0: text, 4 <image> placeholders (one image), answer text; sample 1: text only."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAVA_IMAGE_TOKEN, (2, 16), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if with_image:
        ids[0, 4 : 4 + LLAVA_PATCHES] = LLAVA_IMAGE_TOKEN
        batch["pixel_values"] = torch.randn(1, 3, 16, 16, generator=gen)
    labels = ids.clone()
    labels[labels == LLAVA_IMAGE_TOKEN] = -100
    batch["labels"] = labels
    return batch


MODELS = {"chameleon": tiny_chameleon, "emu3": tiny_emu3, "janus": tiny_janus, "llava": tiny_llava}
ARCHS = tuple(MODELS)
BATCHES = {"chameleon": chameleon_batch, "emu3": emu3_batch, "janus": janus_batch, "llava": llava_batch}


def example(name: str, i: int) -> dict:
    """One training example (a dataset item): row i % 2 of the architecture's batch with seed 100 + i."""
    return {k: v[i % 2] for k, v in BATCHES[name](seed=100 + i).items()}
