"""MV-InfoNCE and MV-DHEL (objectives.md section 3): checks, torch.library ops, autograd,
public API.

With views u_il (sample i, view l; V views of N samples) and s = 1 / tau, as the code of
pakoromilas/Multi-View-CL (``MVINFONCE``, ``MVDHEL``) computes them:

    MV-InfoNCE:  L = (1/N) sum_i [ LSE_l LSE_{(j,m) != (i,l)} s u_il.u_jm
                                   - LSE_{l != l'} s u_il.u_il' ]
    MV-DHEL:     L = (1/N) sum_i [ sum_l LSE_{j != i} s u_il.u_jl - LSE_{l < l'} s u_il.u_il' ]

The negatives are row logsumexps of a symmetric self-similarity with its diagonal
excluded exactly: of the whole stacked (V N, V N) matrix for MV-InfoNCE, of the V per-view
(N, N) blocks for MV-DHEL. One op, ``flashcontrast::selfsim_rowlse`` (contract in
backends/blockwise/multiview.py), computes them without materializing any of it; the
positives (O(V^2 N D)) and the reductions are plain torch, differentiated by autograd.

Groups (optional integer tensor (N,) of group ids): two DIFFERENT samples j != i with the
same id are not negatives of each other, so every similarity between them (any views)
leaves the negative sums. The positives never change, and in MV-InfoNCE the other views of
sample i itself stay in its denominator (as the published code has them). All ids distinct
is the same as no groups. A row left with no negative (MV-DHEL when every other sample
shares i's group) has an empty LSE = -inf, and the loss is -inf (as the reference's is for
N = 1): nothing checks for that, since it would need a host sync.

Views: a (V, N, D) tensor is used in place (the Triton kernels read any strides; the torch
backend casts half inputs to float32 and reshapes to (V N, D), copying only when the
strides do not allow a view); a sequence of V (N, D) tensors costs one torch.stack.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _dispatch, reference, reference_groups
from .._amp import autocast_off
from .._ops import backend_module
from .._validation import (
    FEATURE_DTYPES,
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_strided,
)

__all__ = [
    "MultiviewDHELLoss",
    "MultiviewInfoNCELoss",
    "multiview_dhel_loss",
    "multiview_infonce_loss",
]

Views = Union[Tensor, Sequence[Tensor]]


# ----------------------------------------------------------------------------- ops


# The forward reads u (any dtype: the kernels' tensor-core path for 16-bit u); the
# gradient goes to u_acc, u in the accumulation dtype, which the positives read too. Near
# convergence the two gradients nearly cancel (the softmax mass sits on the positives), so
# they must meet in fp32 and be rounded to u's dtype once, by u_acc's cast; rounding each
# to bf16 first loses the difference (tests/test_half_precision_gradients.py). For fp32
# and float64 u, u_acc is u itself.


@torch.library.custom_op("flashcontrast::selfsim_rowlse", mutates_args=())
@autocast_off
def selfsim_rowlse(
    u: Tensor,
    u_acc: Tensor,
    scale: Tensor,
    per_view: bool,
    groups: Optional[Tensor],
    backend: str,
) -> Tensor:
    """(V, N) row LSEs of scale * <u_li, u_mj> over the allowed columns (see module doc).
    u_acc: u in the accumulation dtype; read by nothing here, it receives the gradient."""
    return backend_module(backend, "multiview").selfsim_rowlse_forward(u, scale, per_view, groups)


@selfsim_rowlse.register_fake
def _selfsim_rowlse_fake(u, u_acc, scale, per_view, groups, backend):
    return u.new_empty(u.shape[:2], dtype=accumulation_dtype(u.dtype))


@torch.library.custom_op("flashcontrast::selfsim_rowlse_bwd", mutates_args=())
@autocast_off
def selfsim_rowlse_bwd(
    u: Tensor,
    scale: Tensor,
    per_view: bool,
    groups: Optional[Tensor],
    row_lse: Tensor,
    grad_rows: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(du in the accumulation dtype, dscale) of sum grad_rows * row_lse."""
    return backend_module(backend, "multiview").selfsim_rowlse_backward(
        u, scale, per_view, groups, row_lse, grad_rows
    )


