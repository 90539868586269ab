"""The Python blocks of the documentation pages run as written, each on small stand-ins for the
names it takes from the reader's own code (their model, batch, buffers, optimizer): a page's
example cannot rot. README's blocks: tests/test_readme.py. A block without a setup here fails the
test that lists them, so a new block must be given one."""

import os
import sys
import types

import pytest
import torch

import models
from test_readme import LazyOptimizer, python_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "archs"))

import arch_models as am  # noqa: E402

VQ = r"(?:model\.vqmodel)\..*"  # Chameleon's frozen VQ model: no LoRA there (spec.lora_exclude_modules)


def _blocks(page: str) -> list[str]:
    return python_blocks(os.path.join(ROOT, "docs", page))


def _flat_pair(ns: dict, k: int = 2) -> dict:
    """k flat gradient buffers of 6 segments (one empty), their offsets and 3 groups."""
    gen = torch.Generator().manual_seed(k)
    offsets = torch.tensor([0, 40, 40, 100, 130, 200, 260])
    grads = [torch.randn(260, generator=gen) for _ in range(k)]
    ns.update(offsets=offsets, groups=torch.tensor([0, 2, 4, 6]), grads=grads)
    return ns


def _llama_step(ns: dict) -> dict:
    ns.update(base_model=models.tiny_llama(num_layers=5), batch=models.token_batch(seed=1))
    return ns


def _chameleon(ns: dict, exclude=VQ) -> dict:
    ns.update(model=am.lora(am.MODELS["chameleon"](), exclude_modules=exclude), batch=am.chameleon_batch(seed=2))
    return ns


def _downloaded_chameleon(ns: dict) -> dict:
    # The page downloads 7B weights: the tiny random Chameleon instead; its imports stay as written.
    import transformers

    ns["batch"] = am.chameleon_batch(seed=3)
    model = am.MODELS["chameleon"]()  # built before the class is replaced below
    tiny = types.SimpleNamespace(from_pretrained=lambda name: model)
    ns["_patch"] = (transformers, "ChameleonForConditionalGeneration", tiny)
    return ns


def _deeper_chameleon(ns: dict) -> dict:
    """A 5-layer tiny Chameleon, for a block that asks for 5 groups."""
    layers, am.NUM_LAYERS = am.NUM_LAYERS, 5
    try:
        return _chameleon(ns)
    finally:
        am.NUM_LAYERS = layers


def _custom_llm(ns: dict) -> dict:
    # "any other causal LM": a Llama whose vocabulary holds the image ids the page names, with a projector.
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = models.llama_config(4, 32)
    cfg.vocab_size = 40192
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base.model.mm_projector = torch.nn.Linear(32, 32)
    ns["model"] = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear"))
    return ns


def _three_losses(ns: dict) -> dict:
    _chameleon(ns)
    import pareto_lora

    losses = pareto_lora.archs.objective_losses_for(ns["model"], ns["batch"], pareto_lora.archs.detect_arch(ns["model"]))
    ns.update(l_text=losses["text"], l_und=losses["understanding"], l_gen=losses["generation"])
    g = _flat_pair({}, 3)
    ns.update(g_1=g["grads"][0], g_2=g["grads"][1], g_3=g["grads"][2], offsets=g["offsets"], groups=g["groups"])
    return ns


def _study_log(ns: dict) -> dict:
    """A finished study's log in the working directory, and records collected elsewhere."""
    from pareto_lora.study import Study

    def run(method, seed):
        w = method.weight or 3.0
        return {"text": 1.0 + 0.01 * w + 0.003 * seed, "image": 2.0 - 0.05 * w + 0.002 * seed * seed}

    Study(rules=["pareto_lora"], weights=(1, 2, 4), seeds=range(3), log="study.jsonl").run(run)
    ns["records"] = [{"rule": rule, "weight": w, "seed": seed,
                      "metrics": {"text": 1.3 + 0.01 * seed + 0.02 * k, "image": 2.1 - 0.03 * k + 0.001 * seed,
                                  "gen_accuracy": 0.5 + 0.01 * k + 0.002 * seed}}
                     for seed in range(3) for k, (rule, w) in enumerate([(None, 1), (None, 2), ("pareto_lora", None)])]
    return ns


SETUPS = {  # (page, block) -> the reader's names
    ("getting_started.md", 0): lambda ns: ns.update(
        g_text=(p := _flat_pair({}))["grads"][0], g_image=p["grads"][1], offsets=p["offsets"]) or ns,
    ("getting_started.md", 1): _llama_step,
    ("training.md", 0): _llama_step,
    ("models.md", 0): _chameleon,
    ("models.md", 1): _downloaded_chameleon,
    ("models.md", 2): _custom_llm,
    ("objectives.md", 0): lambda ns: ns.update(
        g_text=(p := _flat_pair({}, 3))["grads"][0], g_und=p["grads"][1], g_gen=p["grads"][2], offsets=p["offsets"],
        groups=p["groups"]) or ns,
    ("objectives.md", 1): lambda ns: _flat_pair(ns, 3),
    ("objectives.md", 2): _deeper_chameleon,
    ("rules.md", 0): _three_losses,
    # the reader's run(): its body is theirs ("..."); the metrics it returns stand in here
    ("your_data.md", 0): lambda ns: ns.update(text_val_loss=1.25, image_val_loss=2.5) or ns,
    ("your_data.md", 1): lambda ns: ns.update(Study=__import__("pareto_lora.study", fromlist=["Study"]).Study) or ns,
    ("your_data.md", 2): _study_log,
}
IMPORTS = "import pareto_lora\nimport torch\nfrom peft import LoraConfig, get_peft_model\n"  # what earlier blocks of a page import


def test_every_block_has_a_setup():
    pages = sorted({page for page, _ in SETUPS})
    found = {(page, i) for page in os.listdir(os.path.join(ROOT, "docs")) if page.endswith(".md")
             for i, _ in enumerate(_blocks(page))}
    assert found == set(SETUPS), f"blocks without a setup: {sorted(found - set(SETUPS))}; pages: {pages}"


@pytest.mark.parametrize("page, index", sorted(SETUPS))
def test_block_runs(page, index, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a block may write files (a study's log)
    ns: dict = {}
    ns["optimizer"] = opt = LazyOptimizer(ns)
    SETUPS[page, index](ns)
    if "_patch" in ns:
        monkeypatch.setattr(*ns.pop("_patch"))
    exec(IMPORTS + _blocks(page)[index], ns)
    if "optimizer.step()" in _blocks(page)[index]:
        assert opt.steps == 1
