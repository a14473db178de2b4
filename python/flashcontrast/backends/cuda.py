"""The CUDA backend: wrappers over the AOT-compiled kernels in ``flashcontrast._C``.

``_C`` is torch-free: it takes device pointers, sizes, element strides, a dtype name and the
stream as integers. This module allocates every output and workspace with torch on the
inputs' device, makes that device current and passes its current stream, so the kernels
run where and when torch expects. Nothing here synchronizes with the host.

The pair engine (contract: ``backends/pair.py``): ``pair_forward`` / ``pair_backward``, with
the torch implementation's signatures, over csrc/kernels/pair_impl.cuh (one forward and one
backward kernel templated on the epilogue and options; ``_C.PairParams`` and friends carry
every argument by name). CLIP, SigLIP, InfoNCE, MV-InfoNCE, MV-DHEL and Symile "n" are its
epilogues and need no other kernels. Symile "n_squared" (M = 3): ``symile_n2_forward`` /
``symile_n2_backward``, csrc/kernels/symile.cu. GRAM: ``gram_forward`` / ``gram_backward``,
csrc/kernels/gram.cu (K = M - 1 <= 5 others). Kernels work in 64 x 64 tiles with fp32
accumulation (WMMA tensor cores for fp16/bf16, SIMT FFMA for fp32); inputs are used with
their strides, never copied; group ids are passed to the kernels as int64. Workspaces
(float32) are sized by ``_C`` (``*_workspace_elems``; pair.h, symile.h and gram.h give the
formulas). The backward kernels add some gradients with fp32 atomics, so those are not
bitwise reproducible; every forward is.

The test suite also runs these wrappers over csrc/ built for the CPU (tests/cuda_emulator):
that module says ``EMULATES_ON_CPU`` and is the only one given CPU tensors.

``unavailable_reason`` tells the dispatcher why the backend cannot run, so that
``backend="cuda"`` fails with a sentence, not a crash; ``OBJECTIVES`` names the objectives
the compiled extension has kernels for.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _cuda_ext
from . import _panel, _paths
from ._pair_entry import Sweep, backward_entry, forward_entry
from .gram import GramBlock, GramCoefs
from .pair import Coefs, Grads, Pair, Stats

__all__ = [
    "OBJECTIVES",
    "gram_backward",
    "gram_forward",
    "pair_backward",
    "pair_forward",
    "symile_n2_backward",
    "symile_n2_forward",
    "unavailable_reason",
]

_C = _cuda_ext._C

_PAIR = ("pair_forward", "pair_backward", "PairParams")
_KERNELS = {
    "pair": _PAIR,
    # objectives that are epilogues of the pair engine need nothing else
    "clip": _PAIR,
    "siglip": _PAIR,
    "infonce": _PAIR,
    "multiview": _PAIR,
    # Symile: "n" on the pair engine, "n_squared" (M = 3) on its own kernels
    "symile": (*_PAIR, "symile_n2_forward", "symile_n2_backward", "TripleParams"),
    "gram": ("gram_forward", "gram_backward", "GramParams"),
}


def objectives_of(c: Optional[ModuleType]) -> frozenset:
    """The objectives whose kernels the extension module ``c`` (or None) has; "pair" is the
    pair engine (``pair_forward`` / ``pair_backward``), the capability every objective built
    on it needs."""
    return frozenset(
        name for name, fns in _KERNELS.items() if c is not None and all(hasattr(c, f) for f in fns)
    )


#: Objectives with kernels in this build of ``_C`` (empty without ``_C``).
OBJECTIVES: frozenset = objectives_of(_C)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _emulated() -> bool:
    """True only for the test suite's CPU build of csrc/ (tests/cuda_emulator), whose
    "device memory" is host memory: it alone may take CPU tensors."""
    return getattr(_C, "EMULATES_ON_CPU", False)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the compiled extension can run on ``device``, else why it cannot."""
    if _C is None:
        return _cuda_ext.C_UNAVAILABLE_REASON
    if device.type != "cuda" and not (device.type == "cpu" and _emulated()):
        return f"the CUDA backend needs CUDA tensors, got tensors on {device}"
    return None


