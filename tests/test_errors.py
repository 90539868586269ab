"""Bad input: a ValueError naming the argument, raised before anything is written.

Runs against every backend (reference, C++, Triton, CUDA where present) through the Python API,
and against the raw torch ops for the compiled backend.
"""

import re

import pytest
import torch

import pareto_lora
from pareto_lora import RULES, RuleSpec


def _inputs(device):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(100, generator=gen).to(device)
    b = torch.randn(100, generator=gen).to(device)
    out = torch.randn(100, generator=gen).to(device)
    offsets = torch.tensor([0, 30, 100])
    return dict(a=a, b=b, out=out, offsets=offsets, active=None, rule="pareto_lora", tau=0.5, gamma=1.0)


def _bad(case, device):
    kw = _inputs(device)
    if case == "b_numel":
        kw["b"] = torch.randn(99, device=device)
    elif case == "b_dtype":
        kw["b"] = kw["b"].double()
    elif case == "a_dtype_int":
        kw["a"] = torch.ones(100, dtype=torch.int32, device=device)
    elif case == "a_noncontiguous":
        kw["a"] = torch.randn(200, device=device)[::2]
    elif case == "b_noncontiguous":
        kw["b"] = torch.randn(100, 2, device=device)[:, 0]
    elif case == "out_numel":
        kw["out"] = torch.randn(101, device=device)
    elif case == "out_dtype":
        kw["out"] = torch.randn(100, dtype=torch.float16, device=device)
    elif case == "out_noncontiguous":
        kw["out"] = torch.randn(200, device=device)[::2]
    elif case == "offsets_dtype":
        kw["offsets"] = torch.tensor([0, 30, 100], dtype=torch.int32)
    elif case == "offsets_2d":
        kw["offsets"] = torch.tensor([[0, 30, 100]])
    elif case == "offsets_start":
        kw["offsets"] = torch.tensor([1, 30, 100])
    elif case == "offsets_end":
        kw["offsets"] = torch.tensor([0, 30, 99])
    elif case == "offsets_past_end":
        kw["offsets"] = torch.tensor([0, 130, 100])
    elif case == "offsets_decreasing":
        kw["offsets"] = torch.tensor([0, 60, 40, 100])
    elif case == "active_length":
        kw["active"] = torch.tensor([True, False, True], device=device)
    elif case == "active_dtype":
        kw["active"] = torch.tensor([1, 0], dtype=torch.int64, device=device)
    elif case == "rule":
        kw["rule"] = "paretoo"
    elif case == "tau_zero":
        kw["tau"] = 0.0
    elif case == "tau_negative":
        kw["tau"] = -1.0
    elif case == "gamma_zero":
        kw["gamma"] = 0.0
    else:
        raise KeyError(case)
    return kw


BAD = {  # case -> argument the message must name
    "b_numel": "b",
    "b_dtype": "b",
    "a_dtype_int": "a",
    "a_noncontiguous": "a",
    "b_noncontiguous": "b",
    "out_numel": "out",
    "out_dtype": "out",
    "out_noncontiguous": "out",
    "offsets_dtype": "offsets",
    "offsets_2d": "offsets",
    "offsets_start": "offsets",
    "offsets_end": "offsets",
    "offsets_past_end": "offsets",
    "offsets_decreasing": "offsets",
    "active_length": "active",
    "active_dtype": "active",
    "rule": "rule",
    "tau_zero": "tau",
    "tau_negative": "tau",
    "gamma_zero": "gamma",
}


def _snapshot(kw):
    return {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}


def _assert_unchanged(kw, snap):
    for k, v in snap.items():
        assert torch.equal(kw[k], v) or (torch.isnan(v).any() and torch.equal(kw[k].isnan(), v.isnan())), k


@pytest.mark.parametrize("case", list(BAD))
def test_integrate_rejects_bad_input(any_backend, case):
    name, device = any_backend
    kw = _bad(case, device)
    snap = _snapshot(kw)
    with pytest.raises(ValueError, match=rf"^{BAD[case]}: "):
        pareto_lora.integrate(
            kw["a"], kw["b"], kw["offsets"], out=kw["out"], rule=kw["rule"], tau=kw["tau"],
            active=kw["active"], gamma=kw["gamma"], backend=name,
        )
    _assert_unchanged(kw, snap)