@selfsim_rowlse_bwd.register_fake
def _selfsim_rowlse_bwd_fake(u, scale, per_view, groups, row_lse, grad_rows, backend):
    acc = accumulation_dtype(u.dtype)
    du = u.new_empty(u.shape, dtype=acc)
    return du, u.new_empty((), dtype=acc)


def _setup_context(ctx, inputs, output) -> None:
    u, _u_acc, scale, per_view, groups, backend = inputs
    ctx.per_view = per_view
    ctx.backend = backend
    ctx.save_for_backward(u, scale, groups, output)


def _backward(ctx, grad_rows):
    u, scale, groups, row_lse = ctx.saved_tensors
    du, dscale = selfsim_rowlse_bwd(
        u, scale, ctx.per_view, groups, row_lse, grad_rows.to(row_lse.dtype), ctx.backend
    )
    return None, du, dscale.to(scale.dtype), None, None, None


torch.library.register_autograd(
    "flashcontrast::selfsim_rowlse", _backward, setup_context=_setup_context
)


# ----------------------------------------------------------------------------- checks


def _stack(views: Views) -> Tensor:
    """(V, N, D) features: the tensor itself, or one torch.stack of a sequence."""
    if isinstance(views, Tensor):
        u = views
        check_strided("views", u)
        if u.dim() != 3:
            raise ValueError(
                f"views must be (V, N, D) or a sequence of (N, D), got {tuple(u.shape)}"
            )
    else:
        if isinstance(views, (str, bytes)) or not isinstance(views, Sequence):
            raise TypeError(
                f"views must be a (V, N, D) tensor or a sequence of (N, D) tensors, "
                f"got {type(views).__name__}"
            )
        views = list(views)
        for k, x in enumerate(views):
            if not isinstance(x, Tensor):
                raise TypeError(f"views[{k}] must be a torch.Tensor, got {type(x).__name__}")
            check_strided(f"views[{k}]", x)
            if x.dim() != 2:
                raise ValueError(f"views[{k}] must be 2-D (N, D), got {tuple(x.shape)}")
        if len(views) < 2:
            raise ValueError(f"multi-view losses need V >= 2 views, got V = {len(views)}")
        first = views[0]
        for k, x in enumerate(views[1:], 1):
            if x.shape != first.shape:
                raise ValueError(
                    f"all views must share one (N, D) shape, got {tuple(first.shape)} "
                    f"and {tuple(x.shape)} (views[{k}])"
                )
            if x.dtype != first.dtype:
                raise TypeError(f"all views must share a dtype, got {first.dtype} and {x.dtype}")
            if x.device != first.device:
                raise ValueError(
                    f"all views must be on one device, got {first.device} and {x.device}"
                )
        u = torch.stack(views)  # the one copy a sequence costs
    if u.dtype not in FEATURE_DTYPES:
        raise TypeError(f"views must be float32, float16, bfloat16 or float64, got {u.dtype}")
    v, n, d = u.shape
    if v < 2:
        raise ValueError(f"multi-view losses need V >= 2 views, got V = {v}")
    if n == 0:
        raise ValueError("views is an empty batch (N = 0): the loss is undefined")
    if d == 0:
        raise ValueError("views have no features (D = 0)")
    return u


def _check_groups(groups: Optional[Tensor], u: Tensor) -> Optional[Tensor]:
    if groups is None:
        return None
    if not isinstance(groups, Tensor):
        raise TypeError(f"groups must be an integer tensor (N,), got {type(groups).__name__}")
    if groups.dtype == torch.bool or groups.is_floating_point() or groups.is_complex():
        raise TypeError(f"groups must be an integer tensor, got {groups.dtype}")
    if groups.shape != (u.shape[1],):
        raise ValueError(
            f"groups must have shape (N,) = ({u.shape[1]},), got {tuple(groups.shape)}"
        )
    if groups.device != u.device:
        raise ValueError(f"groups is on {groups.device} but the views are on {u.device}")
    return groups


def _prepare(views, logit_scale, groups, backend):
    u = _stack(views)
    g = _check_groups(groups, u)
    scale = as_scalar_tensor("logit_scale", logit_scale, u)
    chosen = _dispatch.resolve("multiview", u.device, backend, u.dtype)
    if chosen == "triton" and u.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32, float16 and bfloat16, not float64")
    return u, g, scale, chosen


def _positive_logits(u_acc: Tensor, scale: Tensor) -> Tensor:
    """(N, V, V) s u_il . u_il' in the accumulation dtype (O(V^2 N D), a torch einsum)."""
    return scale * torch.einsum("lnd,knd->nlk", u_acc, u_acc)


