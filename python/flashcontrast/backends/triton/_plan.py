"""Launch planning the Triton kernel modules share: tile heuristics, grids, overrides.

One registry of forced tile sizes (:func:`override_tiles`) governs every kernel family
(the pair engine, GRAM, Symile "n_squared"): keys a family does not use are ignored by it
(Symile's tiles hold the whole of D and plan no grid, so it reads block_m and block_n
only).

Grids (see ``pair.py``'s and ``gram.py``'s module docstrings for the kernels that use
them):

* forward, (G, H): program (g, h) owns row blocks g (mod G) and column blocks h (mod H),
  keeps its rows' online statistics in registers and its columns' in row g of a (G, m)
  partial buffer: exclusive writes, no atomics. :func:`_forward_grid` picks the pair with
  G * H <= the programs the GPU runs at once that minimises the busiest program's tiles.
* backward, (column blocks, SPLIT): program (cb, p) keeps column block cb on chip and
  visits the row blocks rb = p (mod SPLIT); :func:`_backward_split` picks SPLIT > 1 only
  when there are too few column blocks to fill the GPU.

Like the kernel modules this one imports Triton: import it only once
:func:`flashcontrast.backends.triton.triton_unavailable_reason` has returned None.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch
import triton

from ._common import _check_block_size, _dot_setup, _scoped_update, _tensor_cores

__all__ = ["override_tiles"]


@dataclass(frozen=True)
class _Tiles:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    per_sm: int = 1  # programs resident per SM (register-bound: ~1 at 8 warps)


# ----------------------------------------------------------------------------- overrides


_OVERRIDE: dict = {}
_OVERRIDE_KEYS = frozenset({"block_m", "block_n", "block_d", "max_programs"})


@contextlib.contextmanager
def override_tiles(**kwargs: int) -> Iterator[None]:
    """Force tile sizes and the concurrent program count of every Triton kernel (tests,
    benchmarks, tuning), restored on exit.

    Keys: block_m, block_n, block_d (powers of two >= 16) and max_programs (the number of
    programs the grids are planned for, SMs x programs per SM on a GPU, 8 in the
    interpreter). D <= block_d takes the single-chunk path of the kernels that have one.
    """
    unknown = set(kwargs) - _OVERRIDE_KEYS
    if unknown:
        raise ValueError(f"unknown overrides {sorted(unknown)}; allowed: {sorted(_OVERRIDE_KEYS)}")
    for key, value in kwargs.items():
        if key == "max_programs":
            if value < 1:
                raise ValueError(f"max_programs must be >= 1, got {value}")
        else:
            _check_block_size(key, value)
    with _scoped_update(_OVERRIDE, kwargs):
        yield


def _with_override(tiles: _Tiles) -> _Tiles:
    keys = {k: v for k, v in _OVERRIDE.items() if k in ("block_m", "block_n")}
    return replace(tiles, **keys) if keys else tiles


# ----------------------------------------------------------------------------- the device


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count_of(device: torch.device) -> int:
    return _sm_count(_index(device))


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(_index(device))


def _slots(device: torch.device, tiles: _Tiles) -> int:
    """How many programs run at once: the size the grids are planned for."""
    if "max_programs" in _OVERRIDE:
        return _OVERRIDE["max_programs"]
    if device.type != "cuda":
        return 8  # interpreter: a few programs, several tiles each
    return _sm_count_of(device) * tiles.per_sm


# ----------------------------------------------------------------------------- tiles


def _block_d(d: int, dtype: torch.dtype, device: torch.device) -> int:
    """D chunk, shared by forward and backward: equal chunking (and operand layout) makes
    the backward's recomputed logits bitwise equal to the forward's, so exp(S - lse)
    sums to 1 up to the rounding of lse itself."""
    if "block_d" in _OVERRIDE:
        return _OVERRIDE["block_d"]
    d_pad = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        return min(d_pad, 64)
    if dtype == torch.float32:  # IEEE (FMA) or tf32 products
        return min(d_pad, 32)
    return d_pad if d_pad <= 128 else 64


# Tile heuristics for sm_90 (H100), checked by compiling offline with Triton 3.9 for
# sm_90a: the 16-bit and tf32 configurations use wgmma, and all fit in 255 registers
# without spilling (128 x 128 forward tiles, or 128-wide dB accumulators with D = 128,
# spill). Not timed on a GPU yet: these are the numbers to tune first.
def _forward_tiles(
    n: int, d: int, dtype: torch.dtype, device: torch.device, m: Optional[int] = None
) -> _Tiles:
    """Forward tiles for an (n, m) sweep (m = n when omitted)."""
    m = n if m is None else m
    block_d = _block_d(d, dtype, device)
    if device.type != "cuda":
        return _Tiles(32, 32, block_d, 4, 1)
    if not _tensor_cores(dtype):  # IEEE fp32: FMA products
        return _Tiles(64, 64, block_d, 8, 2)
    if triton.cdiv(n, 128) * triton.cdiv(m, 64) < _sm_count_of(device):
        return _Tiles(64, 64, block_d, 4, 3, per_sm=2)  # small sweeps: more, smaller tiles
    return _Tiles(128, 64, block_d, 8, 3)


def _backward_tiles(n: int, d: int, dtype: torch.dtype, device: torch.device) -> _Tiles:
    block_d = _block_d(d, dtype, device)
    if device.type != "cuda":
        return _Tiles(32, 32, block_d, 4, 1)
    if not _tensor_cores(dtype):  # IEEE fp32: FMA products
        return _Tiles(32, 32, block_d, 4, 2, per_sm=2)
    if d <= block_d:  # single chunk: B block and the 64 x D fp32 dB accumulator on chip
        return _Tiles(64, 64, block_d, 8, 2)
    # D in chunks, dB by atomics per tile. Before Hopper (mma.sync keeps the products in
    # registers) 64 x 128 spills: sm_80 gets 64 x 64.
    return _Tiles(64, 128 if _capability(device)[0] >= 9 else 64, block_d, 8, 2)


# ----------------------------------------------------------------------------- grids


@functools.lru_cache(maxsize=4096)
def _forward_grid(num_rb: int, num_cb: int, slots: int) -> tuple[int, int]:
    """(G, H) with G * H <= slots minimising the tiles of the busiest program."""
    best = (num_rb * num_cb + 1, 0, 1, 1)
    for g in range(1, min(num_rb, slots) + 1):
        h = min(num_cb, slots // g)
        cost = triton.cdiv(num_rb, g) * triton.cdiv(num_cb, h)
        best = min(best, (cost, g + h, g, h))  # ties: smaller partial buffers
    return best[2], best[3]


@functools.lru_cache(maxsize=4096)
def _backward_split(num_rb: int, num_cb: int, slots: int) -> int:
    """Row-block split minimising waves x tiles per program; ties: fewer dB atomics."""
    best = (num_rb * num_cb + 1, 1)
    for split in range(1, num_rb + 1):
        waves = triton.cdiv(num_cb * split, slots)
        best = min(best, (waves * triton.cdiv(num_rb, split), split))
        if num_cb * split >= slots:
            break
    return best[1]


def _forward_grid_for(
    tiles: _Tiles, n: int, device: torch.device, m: Optional[int] = None
) -> tuple[int, int]:
    """(G, H) of the forward grid of an (n, m) sweep (m = n when omitted) with these tiles
    (:func:`_forward_grid`)."""
    m = n if m is None else m
    num_rb, num_cb = triton.cdiv(n, tiles.block_m), triton.cdiv(m, tiles.block_n)
    return _forward_grid(num_rb, num_cb, _slots(device, tiles))


def _backward_grid_for(
    tiles: _Tiles, n: int, device: torch.device, m: Optional[int] = None
) -> tuple[int, int]:
    """(column blocks, SPLIT) of the backward grid of an (n, m) sweep with these tiles."""
    m = n if m is None else m
    num_rb, num_cb = triton.cdiv(n, tiles.block_m), triton.cdiv(m, tiles.block_n)
    return num_cb, _backward_split(num_rb, num_cb, _slots(device, tiles))


def _launch_kwargs(tiles: _Tiles, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch keywords the tiled kernels share: tile sizes, dot setup, warps."""
    dot_dtype, precision = _dot_setup(dtype, device)
    return dict(
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )  # fmt: skip


def _forward_plan(
    n: int, d: int, dtype: torch.dtype, device: torch.device, m: Optional[int] = None
):
    """(tiles, G, H) of the forward of an (n, m) sweep (m = n when omitted)."""
    tiles = _with_override(_forward_tiles(n, d, dtype, device, m))
    return (tiles, *_forward_grid_for(tiles, n, device, m))


def _backward_plan(
    n: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    m: Optional[int] = None,
    max_block_n: Optional[int] = None,
):
    """(tiles, column blocks, SPLIT) of the backward of an (n, m) sweep; ``max_block_n``
    caps the heuristic's column block (a kernel with more per-column state on chip)."""
    tiles = _backward_tiles(n, d, dtype, device)
    if max_block_n is not None and tiles.block_n > max_block_n:
        tiles = replace(tiles, block_n=max_block_n)
    tiles = _with_override(tiles)
    return (tiles, *_backward_grid_for(tiles, n, device, m))