@pytest.mark.parametrize("case", [c for c, arg in BAD.items() if arg in ("a", "b", "out", "offsets")])
def test_combine_rejects_bad_input(any_backend, case):
    name, device = any_backend
    kw = _bad(case, device)
    snap = _snapshot(kw)
    coeffs = torch.ones(kw["offsets"].reshape(-1).numel() - 1, 2, device=device)
    with pytest.raises(ValueError, match=rf"^{BAD[case]}: "):
        pareto_lora.combine(kw["a"], kw["b"], kw["offsets"], coeffs, out=kw["out"], backend=name)
    _assert_unchanged(kw, snap)


@pytest.mark.parametrize("case", [c for c, arg in BAD.items() if arg in ("a", "b", "offsets")])
def test_segment_stats_rejects_bad_input(any_backend, case):
    name, device = any_backend
    kw = _bad(case, device)
    with pytest.raises(ValueError, match=rf"^{BAD[case]}: "):
        pareto_lora.segment_stats(kw["a"], kw["b"], kw["offsets"], backend=name)


def test_combine_rejects_bad_coeffs(any_backend):
    name, device = any_backend
    kw = _inputs(device)
    snap = _snapshot(kw)
    for coeffs in (torch.ones(3, 2, device=device), torch.ones(2, 3, device=device), torch.ones(2, 2, dtype=torch.int32, device=device)):
        with pytest.raises(ValueError, match=r"^coeffs: "):
            pareto_lora.combine(kw["a"], kw["b"], kw["offsets"], coeffs, out=kw["out"], backend=name)
    _assert_unchanged(kw, snap)


def test_rule_coefficients_rejects_bad_input(any_backend):
    name, device = any_backend
    stats = torch.rand(4, 3, device=device)
    for bad, arg in [
        (dict(stats=torch.rand(4, 2, device=device)), "stats"),
        (dict(stats=torch.rand(4, 3, device=device).half()), "stats"),
        (dict(rule="nope"), "rule"),
        (dict(tau=float("nan")), "tau"),
        (dict(gamma=-2.0), "gamma"),
        (dict(active=torch.ones(3, dtype=torch.bool, device=device)), "active"),
    ]:
        kw = dict(stats=stats, rule="pareto_lora", tau=0.5, active=None, gamma=1.0) | bad
        with pytest.raises(ValueError, match=rf"^{arg}: "):
            pareto_lora.rule_coefficients(kw["stats"], kw["rule"], kw["tau"], kw["active"], kw["gamma"], backend=name)


def test_unknown_backend():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="^backend: "):
        pareto_lora.integrate(a, a, torch.tensor([0, 3]), backend="fortran")


def test_rule_tables_agree():
    """Every Python rule name is accepted by the C++ op and the error lists the same names."""
    stats = torch.rand(2, 3)
    for rule in RULES:
        torch.ops.pareto_lora.rule_coefficients(stats, rule, list(RuleSpec(rule).kernel_params()))
    with pytest.raises(ValueError) as err:
        torch.ops.pareto_lora.rule_coefficients(stats, "bogus", list(RuleSpec().kernel_params()))
    assert str(err.value).split("\n")[0].endswith("expected one of " + ", ".join(RULES))
    # the parameter table: csrc/rule.h kParamNames lists rules.KERNEL_PARAMS, in the same order
    with pytest.raises(ValueError) as err:
        torch.ops.pareto_lora.rule_coefficients(stats, "sum", [0.5])
    names = ", ".join(pareto_lora.rules.KERNEL_PARAMS)
    assert str(err.value).split("\n")[0] == f"params: expected {len(pareto_lora.rules.KERNEL_PARAMS)} values ({names}), got 1"


@pytest.mark.parametrize("field, value, message", [
    ("tau", 0.0, "tau: expected a finite number > 0"),
    ("gamma", float("inf"), "gamma: expected a finite number > 0"),
    ("symmetric", 0.5, "symmetric: expected 0 or 1"),
    ("margin", 1.5, "margin: expected a number in [0, 1]"),
    ("c", -0.1, "c: expected a finite number >= 0"),
    ("w_a", float("nan"), "weights: expected a pair (w_a, w_b) of finite numbers >= 0, not both 0"),
    ("w_b", -1.0, "weights: expected a pair (w_a, w_b) of finite numbers >= 0, not both 0"),
    ("max_norm", float("inf"), "max_norm: expected a finite number >= 0"),
    ("reg_eps", -1e-4, "reg_eps: expected a finite number >= 0"),
])
def test_compiled_op_checks_each_rule_parameter(field, value, message):
    """torch.ops called directly (no RuleSpec in between) refuses what RuleSpec refuses."""
    params = list(RuleSpec().kernel_params())
    params[pareto_lora.rules.KERNEL_PARAMS.index(field)] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.ops.pareto_lora.rule_coefficients(torch.rand(2, 3), "sum", params)
    with pytest.raises(ValueError, match=re.escape(message)):
        a = torch.ones(4)
        torch.ops.pareto_lora.integrate(a, a, torch.tensor([0, 4]), torch.empty(4), "sum", params)