def _scalar(t: Tensor) -> Tensor:
    """A float32 one-element device tensor (a no-op for the contract's 0-d float32)."""
    return t.detach().reshape(()).to(torch.float32).contiguous()


def _device_index(device: torch.device) -> int:
    if device.type == "cpu":  # the emulator's one device
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current (a no-op for the emulator's CPU tensors)."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.cuda.device(device)


def _stream(device: torch.device) -> int:
    """The current stream of ``device`` as an integer handle (0 for the emulator)."""
    return 0 if device.type == "cpu" else torch.cuda.current_stream(device).cuda_stream


def _launch(
    kernel: Callable[..., None],
    workspace_elems: Callable[..., int],
    params,
    device: torch.device,
    *args,
    **pointers: int,
) -> None:
    """``kernel(params, *args, **pointers)`` on ``device`` (made current) and its current
    stream, with the float32 workspace ``workspace_elems(params)`` sizes. The workspace is
    freed on return: the caching allocator orders its reuse after the launch on the stream."""
    with _on(device):
        elems = workspace_elems(params, device=_device_index(device))
        ws = torch.empty(elems, dtype=torch.float32, device=device)
        kernel(
            params, *args, **pointers, workspace=ws.data_ptr(), workspace_elems=ws.numel(),
            stream=_stream(device),
        )  # fmt: skip


# ----------------------------------------------------------------------------- Symile, GRAM


def _check_many(
    objective: str, feats: dict, scale: Tensor, ndim: Optional[int] = 2
) -> torch.device:
    """As _check, for named same-shape/dtype/device feature tensors."""
    first = next(iter(feats.values()))
    reason = unavailable_reason(first.device)
    if reason is None and objective not in OBJECTIVES:
        reason = f"this build of flashcontrast._C has no {objective} kernels"
    if reason is not None:
        raise RuntimeError(f"flashcontrast CUDA backend cannot run {objective}: {reason}")
    for name, t in feats.items():
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got {tuple(t.shape)}")
        if t.dtype != first.dtype or t.dtype not in _DTYPE_NAMES:
            raise TypeError(
                f"CUDA {objective} kernels take float32, float16 or bfloat16 inputs of one "
                f"dtype, got {name}: {t.dtype} (float64: use backend='torch' or 'reference')"
            )
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, expected {first.device}")
    if scale.numel() != 1 or scale.device != first.device:
        raise ValueError(f"scale must be a single-element tensor on {first.device}")
    return first.device


def _vec(t: Tensor, n: int, name: str, device: torch.device, shape: tuple = ()) -> Tensor:
    """An fp32 contiguous (n, *shape) device tensor (no copy in the normal case)."""
    if tuple(t.shape) != (n, *shape) or t.device != device:
        raise ValueError(
            f"{name} must be {(n, *shape)} on {device}, got {tuple(t.shape)} on {t.device}"
        )
    return t.detach().to(torch.float32).contiguous()


def _triple_params(x: Tensor, y: Tensor, z: Tensor, scale: Tensor):
    (n, d), m = x.shape, y.shape[0]
    return _C.TripleParams(
        x=x.data_ptr(), y=y.data_ptr(), z=z.data_ptr(), n=n, m=m, d=d,
        x_stride0=x.stride(0), x_stride1=x.stride(1), y_stride0=y.stride(0),
        y_stride1=y.stride(1), z_stride0=z.stride(0), z_stride1=z.stride(1),
        dtype=_DTYPE_NAMES[x.dtype], scale=scale.data_ptr(),
    )  # fmt: skip


def _check_triple(x: Tensor, y: Tensor, z: Tensor, scale: Tensor) -> torch.device:
    """Checks x (n, D) and y, z (m, D) (the Triton kernels' contract): one dtype, one device."""
    dev = _check_many("symile", {"x": x, "y": y, "z": z}, scale)
    if y.shape != z.shape or x.shape[1] != y.shape[1]:
        raise ValueError(
            "features must be x (n, D) and y, z (m, D) of one D, got "
            f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(z.shape)}"
        )
    return dev


