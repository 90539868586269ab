"""The library installs apart from its experiment: without the `demo` extra (matplotlib, tqdm,
scikit-learn) and without transformers/peft/triton, `import pareto_lora` works and a ParetoLoRA
training step runs; the demo and the benchmark command then say in one line which extra to install.

Each check runs in a fresh interpreter whose meta-path finder makes those imports fail, as in an
install made by `pip install -e .` alone (torch.hub's optional tqdm import falls back by itself).
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("matplotlib", "tqdm", "sklearn", "transformers", "peft", "accelerate", "triton")

BLOCKER = textwrap.dedent(f"""
    import sys

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())
""")

STEP = textwrap.dedent("""
    import sys
    import torch
    from torch import nn
    import pareto_lora

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(8, 8)
            self.lora_A = nn.Linear(8, 2, bias=False)
            self.lora_B = nn.Linear(2, 8, bias=False)
            self.base.requires_grad_(False)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    torch.manual_seed(0)
    model, x = Model(), torch.randn(16, 8)
    lora = [p for p in model.parameters() if p.requires_grad]

    def losses():
        y = model(x)
        return y[:, :4].pow(2).mean(), (y[:, 4:] - 1).pow(2).mean()

    text, image = losses()
    expected = [a + b for a, b in zip(torch.autograd.grad(text, lora, retain_graph=True), torch.autograd.grad(image, lora))]
    text, image = losses()
    report = pareto_lora.ParetoLoRA(model, rule="sum", num_groups=2).backward(text=text, image=image)
    assert all(torch.allclose(p.grad, e, rtol=1e-5, atol=1e-7) for p, e in zip(lora, expected)), "sum != g_text + g_image"

    for p in lora:
        p.grad = None
    text, image = losses()
    report = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=2, modulate="all").backward(text=text, image=image)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert len(report.groups) == 2, report.groups
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
    assert not loaded, loaded
    print("step ok")
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")}
    return subprocess.run([sys.executable, "-c", BLOCKER + f"\nBLOCKED = {BLOCKED!r}\n" + code],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_library_imports_and_trains_without_the_extras():
    res = _run(STEP)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "step ok"


def test_the_blocker_blocks():
    # The checks above must be able to fail: the blocked modules really do not import.
    res = _run("import matplotlib")
    assert res.returncode == 1 and "blocked by the test" in res.stderr


@pytest.mark.parametrize("argv, command, missing", [
    (["demo", "--quick"], "demo", "matplotlib, tqdm"),
    (["bench"], "bench", "tqdm"),
])
def test_the_command_names_the_extra_to_install(argv, command, missing):
    res = _run(f"from pareto_lora.app.cli import main\nsys.exit(main({argv!r}))")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"pareto-lora {command}: expected {missing} installed (the 'demo' extra): "
                     'pip install --no-build-isolation -e ".[demo]"'], res.stderr
    assert res.stdout == ""


def test_plotting_names_the_missing_package(tmp_path):
    res = _run(STEP + f"pareto_lora.diagnostics.plot_all([{{'step': 0, **report.to_record()}}], {str(tmp_path)!r})")
    assert res.returncode == 1 and res.stdout.strip() == "step ok"
    assert "ModuleNotFoundError: matplotlib: expected it installed to draw plots" in res.stderr
