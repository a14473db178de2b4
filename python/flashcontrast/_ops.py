"""torch.library ops and their autograd: the layer every backend shares.

Each objective is two custom ops, a forward that returns the loss and O(N) statistics and
a backward that recomputes tiles from them, with fake (meta) implementations so that
``torch.compile(fullgraph=True)`` traces callers without graph breaks. The backward is
attached with ``torch.library.register_autograd``: that plays the role of DESIGN.md's
per-objective autograd Function, and unlike a Python autograd.Function it is traced by
AOTAutograd as one opaque op in both the forward and the backward graph.

``backend`` is a resolved name ("torch", "triton" or "cuda"), passed as a string so the
choice is part of the traced graph.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ._validation import accumulation_dtype


def backend_module(name: str) -> ModuleType:
    """The module that implements the contract of ``flashcontrast.backends`` for ``name``."""
    if name == "torch":
        from .backends import blockwise

        return blockwise
    if name == "triton":
        from .backends.triton import clip

        return clip
    if name == "cuda":
        from .backends import cuda

        return cuda
    raise ValueError(f"no kernel backend named {name!r}")


# ----------------------------------------------------------------------------- CLIP


def clip_loss_from_stats(row_lse: Tensor, col_lse: Tensor, diag: Tensor) -> Tensor:
    """L = 1/2 [mean_i (LSE_j S_ij - S_ii) + mean_j (LSE_i S_ij - S_jj)]."""
    return 0.5 * ((row_lse - diag).mean() + (col_lse - diag).mean())


@torch.library.custom_op("flashcontrast::clip_fwd", mutates_args=())
def clip_fwd(
    a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (0-d), row LSE (N,) and column LSE (N,) of S = scale * a @ b^T + bias."""
    row_lse, col_lse, diag = backend_module(backend).clip_forward(a, b, scale, bias)
    return clip_loss_from_stats(row_lse, col_lse, diag), row_lse, col_lse


@clip_fwd.register_fake
def _clip_fwd_fake(a, b, scale, bias, backend):
    acc = accumulation_dtype(a.dtype)
    n = a.shape[0]
    return a.new_empty((), dtype=acc), a.new_empty(n, dtype=acc), a.new_empty(n, dtype=acc)


@torch.library.custom_op("flashcontrast::clip_bwd", mutates_args=())
def clip_bwd(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    row_lse: Tensor,
    col_lse: Tensor,
    grad: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dA (N, D), dB (N, D), d(scale) and d(bias) (0-d) for upstream gradient ``grad``."""
    return backend_module(backend).clip_backward(a, b, scale, bias, row_lse, col_lse, grad)


@clip_bwd.register_fake
def _clip_bwd_fake(a, b, scale, bias, row_lse, col_lse, grad, backend):
    acc = accumulation_dtype(a.dtype)
    return (
        torch.empty_like(a, memory_format=torch.contiguous_format),
        torch.empty_like(b, memory_format=torch.contiguous_format),
        a.new_empty((), dtype=acc),
        a.new_empty((), dtype=acc),
    )


def _clip_setup_context(ctx, inputs, output) -> None:
    a, b, scale, bias, backend = inputs
    _, row_lse, col_lse = output
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _clip_backward(ctx, grad_loss, _grad_row, _grad_col):
    a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors
    da, db, dscale, dbias = clip_bwd(
        a, b, scale, bias, row_lse, col_lse, grad_loss.to(row_lse.dtype), ctx.backend
    )
    return da, db, dscale, (dbias if ctx.has_bias else None), None


torch.library.register_autograd(
    "flashcontrast::clip_fwd", _clip_backward, setup_context=_clip_setup_context
)
