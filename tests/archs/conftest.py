"""Shared fixtures of the architecture tests: one LoRA model per architecture for the session.

Building a model takes a fraction of a second, but the tests only read the weights (no
optimizer step), so sharing them keeps the whole folder fast on a small CPU machine.
"""

import pytest

import arch_models


@pytest.fixture(scope="session")
def lora_model():
    """name -> the architecture's tiny random model with LoRA on all linear layers (cached)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = arch_models.lora(arch_models.MODELS[name]())
        return cache[name]

    return get