def symile_n2_forward(x: Tensor, y: Tensor, z: Tensor, scale: Tensor) -> Tensor:
    """row_lse_i = LSE_{j,k} scale * sum_d x_id y_jd z_kd, (n,) fp32: rows x (n, D) against
    the m^2 pairs of y, z (m, D) (-inf for every row when m = 0); n m^2 D work, O((n + m) D)
    memory."""
    dev = _check_triple(x, y, z, scale)
    (n, d), m = x.shape, y.shape[0]
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0 or m == 0 or d == 0:  # every logit 0 where D = 0
        return torch.full((n,), 2.0 * math.log(m) if m else -math.inf, **f32)
    scale = _scalar(scale)
    row_lse = torch.empty(n, **f32)
    params = _triple_params(x, y, z, scale)
    _launch(
        _C.symile_n2_forward, _C.symile_n2_forward_workspace_elems, params, dev,
        row_lse=row_lse.data_ptr(),
    )  # fmt: skip
    return row_lse


def symile_n2_backward(
    x: Tensor, y: Tensor, z: Tensor, scale: Tensor, row_lse: Tensor, grad_rows: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (n, D), dy (m, D), dz (m, D), dscale) of sum_i grad_rows_i row_lse_i, all fp32
    (shapes as :func:`symile_n2_forward`; backends/__init__.py)."""
    dev = _check_triple(x, y, z, scale)
    (n, d), m = x.shape, y.shape[0]
    f32 = dict(dtype=torch.float32, device=dev)
    row_lse = _vec(row_lse, n, "row_lse", dev)
    grad_rows = _vec(grad_rows, n, "grad_rows", dev)
    dx, dy, dz = (torch.zeros((rows, d), **f32) for rows in (n, m, m))
    dscale = torch.zeros((), **f32)
    if n == 0 or m == 0 or d == 0:
        return dx, dy, dz, dscale
    scale = _scalar(scale)
    params = _triple_params(x, y, z, scale)
    _launch(
        _C.symile_n2_backward, _C.symile_n2_backward_workspace_elems, params, dev,
        row_lse=row_lse.data_ptr(), grad_rows=grad_rows.data_ptr(), dx=dx.data_ptr(),
        dy=dy.data_ptr(), dz=dz.data_ptr(), dscale=dscale.data_ptr(),
    )  # fmt: skip
    return dx, dy, dz, dscale


def _check_gram(block: GramBlock):
    """(device, det_h, adj_h, floor_h) after the checks: anchor (n, D), others (K, m, D),
    the per-column constants of the m columns made fp32 contiguous."""
    anchor, others, scale, det_h, adj_h, floor_h, _ = block
    dev = _check_many("gram", {"anchor": anchor}, scale)
    _check_many("gram", {"anchor": anchor, "others": others}, scale, ndim=None)
    if others.dim() != 3 or others.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"others must be (K, m, D) with anchor (n, D), got {tuple(others.shape)} and "
            f"{tuple(anchor.shape)}"
        )
    k, m, _ = others.shape
    if not 1 <= k <= 5:
        raise ValueError(f"the CUDA GRAM kernels take 1 to 5 other modalities, got K = {k}")
    # Per-column constants, O(m K^2): made fp32 contiguous (a copy only if they are not).
    consts = _vec(det_h, m, "det_h", dev), _vec(adj_h, m, "adj_h", dev, (k, k))
    return (dev, *consts, _vec(floor_h, m, "floor_h", dev))


def _gram_params(block: GramBlock, scale: Tensor, det_h: Tensor, adj_h: Tensor, floor_h: Tensor):
    """The typed GramParams of the block, with the checked (fp32 contiguous) scale and
    column constants."""
    anchor, others, row_offset = block.anchor, block.others, block.row_offset
    k, m, d = others.shape
    return _C.GramParams(
        anchor=anchor.data_ptr(), others=others.data_ptr(), n=anchor.shape[0], m=m, d=d, k=k,
        row_offset=int(row_offset), anchor_stride0=anchor.stride(0),
        anchor_stride1=anchor.stride(1), others_stride0=others.stride(0),
        others_stride1=others.stride(1), others_stride2=others.stride(2),
        dtype=_DTYPE_NAMES[anchor.dtype], scale=scale.data_ptr(), det_h=det_h.data_ptr(),
        adj_h=adj_h.data_ptr(), floor_h=floor_h.data_ptr(),
    )  # fmt: skip


def gram_forward(block: GramBlock) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_lse (n,), col_lse (m,), diag (n,), row_sum (n,), col_sum (m,)) fp32 of L = -scale
    V for rows anchor (n, D) against the columns of others (K, m, D), row i's own column at
    row_offset + i (diag 0 outside the block); partial statistics (backends/__init__.py)."""
    dev, det_h, adj_h, floor_h = _check_gram(block)
    anchor, others = block.anchor, block.others
    _, m, d = others.shape
    n = anchor.shape[0]
    f32 = dict(dtype=torch.float32, device=dev)
    if n == 0 or m == 0 or d == 0:  # d = 0: all vectors are zero, V = 0 everywhere
        row_lse = torch.full((n,), math.log(m) if d == 0 and m else -math.inf, **f32)
        col_lse = torch.full((m,), math.log(n) if d == 0 and n else -math.inf, **f32)
        zeros = (torch.zeros(size, **f32) for size in (n, n, m))
        return (row_lse, col_lse, *zeros)
    outs = tuple(torch.empty(size, **f32) for size in (n, m, n, n, m))
    scale = _scalar(block.scale)  # kept alive: the kernel reads its address
    params = _gram_params(block, scale, det_h, adj_h, floor_h)
    names = ("row_lse", "col_lse", "diag", "row_sum", "col_sum")
    _launch(
        _C.gram_forward, _C.gram_forward_workspace_elems, params, dev,
        **{k: o.data_ptr() for k, o in zip(names, outs)},
    )  # fmt: skip
    return outs


