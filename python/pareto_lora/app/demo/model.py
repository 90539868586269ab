"""The demo's model: a small random-init causal LM over the shared text+image vocabulary.

Two architectures (``ModelConfig.arch``), both random-init, nothing downloaded:

* ``"llama"`` (default): ``LlamaForCausalLM`` with the image codes as extra vocabulary entries;
* ``"chameleon"``: ``ChameleonForConditionalGeneration`` (qk-norm attention, a VQ image tokenizer
  that the token-level task does not use and LoRA does not touch) whose ``vocabulary_map`` names
  the demo's image codes ``IMGIMG*`` and its ``<boi>`` / ``<eoi>`` ``<racm3:break>`` / ``<eoss>``,
  as a real Chameleon checkpoint does. Its own ``forward`` sets every image-code logit to the
  float minimum (it generates text only), so :func:`logits_of` reads the unmasked LM head over
  the backbone's hidden states (:mod:`pareto_lora.archs`), as Chameleon's image generation does.

base.py pre-trains the base on the *pre-training* world until it solves that world's images and
caches it; here it is built and, per run, wrapped with peft LoRA for fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref

import torch


__all__ = ["ARCHS", "ModelConfig", "build_base_model", "attach_lora", "token_losses", "logits_of",
           "chameleon_vocabulary_map"]

ARCHS = ("llama", "chameleon")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 128
    lora_rank: int = 8
    lora_alpha: int = 16
    arch: str = "llama"  # one of ARCHS


def chameleon_vocabulary_map(vocab) -> dict[str, int]:
    """Token name -> id for a Chameleon config over the demo's `vocab` (a data.Vocab).

    Text words and specials are ``<t{id}>``, image code k is ``IMGIMG`` + k spelled in letters
    A..J + ``Z`` (the checkpoint's naming), <boi>/<eoi> are ``<racm3:break>``/``<eoss>``, and the
    ``<image>`` input placeholder (never a target) gets one extra id that no sequence contains.
    """
    def code_name(k: int) -> str:
        return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z"

    vm = {f"<t{i}>": i for i in range(vocab.image_base) if i not in (vocab.BOI, vocab.EOI)}
    vm["<racm3:break>"], vm["<eoss>"] = vocab.BOI, vocab.EOI
    vm.update({code_name(k): vocab.image_base + k for k in range(vocab.num_image_codes)})
    vm["<image>"] = vocab.size
    return vm


def _chameleon(cfg: ModelConfig, vocab, max_len: int):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vq = dict(embed_dim=8, num_embeddings=vocab.num_image_codes, latent_channels=8, base_channels=32,
              channel_multiplier=[1, 2], resolution=8, attn_resolutions=[])  # tiny: never run (token-level task)
    config = ChameleonConfig(
        vocab_size=vocab.size + 1, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max_len, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vocabulary_map=chameleon_vocabulary_map(vocab), vq_config=vq,
    )
    config._attn_implementation = "sdpa"
    return ChameleonForConditionalGeneration(config)


def build_base_model(cfg: ModelConfig, vocab_size: int, max_len: int, seed: int, vocab=None):
    """The random-init base of `cfg.arch` (`vocab`, a data.Vocab, is needed for Chameleon's vocabulary map)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    torch.manual_seed(seed)  # transformers initialises from the global generator
    if cfg.arch == "chameleon":
        if vocab is None or vocab.size != vocab_size:
            raise ValueError("vocab: Chameleon needs the demo's Vocab (its vocabulary map names the image codes)")
        return _chameleon(cfg, vocab, max_len)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def logits_of(model, inputs: dict) -> torch.Tensor:
    """[B, T, V] next-token logits over the whole vocabulary, image codes included.

    Llama: ``model(**inputs).logits``. Chameleon: the LM head on the backbone's final hidden
    states (``pareto_lora.archs``), because ``model(**inputs).logits`` masks the image codes.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "chameleon":
        return model(**inputs).logits
    from pareto_lora.archs import detect_arch
    from pareto_lora.archs.forward import backbone_hidden_states, module_at
    from pareto_lora.archs.spec import inner_module

    spec = _SPECS.get(model)
    if spec is None:
        spec = _SPECS[model] = detect_arch(model)
    hidden = backbone_hidden_states(model, inputs, spec)
    return module_at(inner_module(model), spec.text_head)(hidden)


_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its ArchSpec (detected once)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] next-token cross-entropy (0 where the label is -100), in float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return loss.view(shift_labels.shape)


def attach_lora(base_model, cfg: ModelConfig, seed: int):
    """A deep copy of `base_model` with LoRA on every linear layer of the transformer blocks
    (Chameleon: the VQ tokenizer has only convolutions, so all-linear adds nothing there)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A-matrix init
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    with warnings.catch_warnings():
        # peft asks transformers 5 a deprecated question (`is_gradient_checkpointing`) each time it
        # wraps a model: a FutureWarning of peft's, once per run, that no user of the demo can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(copy.deepcopy(base_model), lora)
