"""Shared fixtures of the architecture tests: one LoRA model per architecture for the session.

Building a model takes a fraction of a second, but the tests only read the weights (no
optimizer step), so sharing them keeps the whole folder fast on a small CPU machine.
"""

import pytest

import arch_models
from pareto_lora import archs


@pytest.fixture(scope="session")
def lora_model():
    """(name, exclude_frozen=False) -> the architecture's tiny random model with LoRA on all linear
    layers (cached); ``exclude_frozen``: built with ``exclude_modules=spec.lora_exclude_modules``
    (no LoRA in a frozen VQ tokenizer: what ``ParetoLoRA(arch=...)`` needs for Emu3)."""
    cache = {}

    def get(name: str, exclude_frozen: bool = False):
        if (name, exclude_frozen) not in cache:
            base = arch_models.MODELS[name]()
            exclude = archs.detect_arch(base).lora_exclude_modules if exclude_frozen else None
            cache[name, exclude_frozen] = arch_models.lora(base, exclude_modules=exclude)
        return cache[name, exclude_frozen]

    return get