def gram_backward(
    block: GramBlock, coefs: GramCoefs, out_dtype: Optional[torch.dtype] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_anchor (n, D), d_others_u (K, m, D), dscale, col_tt (m,), col_uu (m, K, K)) of this
    block per backends/__init__.py, from the merged statistics ``coefs``; d_anchor and
    d_others_u in ``out_dtype`` (None: the inputs'; float32 straight from the kernel, any
    other a cast), the rest fp32."""
    row_lse, col_lse, grad, label_smoothing, total = coefs
    dev, det_h, adj_h, floor_h = _check_gram(block)
    anchor, others = block.anchor, block.others
    k, m, d = others.shape
    n = anchor.shape[0]
    out = out_dtype or anchor.dtype
    kernel_out = out if out in (anchor.dtype, torch.float32) else torch.float32
    f32 = dict(dtype=torch.float32, device=dev)
    row_lse = _vec(row_lse, n, "row_lse", dev)
    col_lse = _vec(col_lse, m, "col_lse", dev)
    d_anchor = torch.zeros((n, d), dtype=kernel_out, device=dev)
    d_others = torch.zeros((k, m, d), dtype=kernel_out, device=dev)
    dscale, col_tt, col_uu = (
        torch.zeros((), **f32),
        torch.zeros(m, **f32),
        torch.zeros(m, k, k, **f32),
    )
    if n and m and d:
        scale, grad = _scalar(block.scale), _scalar(grad.to(dev))  # alive for the kernel
        params = _gram_params(block, scale, det_h, adj_h, floor_h)
        _launch(
            _C.gram_backward, _C.gram_backward_workspace_elems, params, dev,
            row_lse=row_lse.data_ptr(), col_lse=col_lse.data_ptr(),
            grad=grad.data_ptr(), label_smoothing=float(label_smoothing),
            total=int(m if total is None else total), out_dtype=_DTYPE_NAMES[kernel_out],
            d_anchor=d_anchor.data_ptr(), d_others_u=d_others.data_ptr(),
            dscale=dscale.data_ptr(), col_tt=col_tt.data_ptr(), col_uu=col_uu.data_ptr(),
        )  # fmt: skip
    return d_anchor.to(out), d_others.to(out), dscale, col_tt, col_uu


# ----------------------------------------------------------------------------- pair engine


def _check_pair(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], pair: Pair):
    """Raise before touching ``_C`` (as _check, for the rectangular sweep)."""
    reason = unavailable_reason(a.device)
    if reason is None and "pair" not in OBJECTIVES:
        reason = "this build of flashcontrast._C has no pair engine kernels"
    if reason is not None:
        raise RuntimeError(f"flashcontrast CUDA backend cannot run the pair engine: {reason}")
    if not isinstance(pair, Pair):
        raise TypeError(f"pair must be a backends.pair.Pair, got {type(pair).__name__}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (n, D) and (m, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype or a.dtype not in _DTYPE_NAMES:
        raise TypeError(
            "CUDA pair kernels take float32, float16 or bfloat16 a and b of one dtype, "
            f"got {a.dtype} and {b.dtype} (float64: use backend='torch')"
        )
    for name, t in (("b", b), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device}, a on {a.device}")
    if scale.numel() != 1 or (bias is not None and bias.numel() != 1):
        raise ValueError("scale and bias must be single-element tensors")


def _pair_groups(row_groups, col_groups, n: int, m: int, device) -> tuple:
    """(row ids, column ids) as contiguous int64 device tensors (int32 converted), or Nones."""
    if (row_groups is None) != (col_groups is None):
        raise ValueError("row_groups and col_groups must be given together")
    if row_groups is None:
        return None, None
    out = []
    for name, g, size in (("row_groups", row_groups, n), ("col_groups", col_groups, m)):
        if g.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {g.dtype}")
        if tuple(g.shape) != (size,):
            raise ValueError(f"{name} must be ({size},), got {tuple(g.shape)}")
        if g.device != device:
            raise ValueError(f"{name} is on {g.device}, expected {device}")
        out.append(g.detach().to(torch.int64).contiguous())
    return tuple(out)


def _pair_vec(t: Optional[Tensor], size: int, name: str, device) -> Optional[Tensor]:
    """None, or an fp32 contiguous (size,) device tensor (no copy in the normal case)."""
    return None if t is None else _vec(t, size, name, device)


def _addr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _checked(sweep: Sweep) -> tuple:
    """(device, n, m, (row ids, column ids), positive logits) of a sweep, after the checks
    both directions make before touching ``_C``."""
    a, b, pair = sweep.a, sweep.b, sweep.pair
    _check_pair(a, b, sweep.scale, sweep.bias, pair)
    _check_override(pair, sweep.positive_logits)
    dev, n, m = a.device, a.shape[0], b.shape[0]
    groups = _pair_groups(sweep.row_groups, sweep.col_groups, n, m, dev)
    return dev, n, m, groups, _pair_vec(sweep.positive_logits, n, "positive_logits", dev)


def _scalars(sweep: Sweep) -> tuple[Tensor, Optional[Tensor]]:
    """(scale, bias or None) as fp32 one-element device tensors: the caller keeps them
    alive until the launch (the kernels read their addresses)."""
    return _scalar(sweep.scale), None if sweep.bias is None else _scalar(sweep.bias)


def _pair_params(sweep: Sweep, scale: Tensor, bias: Optional[Tensor], groups, pos_logits, x=None):
    """The typed PairParams of the sweep, with the fp32 scalars of :func:`_scalars` and the
    checked group ids and positive logits of :func:`_checked`; ``x`` (n, m) float32
    contiguous, the panel path's GEMM output the kernels read instead of multiplying."""
    a, b, pair = sweep.a, sweep.b, sweep.pair
    row_offset, col_offset = sweep.row_offset, sweep.col_offset
    if row_offset < 0 or col_offset < 0:
        raise ValueError(f"row_offset and col_offset must be >= 0, got {row_offset}, {col_offset}")
    (n, d), m = a.shape, b.shape[0]
    return _C.PairParams(
        a=a.data_ptr(), b=b.data_ptr(), n=n, m=m, d=d,
        a_stride0=a.stride(0), a_stride1=a.stride(1),
        b_stride0=b.stride(0), b_stride1=b.stride(1),
        dtype=_DTYPE_NAMES[a.dtype], scale=scale.data_ptr(), bias=_addr(bias),
        epilogue=pair.epilogue, positives=bool(pair.positives),
        exclude_self=bool(pair.exclude_self), period=int(pair.period),
        row_offset=int(row_offset), col_offset=int(col_offset),
        row_groups=_addr(groups[0]), col_groups=_addr(groups[1]),
        positive_logits=_addr(pos_logits), x=_addr(x),
    )  # fmt: skip


