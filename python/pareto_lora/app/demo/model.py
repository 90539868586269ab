"""The demo's model: a small random-init LlamaForCausalLM over the shared text+image vocabulary.

Nothing is downloaded. The base model is pre-trained for a few hundred full-parameter steps on
the *pre-training* world (so it knows the token layout, the story format and a first
text-to-image binding), then frozen and wrapped with peft LoRA for fine-tuning on a different
world. The pre-trained weights are kept in memory and every rule starts from the same copy.
May import: :mod:`.data`.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .data import World, sample_batch

__all__ = ["ModelConfig", "build_base_model", "pretrain", "attach_lora", "token_losses"]


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


def pretrain(model, world: World, steps: int, batch_size: int, lr: float, seed: int, device, progress=None):
    """Full-parameter next-token training on `world` (both modalities, one summed loss)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = sample_batch(world, batch_size, gen).to(device)
        logits = model(**batch.model_inputs()).logits
        per_tok = token_losses(logits, batch.labels)
        loss = per_tok.sum() / (batch.labels[:, 1:] != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(1)
    model.eval()
    return model


def attach_lora(base_model, cfg: ModelConfig, seed: int):
    """A deep copy of `base_model` with LoRA on every linear layer of the transformer blocks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A-matrix init
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(copy.deepcopy(base_model), lora)
