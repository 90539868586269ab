"""README's Python blocks run as written (on tiny random models instead of downloads), and the
op example it points to (examples/quickstart.py) runs: the front page cannot rot.

The blocks run in order in one namespace, as a reader would paste them. Names a block takes from
the reader's own code (``base_model``, ``batch``, ``optimizer``, the model class it downloads) are
bound to small stand-ins first."""

import os
import re
import subprocess
import sys
import types

import torch

import models

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "archs"))

import arch_models as am  # noqa: E402


def python_blocks(path: str) -> list[str]:
    """The ```python blocks of a Markdown file, in order (also tests/test_docs_examples.py's)."""
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def _blocks() -> list[str]:
    return python_blocks(os.path.join(ROOT, "README.md"))


class LazyOptimizer:
    """``optimizer`` of the blocks: AdamW over the trainable parameters of whatever ``model`` is now."""

    def __init__(self, ns: dict):
        self.ns, self.steps = ns, 0

    def _params(self):
        return [p for p in self.ns["model"].parameters() if p.requires_grad]

    def step(self):
        before = [p.detach().clone() for p in self._params()]
        torch.optim.AdamW(self._params(), lr=1e-3).step()
        assert any(not torch.equal(b, p) for b, p in zip(before, self._params())), "the step changed nothing"
        self.steps += 1

    def zero_grad(self):
        for p in self._params():
            p.grad = None


def test_readme_has_the_blocks_this_test_knows():
    firsts = [b.splitlines()[0] for b in _blocks()]
    assert firsts == ["import pareto_lora", 'pl = pareto_lora.ParetoLoRA(model, rule="upgrad", arch="auto", '
                      'objectives=pareto_lora.archs.OBJECTIVES)',
                      'model = get_peft_model(ChameleonForConditionalGeneration.from_pretrained("leloy/Anole-7b-v0.1-hf"),'], \
        "README's Python blocks changed: update tests/test_readme.py's stand-ins"


def test_readme_python_blocks_run_in_order():
    quick, k_objectives, models_block = _blocks()
    ns: dict = {"base_model": models.tiny_llama(num_layers=5), "batch": models.token_batch(seed=1)}
    ns["optimizer"] = opt = LazyOptimizer(ns)
    exec(quick, ns)  # the quick start: a Llama with image tokens in its vocabulary
    assert opt.steps == 1 and ns["report"].groups

    # More than two objectives: the block takes the reader's unified model and a mixed batch.
    ns["model"] = am.lora(am.MODELS["chameleon"](), exclude_modules=r"(?:model\.vqmodel)\..*")
    ns["batch"] = am.chameleon_batch(seed=2)  # text, an image (generation), then text after it (understanding)
    exec(k_objectives, ns)
    assert set(ns["report"].losses) == {"text", "understanding", "generation"}

    # Supported models: from_pretrained downloads 7B weights; the tiny random Chameleon instead.
    ns["ChameleonForConditionalGeneration"] = types.SimpleNamespace(from_pretrained=lambda name: am.MODELS["chameleon"]())
    ns["batch"] = am.chameleon_batch(seed=3)
    exec(models_block, ns)
    assert opt.steps == 2 and ns["pl"].arch is not None


def test_quickstart_example_runs():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"^group\s+\|g_text\|", run.stdout, re.M), run.stdout[-2000:]
