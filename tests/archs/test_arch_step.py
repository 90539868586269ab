"""A ParetoLoRA step on each architecture equals plain autograd + reference.integrate, group by group.

The expected groups come from the ArchSpec alone (layer index under ``spec.layers_path``, split
like ``numpy.array_split``; ``spec.extra_groups`` outside the stack), independently of
ParetoLoRA's own grouping. ``ParetoLoRA(model, arch="auto")`` groups exactly like that (the
"three lines"); without ``arch`` LoRA outside the stack is one "projector" group.
"""

import numpy as np
import pytest
import torch

import arch_models as am
import arch_reference
import pareto_lora
from arch_models import ARCHS
from arch_reference import oracle, plain_grads
from pareto_lora import archs

NUM_GROUPS = 2


def spec_group(spec, name: str) -> str:
    return arch_reference.spec_group(spec, name, NUM_GROUPS)


@pytest.mark.parametrize("name", ARCHS)
def test_paretolora_step_matches_reference_per_group(lora_model, name):
    model = lora_model(name)
    spec = archs.detect_arch(model)
    batch = am.BATCHES[name](seed=5)
    expected_grads = plain_grads(model, batch, spec)
    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", tau=0.5, num_groups=NUM_GROUPS, modulate="lower",
                                layers_path=spec.layers_path)
    text, image = archs.modality_losses_for(model, batch, spec)
    report = pl.backward(text=text, image=image)
    groups = {n: spec_group(spec, n) for n in expected_grads}
    assert {g for g in groups.values() if g.startswith("group")} == {"group0", "group1"}
    expected = oracle(expected_grads, groups, {"group0"}, "pareto_lora", 0.5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=2e-5, atol=1e-7, msg=n)
    assert report.groups["group0"]["norm_image"] > 0 and report.groups["group0"]["norm_text"] > 0
    assert report.cases[1] == pareto_lora.Case.INACTIVE


@pytest.mark.parametrize("name", ARCHS)
def test_paretolora_finds_the_same_layer_stack_on_its_own(lora_model, name):
    # grouping.find_layer_stack (get_decoder() + shallowest 'layers') agrees with detect_arch.
    model = lora_model(name)
    pl = pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS)
    assert pl.layout.stack_path == archs.detect_arch(model).layers_path