def _stat_fields(pair: Pair) -> tuple:
    """The Stats fields this pair's forward produces, with their sides ("row"/"col")."""
    if pair.epilogue == "sigmoid":
        return ()
    fields = [("row_max", "row"), ("row_sum", "row")]
    if pair.positives:
        fields += [("pos_max", "row"), ("pos_sum", "row")]
    if pair.epilogue == "softmax":
        fields += [("col_max", "col"), ("col_sum", "col")]
        if pair.positives:
            fields += [("cpos_max", "col"), ("cpos_sum", "col")]
    return tuple(fields)


def _check_override(pair: Pair, positive_logits: Optional[Tensor]) -> None:
    if positive_logits is not None and not (pair.epilogue == "rows" and pair.positives):
        raise ValueError(
            "positive_logits needs the 'rows' epilogue with positives, got "
            f"epilogue={pair.epilogue!r}, positives={pair.positives}"
        )


def _pair_forward(sweep: Sweep, x: Optional[Tensor] = None) -> Stats:
    """The sweep's statistics (``backends/pair.py``), float32 (max, sum) pairs, from
    csrc/kernels/pair.cu. ``max_block_elements`` (the torch backend's block size) is
    accepted and ignored: the kernels work in 64 x 64 tiles. ``x`` (n, m) float32
    contiguous: the panel path's X = a b^T, read instead of multiplied (``cuda_panel.py``)."""
    dev, n, m, groups, pos = _checked(sweep)
    pair = sweep.pair
    f32 = dict(dtype=torch.float32, device=dev)
    if pair.epilogue == "sigmoid":
        total = torch.zeros((), **f32)
        if n == 0 or m == 0:
            return Stats(total=total)
        outs = {"total": total}
    else:
        size = {"row": n, "col": m}
        outs = {k: torch.empty(size[side], **f32) for k, side in _stat_fields(pair)}
        if n == 0 or m == 0:  # empty sets: (-inf, 0) on the side that has entries
            for k, t in outs.items():
                t.fill_(-math.inf if k.endswith("_max") else 0.0)
            return Stats(**outs)
    scale, bias = _scalars(sweep)
    params = _pair_params(sweep, scale, bias, groups, pos, x)
    stats = _C.PairStats(**{k: t.data_ptr() for k, t in outs.items()})
    _launch(_C.pair_forward, _C.pair_forward_workspace_elems, params, dev, stats)
    return Stats(**outs)


