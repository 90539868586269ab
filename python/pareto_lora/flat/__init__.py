"""The flat-buffer layer: where a LoRA model's gradients live and the step that integrates them.

:mod:`.params` (LoRA parameters and their layers), :mod:`.units` (which unit each parameter is
in, by layer or by an architecture's :class:`~pareto_lora.archs.ArchSpec`), :mod:`.layout` (units, groups, buckets),
:mod:`.buffers` (persistent flat buffers and ``.grad`` views), :mod:`.step` (stats -> rule ->
combine over a layout: one fused launch per bucket for a kernel rule). Shared by :mod:`pareto_lora.distributed` and :mod:`pareto_lora.training`.
"""

from .buffers import FlatGrads, check_buffers_fit
from .layout import GradLayout, build_layout, group_of_names, local_layout
from .params import find_layer_stack, is_lora_param
from .step import FlatStep, PythonRule, StepRule, flat_step, group_rule, sum_into_groups, unit_stats

__all__ = [
    "FlatGrads",
    "FlatStep",
    "GradLayout",
    "PythonRule",
    "StepRule",
    "build_layout",
    "check_buffers_fit",
    "find_layer_stack",
    "flat_step",
    "group_of_names",
    "group_rule",
    "is_lora_param",
    "local_layout",
    "sum_into_groups",
    "unit_stats",
]
