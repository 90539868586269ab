"""Which parameters of a model are LoRA parameters, and which transformer layer each belongs to.

Reads PEFT parameter names and the model's module tree; knows nothing of buffers or rules.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["is_lora_param", "find_layer_stack", "layer_of"]

# PEFT names: lora_A / lora_B (linear), lora_embedding_A / _B (embedding), lora_magnitude_vector (DoRA).
_LORA_PART = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
# Attribute names of the decoder-layer ModuleList across families: Llama/Mistral/Qwen2/Chameleon
# and LLaVA's language model use ``layers``, GPT-2 ``h``, some others ``blocks`` / ``layer``.
_STACK_NAMES = ("layers", "h", "blocks", "layer")
# Prefer these when a model has several stacks (a VLM's vision tower has ``layers`` too).
_LANGUAGE_HINTS = ("language_model", "text_model", "llm", "decoder")


def is_lora_param(name: str) -> bool:
    """True for PEFT LoRA parameters (lora_A/B, lora_embedding_A/B, DoRA magnitude)."""
    return _LORA_PART.search(name) is not None


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _stack_in(module: nn.Module) -> nn.ModuleList | None:
    """The shallowest ModuleList named like a layer stack inside `module`."""
    best = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 0 and name.rsplit(".", 1)[-1] in _STACK_NAMES:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, sub)
    return None if best is None else best[1]


def find_layer_stack(model: nn.Module, layers_path: str | None = None) -> tuple[str, int]:
    """(qualified name of the decoder-layer ModuleList inside `model`, number of layers).

    ``layers_path`` (a module name as in ``model.named_modules()``) overrides the search.
    Otherwise: the stack inside the transformers ``get_decoder()`` module when the model has
    one (this skips a VLM's vision tower), else the only stack-named ModuleList holding LoRA
    parameters, preferring a language-model path when there are several.
    """
    modules = dict(model.named_modules())
    if layers_path is not None:
        stack = modules.get(layers_path)
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"layers_path: {layers_path!r} is not a ModuleList of model (names as in named_modules())")
        return layers_path, len(stack)

    names_by_id = {id(m): n for n, m in modules.items()}
    get_decoder = getattr(_unwrap(model), "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            decoder = None
        stack = _stack_in(decoder) if isinstance(decoder, nn.Module) else None
        if stack is not None and id(stack) in names_by_id:
            return names_by_id[id(stack)], len(stack)

    lora_names = [n for n, _ in model.named_parameters() if is_lora_param(n)]
    candidates = [
        n
        for n, m in modules.items()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and n.rsplit(".", 1)[-1] in _STACK_NAMES
        and any(p.startswith(n + ".") for p in lora_names)
    ]
    if len(candidates) > 1:
        hinted = [n for n in candidates if any(h in n for h in _LANGUAGE_HINTS)]
        candidates = hinted if len(hinted) == 1 else candidates
    if len(candidates) != 1:
        found = ", ".join(candidates) or "none"
        raise ValueError(
            f"layers_path: cannot tell which ModuleList is the transformer layer stack (candidates: {found}); "
            "pass layers_path='<module name>'"
        )
    return candidates[0], len(modules[candidates[0]])


def layer_of(name: str, stack_prefix: str) -> int | None:
    """Layer index of parameter `name` in the stack whose name plus "." is `stack_prefix`, else None."""
    if not name.startswith(stack_prefix):
        return None
    head = name[len(stack_prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None
