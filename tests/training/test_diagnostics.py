"""Diagnostics recorder (JSONL) and plots (valid PNG files)."""

import math

import matplotlib.image
import pytest
import torch

import pareto_lora
from pareto_lora import diagnostics

import models


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    model = models.lora_llama(num_layers=4)
    pl = pareto_lora.ParetoLoRA(model, num_groups=2, modulate="lower")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    path = tmp_path_factory.mktemp("diag") / "sub" / "diag.jsonl"
    with diagnostics.Recorder(path) as rec:
        for step in range(4):
            batch = models.token_batch(seed=step, image_span=None if step == 2 else (6, 16))
            out = model(**models.model_inputs(batch))
            lt, li = pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])
            rec.record(step, pl.backward(text=lt, image=li), lr=0.05)
            opt.step()
            opt.zero_grad()
    return path


def test_recorder_writes_one_json_line_per_step(jsonl):
    recs = diagnostics.load(jsonl)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(r["lr"] == 0.05 for r in recs)
    assert list(recs[0]["groups"]) == ["group0", "group1"]
    assert list(recs[0]["layers"]) == ["layer0", "layer1", "layer2", "layer3"]
    assert recs[0]["active"] == [True, False]
    # the text-only step: zero image gradient -> infinite ratio, degenerate case, kept in the file
    assert math.isinf(recs[2]["groups"]["group0"]["ratio"])
    assert recs[2]["groups"]["group0"]["case"] == int(pareto_lora.Case.DEGENERATE)
    counts = diagnostics.case_counts(recs)
    assert sum(counts["group0"].values()) == 4 and counts["group1"]["INACTIVE"] == 4


def test_plots_are_valid_png_files(jsonl, tmp_path):
    paths = diagnostics.plot_all(jsonl, tmp_path / "plots")
    assert len(paths) == 4
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_every_skips_steps(jsonl, tmp_path):
    recs = diagnostics.load(jsonl)

    class Fake:
        def __init__(self, rec):
            self.rec = rec

        def to_record(self):
            return self.rec

    path = tmp_path / "every.jsonl"
    with diagnostics.Recorder(path, every=2) as rec:
        written = [rec.record(r["step"], Fake({k: v for k, v in r.items() if k != "step"})) for r in recs]
    assert written == [True, False, True, False]
    assert [r["step"] for r in diagnostics.load(path)] == [0, 2]


def test_errors(jsonl, tmp_path):
    with pytest.raises(ValueError, match="every"):
        diagnostics.Recorder(tmp_path / "x.jsonl", every=0)
    with pytest.raises(ValueError, match="level"):
        diagnostics.plot_ratio_heatmap(jsonl, tmp_path / "x.png", level="rank")
    with pytest.raises(ValueError, match="records: no records"):
        diagnostics.plot_case_counts([], tmp_path / "x.png")


def test_balancer_quantities_are_recorded_and_plotted(tmp_path):
    from pareto_lora.training.balancers import CoMMIT

    model = models.lora_llama(num_layers=4)
    pl = pareto_lora.ParetoLoRA(model, rule="mimo", num_groups=2)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lower = [p for n, p in named if ".layers.0." in n]
    rest = [p for n, p in named if ".layers.0." not in n]
    opt = torch.optim.SGD([{"params": rest}, {"params": lower}], lr=0.05)
    sched = CoMMIT(opt)
    path = tmp_path / "diag.jsonl"
    with diagnostics.Recorder(path) as rec:
        for step in range(3):
            batch = models.token_batch(seed=step)
            out = model(**models.model_inputs(batch))
            lt, li = pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])
            report = pl.backward(text=lt, image=li)
            sched.step(forward=lambda: model(**models.model_inputs(batch)).logits, logits=out.logits)
            opt.zero_grad()
            report.add_metrics(sched.metrics())
            assert "pareto/commit/kappa" in report.as_dict() and "pareto/mimo/sigma_text" in report.as_dict()
            rec.record(step, report)
    series = diagnostics.balancer_series(diagnostics.load(path))
    assert set(series) == {"mimo", "commit"}
    assert len(series["mimo"]["sigma_text"]) == 3
    assert all(s + t == pytest.approx(1.0) for s, t in zip(series["mimo"]["sigma_text"], series["mimo"]["sigma_image"]))
    assert all(k > 0 for k in series["commit"]["kappa"])
    paths = diagnostics.plot_all(path, tmp_path / "plots")
    assert paths[-1].endswith("balancer.png") and len(paths) == 5
    assert matplotlib.image.imread(paths[-1]).shape[1] > 500


def test_case_colours_are_one_table_for_the_package(jsonl, tmp_path, monkeypatch):
    """plot_case_counts and the demo's figures draw each case in the same colour."""
    from matplotlib.axes import Axes

    from pareto_lora.app.demo import plots
    from pareto_lora.training.diagnostics import case_colors

    colours = case_colors()
    assert set(colours) == {c.name for c in pareto_lora.Case}
    assert len(set(colours.values())) == len(colours)
    assert plots.case_colors_by_name() == colours
    drawn = {}
    original = Axes.bar

    def spy(self, x, height, *args, **kwargs):
        drawn[kwargs.get("label")] = kwargs.get("color")
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    diagnostics.plot_case_counts(jsonl, tmp_path / "cases.png")
    assert drawn and all(drawn[name.lower()] == colour for name, colour in colours.items() if name.lower() in drawn)