def _pair_backward(
    sweep: Sweep,
    stats: Stats,
    coefs: Coefs,
    out_dtype: Optional[torch.dtype],
    panel: Optional[tuple[Tensor, Tensor, Optional[Tensor]]] = None,
) -> Grads:
    """(dA, dB, dscale, dbias[, dpos]) of the loss the coefficients define, from the merged
    statistics (``backends/pair.py``); da / db contiguous in ``out_dtype`` (None: the
    inputs' dtype; float32 allowed), dscale / dbias / dpos float32.

    ``panel`` = (x, ds, unit), the panel path (``cuda_panel.py``): the kernel reads X (n, m)
    float32 and writes dS / unit (unit a 0-d float32 tensor, None: 1) into ds (n, m, the
    inputs' dtype) instead of forming dA and dB (returned as (0, D) stand-ins)."""
    dev, n, m, groups, pos = _checked(sweep)
    pair, d, dtype = sweep.pair, sweep.a.shape[1], sweep.a.dtype
    out = out_dtype or dtype
    if out not in (dtype, torch.float32):
        raise TypeError(f"out_dtype must be the inputs' dtype ({dtype}) or float32, got {out}")
    f32 = dict(dtype=torch.float32, device=dev)
    da = torch.zeros((0 if panel else n, d), dtype=out, device=dev)
    db = torch.zeros((0 if panel else m, d), dtype=out, device=dev)
    dscale, dbias = torch.zeros((), **f32), torch.zeros((), **f32)
    dpos = torch.zeros(n, **f32) if pos is not None else None
    # The coefficients this epilogue uses (others are 0 by the contract), and the merged
    # statistics those need.
    size = {"row": n, "col": m}
    use = {"rows": "row", "pos_rows": "row", "cols": "col", "pos_cols": "col"}
    if pair.epilogue == "sigmoid":
        use = {}
    elif pair.epilogue == "rows":
        use = {k: v for k, v in use.items() if k in ("rows", "pos_rows")}
    if not pair.positives:
        use = {k: v for k, v in use.items() if not k.startswith("pos_")}
    need = {"rows": ("row_max", "row_sum"), "pos_rows": ("pos_max", "pos_sum"),
            "cols": ("col_max", "col_sum"), "pos_cols": ("cpos_max", "cpos_sum")}  # fmt: skip
    c_args, s_args = {}, {}
    for k, side in use.items():
        c = _pair_vec(getattr(coefs, k), size[side], f"coefs.{k}", dev)
        if c is None:
            continue
        c_args[k] = c
        for field in need[k]:
            t = getattr(stats, field)
            if t is None:
                raise ValueError(f"coefs.{k} is given but stats.{field} is None")
            s_args[field] = _vec(t, size[side], f"stats.{field}", dev)
    if pair.epilogue == "sigmoid":
        if coefs.total is None:
            raise ValueError("the 'sigmoid' epilogue needs coefs.total")
        if coefs.total.numel() != 1 or coefs.total.device != dev:
            raise ValueError(f"coefs.total must be a single-element tensor on {dev}")
        c_args["total"] = _scalar(coefs.total)
    if n == 0 or m == 0:
        return Grads(da, db, dscale, dbias, dpos)
    scale, bias = _scalars(sweep)
    x, ds, unit = panel if panel else (None, None, None)
    params = _pair_params(sweep, scale, bias, groups, pos, x)
    grads = _C.PairGrads(
        da=0 if panel else da.data_ptr(), db=0 if panel else db.data_ptr(),
        dscale=dscale.data_ptr(), dbias=dbias.data_ptr(), dpos=_addr(dpos),
        out_dtype=_DTYPE_NAMES[out], ds=_addr(ds), ds_unit=_addr(unit),
    )  # fmt: skip
    _launch(
        _C.pair_backward, _C.pair_backward_workspace_elems, params, dev,
        _C.PairStats(**{k: t.data_ptr() for k, t in s_args.items()}),
        _C.PairCoefs(**{k: t.data_ptr() for k, t in c_args.items()}), grads,
    )  # fmt: skip
    return Grads(da, db, dscale, dbias, dpos)


