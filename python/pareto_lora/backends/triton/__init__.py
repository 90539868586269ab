"""Triton backend (``backend="triton"``): :mod:`.ops` (validated entry points, the
``torch.ops.pareto_lora_triton.*`` ops, the tile table) and :mod:`.kernels` (the kernels).

Importing this package imports triton; the registry (:mod:`pareto_lora.backends`) treats an
ImportError as "backend not available".
"""

from .ops import combine, integrate, is_available, rule_coefficients, segment_stats, tile_table

__all__ = ["combine", "integrate", "is_available", "rule_coefficients", "segment_stats", "tile_table"]