def test_llava_projector_group_is_the_spec_projector(lora_model):
    # LLaVA: ParetoLoRA's one out-of-stack group is exactly the spec's (vision tower + projector),
    # so modulating it is checked against the spec's grouping too.
    model = lora_model("llava")
    spec = archs.detect_arch(model)
    batch = am.llava_batch(seed=6)
    expected_grads = plain_grads(model, batch, spec)
    pl = pareto_lora.ParetoLoRA(model, rule="mgda", num_groups=NUM_GROUPS, modulate=["lower", "projector"],
                                layers_path=spec.layers_path)
    pl.backward(*archs.modality_losses_for(model, batch, spec))
    groups = {n: spec_group(spec, n) for n in expected_grads}
    assert sum(g == "projector" for g in groups.values()) > 4  # projector + LoRA of the CLIP tower
    expected = oracle(expected_grads, groups, {"group0", "projector"}, "mgda", 0.5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=2e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", ARCHS)
def test_three_lines_match_reference_per_group(lora_model, name):
    # README / docs/models.md "Supported models": ParetoLoRA(arch="auto") + modality_losses_for + backward.
    model = lora_model(name, exclude_frozen=True)
    spec = archs.detect_arch(model)
    batch = am.BATCHES[name](seed=7)
    expected_grads = plain_grads(model, batch, spec)

    pl = pareto_lora.ParetoLoRA(model, arch="auto", num_groups=NUM_GROUPS, modulate="lower")
    text, image = pareto_lora.archs.modality_losses_for(model, batch)
    report = pl.backward(text=text, image=image)

    assert pl.arch == spec
    groups = {n: spec_group(spec, n) for n in expected_grads}
    assert "outside" not in groups.values()
    assert pareto_lora.flat.group_of_names(pl.layout) == groups  # the layout's grouping is the spec's
    expected = oracle(expected_grads, groups, {"group0"}, "pareto_lora", 0.5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=2e-5, atol=1e-7, msg=n)
    assert report.groups["group0"]["norm_image"] > 0 and report.groups["group0"]["norm_text"] > 0


def test_janus_generation_group_is_modulated_by_name(lora_model):
    model = lora_model("janus")
    spec = archs.detect_arch(model)
    batch = am.janus_batch(seed=8)
    expected_grads = plain_grads(model, batch, spec)
    pl = pareto_lora.ParetoLoRA(model, rule="mgda", arch=spec, num_groups=NUM_GROUPS, modulate=["generation", "upper"])
    # named groups follow the layer groups, in the spec's order
    assert pl.layout.group_names == ("group0", "group1", "generation", "projector")
    assert pl.layout.active.tolist() == [False, True, True, False]
    report = pl.backward(*archs.modality_losses_for(model, batch, spec))
    groups = {n: spec_group(spec, n) for n in expected_grads}
    expected = oracle(expected_grads, groups, {"generation", "group1"}, "mgda", 0.5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected[n], rtol=2e-5, atol=1e-7, msg=n)
    # the aligner feeds the LLM (text targets after the image depend on it); the head only the image loss
    assert report.groups["generation"]["norm_text"] > 0 and report.groups["generation"]["norm_image"] > 0
    assert report.cases[2] == pareto_lora.Case.PARETO and report.cases[3] == pareto_lora.Case.INACTIVE
    assert "pareto/generation/ratio" in report.as_dict()


DEPTH = {"lower": 0, "middle": lambda k: k // 2, "upper": -1}


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4])
def test_lower_middle_upper_are_the_same_layers_on_every_architecture(lora_model, num_groups):
    import models  # tests/models.py: the Llama the rest of the suite uses (no arch)

    split = [tuple(r.tolist()) for r in np.array_split(np.arange(am.NUM_LAYERS), num_groups)]
    candidates = [(models.lora_llama(num_layers=am.NUM_LAYERS), None)]
    candidates += [(lora_model(n, exclude_frozen=True), "auto") for n in ARCHS]
    for which, pick in (("lower", 0), ("middle", num_groups // 2), ("upper", num_groups - 1)):
        for model, arch in candidates:
            layout = pareto_lora.flat.build_layout(model, num_groups=num_groups, modulate=which, arch=arch)
            chosen = [g for g, on in enumerate(layout.active.tolist()) if on]
            assert chosen == [pick] and layout.group_layers[pick] == split[pick], (which, layout.stack_path)


def test_arch_argument_errors(lora_model):
    model = lora_model("llava")
    with pytest.raises(ValueError, match="arch: expected an ArchSpec, 'auto' or None"):
        pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS, arch="janus")
    with pytest.raises(ValueError, match="arch: expected the spec's layers_path"):
        pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS, arch=archs.detect_arch(lora_model("chameleon")))
    with pytest.raises(ValueError, match="layers_path: expected none or the spec's"):
        pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS, arch="auto", layers_path="base_model.model.model.vision_tower.vision_model.encoder.layers")
    bad = archs.detect_arch(model, archs.ArchOverrides(extra_groups={"upper": ["model.multi_modal_projector"]}))
    with pytest.raises(ValueError, match="arch: expected extra group names other than"):
        pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS, arch=bad)
    with pytest.raises(ValueError, match="modulate: unknown value 'vision'.*generation"):
        pareto_lora.ParetoLoRA(lora_model("janus"), num_groups=NUM_GROUPS, arch="auto", modulate="vision")
    with pytest.raises(ValueError, match="modulate: 'projector' requested"):
        pareto_lora.ParetoLoRA(lora_model("chameleon"), num_groups=NUM_GROUPS, arch="auto", modulate="projector")


def _layout_groups(model, spec):
    pl = pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS, arch=spec)
    return pareto_lora.flat.group_of_names(pl.layout)


def test_janus_generation_modules_form_their_own_paretolora_group(lora_model):
    model = lora_model("janus")
    spec = archs.detect_arch(model)
    layout = _layout_groups(model, spec)
    gen = {layout[n] for n in layout if spec.group_of(n) == "generation"}
    vision = {layout[n] for n in layout if spec.group_of(n) == "projector"}
    assert gen == {"generation"} and vision == {"projector"}
    # without arch (the default) they share the one out-of-stack group, as before
    plain = pareto_lora.flat.group_of_names(pareto_lora.flat.build_layout(model, num_groups=NUM_GROUPS))
    assert {plain[n] for n in plain if spec.group_of(n)} == {"projector"}


def test_emu3_frozen_vq_lora_is_refused_with_the_fix(lora_model):
    # all-linear wraps the VQ tokenizer's attention, which is never on the training path: with an
    # arch this is an error that names the fix, not a group of zero gradients.
    model = lora_model("emu3")
    spec = archs.detect_arch(model)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(spec.frozen_prefixes[0] + ".")]
    assert frozen  # the gap exists: all-linear wrapped the tokenizer
    with pytest.raises(ValueError, match=r"frozen image tokenizer .*exclude_modules=.*lora_exclude_modules"):
        pareto_lora.ParetoLoRA(model, num_groups=NUM_GROUPS, arch="auto")
    for p in (p for n, p in model.named_parameters() if n in frozen):  # freezing them is the other way out
        p.requires_grad_(False)
    try:
        assert set(_layout_groups(model, spec).values()) == {"group0", "group1"}
    finally:
        for p in (p for n, p in model.named_parameters() if n in frozen):
            p.requires_grad_(True)


def test_emu3_with_the_vq_tokenizer_excluded_has_no_projector_group():
    base = am.tiny_emu3()
    model = am.lora(base, exclude_modules=archs.detect_arch(base).lora_exclude_modules)
    spec = archs.detect_arch(model)
    assert set(_layout_groups(model, spec).values()) == {"group0", "group1"}
