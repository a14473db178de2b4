"""MV-InfoNCE and MV-DHEL (docs/objectives.md section 3): checks, torch.library ops, autograd,
public API.

With views u_il (sample i, view l; V views of N samples) and s = 1 / tau, as the code of
pakoromilas/Multi-View-CL (``MVINFONCE``, ``MVDHEL``) computes them:

    MV-InfoNCE:  L = (1/N) sum_i [ LSE_l LSE_{(j,m) != (i,l)} s u_il.u_jm
                                   - LSE_{l != l'} s u_il.u_il' ]
    MV-DHEL:     L = (1/N) sum_i [ sum_l LSE_{j != i} s u_il.u_jl - LSE_{l < l'} s u_il.u_il' ]

Both run on the pair engine (``backends/pair.py``) as self-similarities with the diagonal
excluded exactly. MV-InfoNCE is ONE "rows" sweep of the stacked (V N, D) matrix against
itself with sample(k) = k mod N: its row statistics are the denominator's inner LSE and,
as the positives' LSE, LSE_{l' != l} s u_il.u_il', so the whole loss, numerator
included, is differentiated inside the sweep (the positives subtracted in the tile, in
fp32, before any rounding to 16 bits). MV-DHEL's negatives are V "rows" sweeps, one per
view (every other sample a negative); its positives, LSE over the V (V - 1) / 2 pairs
l < l', are O(V^2 N D): ``flashcontrast::mv_positive_lse``, row chunks upcast in the
forward and again in the backward, so neither loss keeps a float32 copy of 16-bit views
until the backward (the ops save the views themselves and O(V N) statistics).

Groups (optional integer tensor (N,) of group ids): two DIFFERENT samples j != i with the
same id are not negatives of each other, so every similarity between them (any views)
leaves the negative sums. The positives never change, and in MV-InfoNCE the other views of
sample i itself stay in its denominator (as the published code has them). All ids distinct
is the same as no groups. A row left with no negative (MV-DHEL when every other sample
shares i's group) has an empty LSE = -inf, and the loss is -inf (as the reference's is for
N = 1): nothing checks for that, since it would need a host sync.

Views: a (V, N, D) tensor is used in place: MV-InfoNCE reshapes it to (V N, D), a view
whenever the strides allow one (a copy otherwise, e.g. for a (N, V, D) tensor transposed),
MV-DHEL sweeps each u[l] as it lies (the engine reads any strides); a sequence of V (N, D)
tensors costs one torch.stack.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _dispatch, reference, reference_groups
from .._amp import autocast_off
from .._module import BackendLoss
from .._validation import (
    FEATURE_DTYPES,
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_groups,
    check_pair,
    check_strided,
)
from ..backends.pair import Pair
from ._pair_op import sweep

__all__ = [
    "MultiviewDHELLoss",
    "MultiviewInfoNCELoss",
    "multiview_dhel_loss",
    "multiview_infonce_loss",
]

Views = Union[Tensor, Sequence[Tensor]]


# ----------------------------------------------------------------------------- ops


def _infonce_pair(n: int) -> Pair:
    """MV-InfoNCE: the (V N, D) stack against itself, the entry of a row with itself left
    out, sample(k) = k mod N, so a row's positives are its sample's other views."""
    return Pair("rows", positives=True, exclude_self=True, period=n)


#: MV-DHEL's negatives: one view against itself, every other sample a negative.
DHEL_PAIR = Pair("rows", positives=False, exclude_self=True)

# Rows of the positives' chunks: (V, rows, D) float32 per chunk, about 4 MiB.
_CHUNK_ELEMENTS = 1 << 20


def _chunks(u: Tensor):
    v, n, d = u.shape
    step = max(1, _CHUNK_ELEMENTS // (v * d))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _pair_logits(u_c: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(raw <u_il, u_il'> (c, P), rows, cols) over the P = V (V - 1) / 2 pairs l < l' of
    one chunk u_c (V, c, D) in the accumulation dtype."""
    v = u_c.shape[0]
    rows, cols = torch.triu_indices(v, v, offset=1, device=u_c.device)
    raw = torch.einsum("lnd,knd->nlk", u_c, u_c)[:, rows, cols]
    return raw, rows, cols


@torch.library.custom_op("flashcontrast::mv_positive_lse", mutates_args=())
@autocast_off
def mv_positive_lse(u: Tensor, scale: Tensor) -> Tensor:
    """(N,) LSE_{l < l'} s <u_il, u_il'> of u (V, N, D), in the accumulation dtype: MV-DHEL's
    positives, O(V^2 N D), in row chunks of u upcast (no copy of u outlives the call)."""
    acc = accumulation_dtype(u.dtype)
    out = u.new_empty(u.shape[1], dtype=acc)
    for start, stop in _chunks(u):
        raw, _, _ = _pair_logits(u[:, start:stop].to(acc), scale)
        out[start:stop] = torch.logsumexp(scale * raw, dim=1)
    return out


@mv_positive_lse.register_fake
def _mv_positive_lse_fake(u, scale):
    return u.new_empty(u.shape[1], dtype=accumulation_dtype(u.dtype))


