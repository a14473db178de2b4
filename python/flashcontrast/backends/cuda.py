"""The CUDA backend: wrappers over the AOT-compiled kernels in ``flashcontrast._C``.

``_C`` is torch-free: it takes device pointers, sizes, element strides, a dtype name and the
stream as integers. This module allocates every output and workspace with torch on the
inputs' device, makes that device current and passes its current stream, so the kernels
run where and when torch expects. Nothing here synchronizes with the host.

CLIP InfoNCE (contract: ``flashcontrast.backends``): ``clip_forward`` / ``clip_backward``.
Kernels: csrc/kernels/clip.cu (64 x 64 tiles, fp32 accumulation; WMMA tensor cores for
fp16/bf16, SIMT FFMA for fp32; 4 GEMM-equivalents per training step). Inputs are used
with their strides, never copied. Workspaces (float32): forward 2 (G + H) N with
G + H <= 2 x SMs + 1, backward (1 + SPLIT) N D with SPLIT <= 4 (sizes from ``_C``).

``unavailable_reason`` tells the dispatcher why the backend cannot run, so that
``backend="cuda"`` fails with a sentence, not a crash; ``OBJECTIVES`` names the objectives
the compiled extension has kernels for.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _cuda_ext

__all__ = ["OBJECTIVES", "clip_backward", "clip_forward", "unavailable_reason"]

_C = _cuda_ext._C

#: Objectives with kernels in this build of ``_C`` (empty without ``_C``).
OBJECTIVES: frozenset = (
    frozenset({"clip"})
    if _C is not None and hasattr(_C, "clip_forward") and hasattr(_C, "clip_backward")
    else frozenset()
)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the compiled extension can run on ``device``, else why it cannot."""
    if not _cuda_ext.HAS_C:
        return _cuda_ext.C_UNAVAILABLE_REASON
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got tensors on {device}"
    return None


def _check(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], objective: str) -> None:
    """Raise before touching ``_C``: everything it would otherwise crash or misread on."""
    reason = unavailable_reason(a.device)
    if reason is None and objective not in OBJECTIVES:
        reason = f"this build of flashcontrast._C has no {objective} kernels"
    if reason is not None:
        raise RuntimeError(f"flashcontrast CUDA backend cannot run {objective}: {reason}")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _DTYPE_NAMES:
        raise TypeError(
            f"CUDA {objective} kernels take float32, float16 or bfloat16 a and b of one dtype, "
            f"got {a.dtype} and {b.dtype} (float64: use backend='torch' or 'reference')"
        )
    for name, t in (("b", b), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device}, a on {a.device}")
    if scale.numel() != 1 or (bias is not None and bias.numel() != 1):
        raise ValueError("scale and bias must be single-element tensors")


def _scalar(t: Tensor) -> Tensor:
    """A float32 one-element device tensor (a no-op for the contract's 0-d float32)."""
    return t.detach().reshape(()).to(torch.float32).contiguous()


def _launch_args(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]) -> tuple:
    n, d = a.shape
    return (
        a.data_ptr(), b.data_ptr(), n, d,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        _DTYPE_NAMES[a.dtype],
        scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
    )  # fmt: skip


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def clip_forward(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """(row_lse, col_lse, diag), each (N,) float32, of S = scale * a @ b^T + bias."""
    _check(a, b, scale, bias, "clip")
    n, d = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    row_lse, col_lse, diag = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    if n == 0:
        return row_lse, col_lse, diag
    scale = _scalar(scale)
    bias = None if bias is None else _scalar(bias)
    if d == 0:  # S = bias everywhere; no kernel needed
        b0 = bias if bias is not None else torch.zeros((), **f32)
        row_lse.copy_(b0 + torch.log(torch.full((), float(n), **f32)))
        col_lse.copy_(row_lse)
        diag.copy_(b0)
        return row_lse, col_lse, diag
    with torch.cuda.device(a.device):
        ws = torch.empty(_C.clip_forward_workspace_elems(n, d, _device_index(a.device)), **f32)
        _C.clip_forward(
            *_launch_args(a, b, scale, bias),
            row_lse.data_ptr(), col_lse.data_ptr(), diag.data_ptr(),
            ws.data_ptr(), ws.numel(),
            torch.cuda.current_stream(a.device).cuda_stream,
        )  # fmt: skip
    return row_lse, col_lse, diag


def clip_backward(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    row_lse: Tensor,
    col_lse: Tensor,
    grad: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(da, db, dscale, dbias) for dL/dL_clip = grad; da/db in the input dtype."""
    _check(a, b, scale, bias, "clip")
    n, d = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    da = torch.empty((n, d), dtype=a.dtype, device=a.device)
    db = torch.empty((n, d), dtype=b.dtype, device=a.device)
    dscale, dbias = torch.empty((), **f32), torch.empty((), **f32)
    if n == 0 or d == 0:
        return da.zero_(), db.zero_(), dscale.zero_(), dbias.zero_()
    for name, t in (("row_lse", row_lse), ("col_lse", col_lse)):
        if t.shape != (n,) or t.device != a.device:
            raise ValueError(
                f"{name} must be ({n},) on {a.device}, got {tuple(t.shape)} on {t.device}"
            )
    row_lse = row_lse.detach().to(torch.float32).contiguous()  # no copy in the normal case
    col_lse = col_lse.detach().to(torch.float32).contiguous()
    scale, grad = _scalar(scale), _scalar(grad.to(a.device))
    bias = None if bias is None else _scalar(bias)
    with torch.cuda.device(a.device):
        ws = torch.empty(_C.clip_backward_workspace_elems(n, d, _device_index(a.device)), **f32)
        _C.clip_backward(
            *_launch_args(a, b, scale, bias),
            row_lse.data_ptr(), col_lse.data_ptr(), grad.data_ptr(),
            da.data_ptr(), db.data_ptr(), dscale.data_ptr(), dbias.data_ptr(),
            ws.data_ptr(), ws.numel(),
            torch.cuda.current_stream(a.device).cuda_stream,
        )  # fmt: skip
    return da, db, dscale, dbias
