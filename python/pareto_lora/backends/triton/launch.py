"""What every launch of the Triton kernels needs: the launch constants, the device check, the
cached tile tables (host-built: tiles never cross a segment boundary) and the rule's parameters
on the device. Shared by the two-objective ops (:mod:`.ops`) and the K-objective ones
(:mod:`.multi`), so that both cut a buffer into the same tiles.
"""

import collections
import os
import threading
from typing import Optional

import torch
from triton.runtime.interpreter import InterpretedFunction

from ...rules import RuleSpec
from . import kernels as K

__all__ = ["BLOCK", "NUM_WARPS", "SEGS", "LANES", "RULE_SEGS", "is_available", "tile_table", "group_table",
           "rule_params"]

# Elements per tile (one program of the stats and combine kernels). Large enough to keep the
# GPU's memory pipes busy and the interpreter fast (each program is simulated in numpy).
BLOCK = 4096
NUM_WARPS = 8
# Segments per program of the reduce/rule kernels, and float64 lanes per segment in the reduce.
SEGS = 16
LANES = 64
RULE_SEGS = 128


def is_available(device_type: str) -> bool:
    """Whether these kernels can run on tensors of `device_type` ("cuda" also covers ROCm)."""
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "cpu":
        return _interpreting()
    return False


# triton.jit reads TRITON_INTERPRET when the kernels are defined: setting it later does not turn
# compiled kernels into interpreted ones, so both must hold for CPU tensors.
_KERNELS_INTERPRETED = isinstance(K.tile_stats_kernel, InterpretedFunction)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and _KERNELS_INTERPRETED


def _check_device(device: torch.device) -> None:
    if not is_available(device.type):
        hint = " (set TRITON_INTERPRET=1 before triton is first imported to run on CPU)" if device.type == "cpu" else ""
        raise RuntimeError(f"backend='triton': no Triton kernels for device {device.type!r}{hint}")


# ---- tile table -------------------------------------------------------------------------------
_TABLE_CACHE_SIZE = 64
_table_cache: "collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = collections.OrderedDict()
_table_lock = threading.Lock()


def _build_tile_table(offsets: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host table of tiles of <= `block` elements that never cross a segment boundary.

    Returns ``tiles`` int64 [3, T] (rows: segment, start, end) and ``seg_tiles`` int64 [G + 1]
    (segment s owns tiles seg_tiles[s]..seg_tiles[s+1]; an empty segment owns none).
    """
    lens = offsets[1:] - offsets[:-1]
    per_seg = (lens + (block - 1)) // block
    seg_tiles = torch.cat([offsets.new_zeros(1), per_seg.cumsum(0)])
    seg = torch.repeat_interleave(torch.arange(lens.numel(), dtype=torch.int64), per_seg)
    within = torch.arange(seg.numel(), dtype=torch.int64) - seg_tiles[seg]
    start = offsets[seg] + within * block
    end = torch.minimum(start + block, offsets[seg + 1])
    return torch.stack([seg, start, end]), seg_tiles


def _cached(key: tuple, build):
    with _table_lock:
        hit = _table_cache.get(key)
        if hit is not None:
            _table_cache.move_to_end(key)
            return hit
    value = build()
    with _table_lock:
        _table_cache[key] = value
        while len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    return value


def tile_table(offsets: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, seg_tiles) on `device` for validated `offsets`, cached per offsets content.

    A training loop integrates the same layout every step, so after the first call this costs a
    hash of the offsets (which the validation has already copied to the host) and no transfer.
    """
    host = offsets.detach().cpu().contiguous()
    device = torch.device(device)

    def build():
        tiles, seg_tiles = _build_tile_table(host, BLOCK)
        return tiles.to(device), seg_tiles.to(device)

    return _cached((host.numpy().tobytes(), str(device), BLOCK), build)


def group_table(offsets: torch.Tensor, groups: Optional[torch.Tensor], device: torch.device):
    """(group_tiles, groups) on `device`: the tile table with each tile's group in row 0 (what the
    combine indexes its coefficients with), and the groups themselves (None: one per segment)."""
    host = offsets.detach().cpu().contiguous()
    num_segments = host.numel() - 1
    hg = torch.arange(num_segments + 1) if groups is None else groups.detach().cpu().contiguous()
    device = torch.device(device)

    def build():
        tiles, _ = _build_tile_table(host, BLOCK)
        sizes = hg[1:] - hg[:-1]
        seg_group = torch.repeat_interleave(torch.arange(sizes.numel()), sizes, output_size=num_segments)
        group_tiles = tiles.clone()
        group_tiles[0] = seg_group[tiles[0]]
        return group_tiles.to(device), hg.to(device)

    return _cached(("groups", host.numpy().tobytes(), hg.numpy().tobytes(), str(device), BLOCK), build)


def rule_params(spec: RuleSpec, device: torch.device) -> torch.Tensor:
    """The rule's parameters (rules.KERNEL_PARAMS) as a float64 tensor on `device`, cached per
    value: after the first step of a training loop a call copies nothing to the device."""
    params = spec.kernel_params()
    device = torch.device(device)
    return _cached(("params", params, str(device)), lambda: torch.tensor(params, dtype=torch.float64, device=device))
