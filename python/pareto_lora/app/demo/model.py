"""The demo's model: a small random-init LlamaForCausalLM over the shared text+image vocabulary.

Nothing is downloaded. base.py pre-trains the base on the *pre-training* world until it solves
that world's images (token layout, story format, text-to-image binding) and caches it; here it is
built and, per run, wrapped with peft LoRA for fine-tuning on a different world.
May import: nothing from the package.
"""

from __future__ import annotations

import copy
import dataclasses

import torch


__all__ = ["ModelConfig", "build_base_model", "attach_lora", "token_losses"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 128
    lora_rank: int = 8
    lora_alpha: int = 16


def build_base_model(cfg: ModelConfig, vocab_size: int, max_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # transformers initialises from the global generator
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


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] next-token cross-entropy (0 where the label is -100), in float32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return loss.view(shift_labels.shape)


def attach_lora(base_model, cfg: ModelConfig, seed: int):
    """A deep copy of `base_model` with LoRA on every linear layer of the transformer blocks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A-matrix init
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(copy.deepcopy(base_model), lora)