def _grouped_bad(device):
    """(keyword overrides, the message's start) for the fused op's training-step arguments; the
    layout has S = 2 segments (offsets [0, 30, 100])."""
    return [
        (dict(groups=torch.tensor([0, 2], dtype=torch.int32)), "groups: expected dtype int64, got int32"),
        (dict(groups=torch.tensor([[0, 2]])), "groups: expected a 1-D tensor of length G+1 >= 1"),
        (dict(groups=[0, 2.0]), "groups: expected an int64 Tensor, a sequence of ints or None"),
        (dict(groups="0,2"), "groups: expected an int64 Tensor, a sequence of ints or None, got str"),
        (dict(groups=[1, 2]), "groups: expected groups[0] == 0, got 1"),
        (dict(groups=[0, 1]), "groups: expected groups[-1] == number of segments == 2, got 1"),
        (dict(groups=[0, 2, 1, 2]), "groups: expected non-decreasing values, but groups[2] < groups[1]"),
        (dict(groups=[0, 1, 2, 2], active=torch.ones(2, dtype=torch.bool, device=device)),
         "active: expected shape [3] (one per group)"),
        (dict(poison=True), "poison: expected a 0-d bool Tensor or None, got bool"),
        (dict(poison=torch.tensor(1.0, device=device)), "poison: expected dtype bool, got float32"),
        (dict(poison=torch.tensor([True], device=device)), "poison: expected a 0-d tensor"),
        (dict(stats=torch.zeros(2, 3, device=device)), "stats: expected dtype float64, got float32"),
        (dict(stats=torch.zeros(3, 3, dtype=torch.float64, device=device)),
         "stats: expected shape [2, 3] (one row per segment)"),
        (dict(stats=[[0.0] * 3] * 2), "stats: expected a float64 Tensor or None, got list"),
    ]


@pytest.mark.parametrize("i", range(14))
def test_integrate_rejects_bad_training_step_arguments(any_backend, i):
    """groups / poison / stats: the same message on every backend, before anything is written."""
    name, device = any_backend
    bad, message = _grouped_bad(device)[i]
    kw = _inputs(device)
    snap = _snapshot(kw)
    args = dict(groups=None, poison=None, stats=None, active=None) | bad
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        pareto_lora.integrate(kw["a"], kw["b"], kw["offsets"], out=kw["out"], backend=name, **args)
    _assert_unchanged(kw, snap)


def _every_dtype_tensor():
    """One tensor of every dtype torch can allocate here (quantized and bit-packed types cannot)."""
    import warnings

    for dtype in sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str):
        try:
            with warnings.catch_warnings():  # quantized dtypes are deprecated, still worth naming right
                warnings.simplefilter("ignore")
                t = torch.zeros(4, dtype=dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        yield t


def test_dtype_names_are_pythons_in_every_message(any_backend):
    """Issue 27: C++ spelled c10's names (ComplexFloat); every message spells torch's (complex64)."""
    name, device = any_backend
    from pareto_lora.checks import FLOAT_DTYPES, dtype_name

    seen = 0
    for t in _every_dtype_tensor():
        if t.dtype in FLOAT_DTYPES:
            continue
        try:
            t = t.to(device)
        except (RuntimeError, TypeError):
            continue
        want = rf"^a: expected dtype float32, bfloat16, float16 or float64, got {dtype_name(t.dtype)}$"
        with pytest.raises(ValueError, match=want):
            pareto_lora.integrate(t, t, torch.tensor([0, 4]), backend=name)
        if t.dtype != torch.bool:
            with pytest.raises(ValueError, match=rf"^active: expected dtype bool, got {dtype_name(t.dtype)}$"):
                pareto_lora.rule_coefficients(torch.zeros(4, 3, device=device), active=t, backend=name)
        seen += 1
    assert seen >= 10  # ints, uints, complex, float8 ...