#: Which path the pair engine's entry points take: FLASHCONTRAST_CUDA_PATH = "auto"
#: (default), "fused" (the tile kernels: products and epilogue in one kernel) or "panel"
#: (``cuda_panel.py``: cuBLAS GEMMs per panel, the tile kernels as epilogues reading X).
#: "auto" is "fused" off CUDA (the emulator) and on CUDA the cost model's choice
#: (``costmodel.choose_pair_path`` against the tile kernels): the same in both directions.
PATH_VARIABLE = _paths.CUDA_PATH


def sweep_path(sweep: Sweep) -> str:
    """ "fused" or "panel": the path :data:`PATH_VARIABLE` and the shape choose."""
    from .. import costmodel

    a, b = sweep.a, sweep.b
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    return _paths.path_for(
        PATH_VARIABLE,
        a.device,
        lambda: costmodel.choose_pair_path(n, m, d, a.element_size(), fused="cuda"),
    )


_ROUTE_DOC = "\n\n    The path: :func:`sweep_path` (:data:`PATH_VARIABLE`)."
_routed_forward, _routed_backward = _panel.routes(
    sweep_path,
    lambda sweep: _pair_forward(sweep),
    lambda *args: _pair_backward(*args),
    lambda: importlib.import_module(f"{__package__}.cuda_panel"),
    (
        (_pair_forward.__doc__ or "").split(" ``x`` (n, m)")[0] + _ROUTE_DOC,
        (_pair_backward.__doc__ or "").split("\n\n    ``panel``")[0] + _ROUTE_DOC,
    ),
)

pair_forward = forward_entry(_routed_forward)
pair_backward = backward_entry(_routed_backward)