@torch.library.custom_op("flashcontrast::mv_positive_lse_bwd", mutates_args=())
@autocast_off
def mv_positive_lse_bwd(u: Tensor, scale: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(du (V, N, D) in u's dtype, dscale) of sum_i grad_i LSE_{l < l'} s <u_il, u_il'>:
    w = grad_i softmax_pairs, du_il = s sum_l' w_ll' u_il' (w symmetric), dscale = sum w raw."""
    acc = accumulation_dtype(u.dtype)
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    dscale = torch.zeros((), dtype=acc, device=u.device)
    v = u.shape[0]
    for start, stop in _chunks(u):
        u_c = u[:, start:stop].to(acc)
        raw, rows, cols = _pair_logits(u_c, scale)
        w = torch.softmax(scale * raw, dim=1) * grad[start:stop, None]
        full = w.new_zeros(stop - start, v, v)
        full[:, rows, cols] = w
        full = full + full.transpose(1, 2)
        du[:, start:stop] = (scale * torch.einsum("nlk,knd->lnd", full, u_c)).to(u.dtype)
        dscale += (w * raw).sum()
    return du, dscale


@mv_positive_lse_bwd.register_fake
def _mv_positive_lse_bwd_fake(u, scale, grad):
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    return du, u.new_empty((), dtype=accumulation_dtype(u.dtype))


def _positives_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _positives_backward(ctx, grad):
    u, scale = ctx.saved_tensors
    du, dscale = mv_positive_lse_bwd(u, scale, grad.to(scale.dtype))
    return du, dscale.to(scale.dtype)


torch.library.register_autograd(
    "flashcontrast::mv_positive_lse", _positives_backward, setup_context=_positives_setup
)


# ----------------------------------------------------------------------------- checks


def _stack(views: Views, min_views: int = 2, dense=check_strided, empty_ok: bool = False) -> Tensor:
    """(V, N, D) features, V >= ``min_views``: the tensor itself, or one torch.stack of a
    sequence. ``dense(name, x)`` checks the layout; ``empty_ok``: N = 0 allowed (a
    process-group shard)."""
    if isinstance(views, Tensor):
        u = views
        dense("views", u)
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
            dense(f"views[{k}]", x)
            if x.dim() != 2:
                raise ValueError(f"views[{k}] must be 2-D (N, D), got {tuple(x.shape)}")
        if len(views) < min_views:
            raise ValueError(f"this loss needs V >= {min_views} views, got V = {len(views)}")
        for k, x in enumerate(views[1:], 1):
            check_pair("views[0]", views[0], f"views[{k}]", x)
        u = torch.stack(views)  # the one copy a sequence costs
    if u.dtype not in FEATURE_DTYPES:
        raise TypeError(f"views must be float32, float16, bfloat16 or float64, got {u.dtype}")
    v, n, d = u.shape
    if v < min_views:
        raise ValueError(f"this loss needs V >= {min_views} views, got V = {v}")
    if n == 0 and not empty_ok:
        raise ValueError("views is an empty batch (N = 0): the loss is undefined")
    if d == 0:
        raise ValueError("views have no features (D = 0)")
    return u


def _check_groups(groups: object, u: Tensor) -> Optional[Tensor]:
    """The (N,) group ids of the samples of u (V, N, D), checked
    (``_validation.check_groups``)."""
    return check_groups(groups, u.shape[1], u.device, "the views")


def _prepare(views, logit_scale, groups, backend):
    u = _stack(views)
    g = _check_groups(groups, u)
    scale = as_scalar_tensor("logit_scale", logit_scale, u)
    chosen = _dispatch.resolve("multiview", u.device, backend, u.dtype)
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
    v, n, d = u.shape
    flat = u.reshape(v * n, d)  # a view wherever u's strides allow one
    ids = None if g is None else (g.repeat(v),) * 2
    st = sweep(flat, None, scale, None, _infonce_pair(n), chosen, groups=ids)
    log_den = torch.logsumexp(st["row"].view(v, n), dim=0)  # LSE_l LSE_(j,m) != (i,l)
    log_num = torch.logsumexp(st["pos"].view(v, n), dim=0)  # LSE_l LSE_l' != l
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
    ids = None if g is None else (g, g)
    # sum_l LSE_{j != i} s u_il.u_jl: one sweep per view
    log_neg = sum(
        sweep(u[k], None, scale, None, DHEL_PAIR, chosen, groups=ids)["row"] for k in range(v)
    )
    log_pos = mv_positive_lse(u, scale)
    return (log_neg - log_pos).mean()


class MultiviewInfoNCELoss(BackendLoss):
    """:func:`multiview_infonce_loss` as a module: ``forward(views, logit_scale, groups=None)``."""

    def forward(self, views: Views, logit_scale: Scalar, groups: Optional[Tensor] = None):
        return multiview_infonce_loss(views, logit_scale, groups=groups, backend=self.backend)


class MultiviewDHELLoss(BackendLoss):
    """:func:`multiview_dhel_loss` as a module: ``forward(views, logit_scale, groups=None)``."""

    def forward(self, views: Views, logit_scale: Scalar, groups: Optional[Tensor] = None):
        return multiview_dhel_loss(views, logit_scale, groups=groups, backend=self.backend)
