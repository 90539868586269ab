"""The K-objective weightings never read a value on the host: on every CI run, not only on a GPU.

On a CUDA device a weighting runs between the Gram launch and the combine launch; a host read of
a value (``.item()``, ``bool(t)``, ``nonzero``, a Python branch on a tensor) would be a device sync
per step and would break CUDA-graph capture. tests/multi/test_weightings_device.py checks that with
``torch.cuda.set_sync_debug_mode("error")`` where a GPU is present. Here the same weightings run on
tensors of the ``meta`` device, which have shapes and no values: any read of a value raises, so a
weighting that completes there reads none, on any device.
"""

import pytest
import torch

from pareto_lora import RuleSpec
from pareto_lora.multi.weightings import K_RULES, apply


def _spec(name: str, k: int) -> RuleSpec:
    return RuleSpec(name, weights=tuple(float(i + 1) for i in range(k))) if name == "constant" else RuleSpec(name)


def test_a_value_read_on_meta_raises():
    # the premise of this file: reading a value of a meta tensor fails instead of passing silently
    t = torch.empty(3, dtype=torch.float64, device="meta")
    for read in (lambda: t.sum().item(), lambda: bool((t > 0).all()), lambda: t.nonzero()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("name", K_RULES)
@pytest.mark.parametrize("with_active", [False, True])
def test_every_rule_reads_no_value(name, k, with_active):
    groups = 6
    gram = torch.empty(groups, k, k, dtype=torch.float64, device="meta")
    active = torch.empty(groups, dtype=torch.bool, device="meta") if with_active else None
    weights, cases = apply(_spec(name, k), gram, active, dtype=torch.float32)
    assert weights.device.type == "meta" and tuple(weights.shape) == (groups, k)
    assert weights.dtype == torch.float32
    assert cases.device.type == "meta" and tuple(cases.shape) == (groups,) and cases.dtype == torch.int32


def test_a_vectorised_user_weighting_adds_no_value_read():
    # the module's claim: its checks of a user weighting's result read shapes only
    def inverse_diagonal(gram):
        d = torch.diagonal(gram, dim1=-2, dim2=-1)
        return 1.0 / d.clamp_min(1e-12).sqrt()

    gram = torch.empty(4, 3, 3, dtype=torch.float64, device="meta")
    weights, cases = apply(inverse_diagonal, gram)
    assert weights.device.type == "meta" and tuple(weights.shape) == (4, 3)
    assert cases.device.type == "meta" and tuple(cases.shape) == (4,)