# ----------------------------------------------------------------------------- public API


@autocast_off
def multiview_infonce_loss(
    views: Views,
    logit_scale: Scalar,
    *,
    groups: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """MV-InfoNCE (pakoromilas/Multi-View-CL ``MVINFONCE``), memory-linear.

    L = (1/N) sum_i [ LSE_l LSE_{(j,m) != (i,l)} s u_il.u_jm - LSE_{l != l'} s u_il.u_il' ]

    Args:
        views: (V, N, D) tensor or a sequence of V (N, D) tensors (stacked once), V >= 2,
            float32, float16, bfloat16 or float64. Used as given: normalize them first, as
            the published code does internally.
        logit_scale: s = 1 / tau, a float or a one-element tensor (gets a gradient).
        groups: optional integer tensor (N,) of group ids: different samples of one group
            are not negatives of each other (see the module docstring).
        backend: "auto", "cuda", "triton", "torch" or "reference".

    Returns:
        The mean loss, 0-d: float32 for 32/16-bit features, float64 for float64.
    """
    u, g, scale, chosen = _prepare(views, logit_scale, groups, backend)
    if chosen == "reference":
        if g is None:
            return reference.multiview_infonce_loss(u, scale)
        return reference_groups.multiview_infonce_loss_masked(u, scale, g)
    v = u.shape[0]
    u_acc = u.to(scale.dtype)
    row_lse = selfsim_rowlse(u, u_acc, scale, False, g, chosen)  # (V, N)
    log_den = torch.logsumexp(row_lse, dim=0)
    pos = _positive_logits(u_acc, scale)
    eye = torch.eye(v, dtype=torch.bool, device=u.device)
    log_num = torch.logsumexp(pos.masked_fill(eye, float("-inf")).flatten(1), dim=1)
    # Each sample's term is >= 0 exactly (the denominator's set holds the numerator's),
    # but the two LSEs are rounded apart (at N = 1 they cover the same logits): the value
    # is clamped at 0, the gradient left the unclamped one (a rounding correction).
    term = log_den - log_num
    return (term - term.detach().clamp_max(0)).mean()


@autocast_off
def multiview_dhel_loss(
    views: Views,
    logit_scale: Scalar,
    *,
    groups: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """MV-DHEL (pakoromilas/Multi-View-CL ``MVDHEL``), memory-linear.

    L = (1/N) sum_i [ sum_l LSE_{j != i} s u_il.u_jl - LSE_{l < l'} s u_il.u_il' ]

    With V = 2 this is DHEL (pakoromilas/DHEL-KCL, include_augs=True). Arguments as
    :func:`multiview_infonce_loss`; N >= 2 (with N = 1 there are no negatives).
    """
    u, g, scale, chosen = _prepare(views, logit_scale, groups, backend)
    v, n, _ = u.shape
    if n < 2:
        raise ValueError("MV-DHEL needs N >= 2 samples: its uniformity term has no negatives")
    if chosen == "reference":
        if g is None:
            return reference.multiview_dhel_loss(u, scale)
        return reference_groups.multiview_dhel_loss_masked(u, scale, g)
    u_acc = u.to(scale.dtype)
    row_lse = selfsim_rowlse(u, u_acc, scale, True, g, chosen)  # (V, N)
    log_neg = row_lse.sum(dim=0)
    pos = _positive_logits(u_acc, scale)
    rows, cols = torch.triu_indices(v, v, offset=1, device=u.device)
    log_pos = torch.logsumexp(pos[:, rows, cols], dim=1)
    return (log_neg - log_pos).mean()


class MultiviewInfoNCELoss(torch.nn.Module):
    """:func:`multiview_infonce_loss` as a module: ``forward(views, logit_scale, groups=None)``."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, views: Views, logit_scale: Scalar, groups: Optional[Tensor] = None):
        return multiview_infonce_loss(views, logit_scale, groups=groups, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class MultiviewDHELLoss(torch.nn.Module):
    """:func:`multiview_dhel_loss` as a module: ``forward(views, logit_scale, groups=None)``."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, views: Views, logit_scale: Scalar, groups: Optional[Tensor] = None):
        return multiview_dhel_loss(views, logit_scale, groups=groups, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
