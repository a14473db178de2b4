"""GRAM, the Gramian-volume contrastive loss (docs/objectives.md section 4): checks, per-column
constants, torch.library ops, autograd, public API.

Anchor t_i (N, D) and K = M - 1 other modalities o^1_j .. o^K_j (N, D each). With
H_j = Gram(o^1_j, ..., o^K_j) (K x K) and u_ij = (<t_i, o^1_j>, ..., <t_i, o^K_j>),

    det G_ij = det(H_j) |t_i|^2 - u_ij^T adj(H_j) u_ij       (Schur / cofactor identity)
    V_ij = sqrt(max(det G_ij, 0)),  logits L_ij = -s V_ij
    L = 1/2 [CE_rows(L) + CE_cols(L)]    (torch's label-smoothed cross entropy, both ways)

so no (N, N, M, M) Gram tensor is ever formed: the backends need K dot-product tiles per
logit tile plus a quadratic form with per-column constants det_h_j = det H_j and
adj_h_j = adj H_j. Those constants are computed here, once: H_j by the op
``flashcontrast::gram_matrices`` (row chunks upcast, so autograd keeps the features in
their own dtype and no float32 copy), det and adj in O(N K^3)-ish torch ops on H
(:func:`column_constants_from_gram`), by explicit Laplace (cofactor) expansion: a polynomial in the
entries of H_j, so they and their gradients are exact and finite even where H_j is
singular (torch.linalg.det / inv have unreliable gradients there). The backends return
the gradients w.r.t. det_h and adj_h (col_tt, -col_uu, see ``flashcontrast.backends``), and
autograd chains them through this differentiable precompute to the other modalities.

Degenerate volumes: a computed det_ij carries rounding of order eps B_ij, B_ij =
|t_i|^2 prod_r |o^r_j|^2 (Hadamard's bound, det <= B). Where det_ij <= rtol B_ij
(``reference.gram_degenerate_rtol``: 64 eps of the accumulation dtype) the volume is
taken as exactly 0, with derivative 0: collinear or coincident vectors (a duplicated
modality, an anchor equal to another modality's vector) give the same loss and the same,
finite gradient on every backend, whatever the rounding. The backends get the per-column
part of the floor, floor_h_j = rtol prod_r |o^r_j|^2 (:func:`floor_from_gram`), and
compare det_ij with tt_i floor_h_j. Above the floor V = sqrt(det) with its true gradient.

Differences from the published code (ispamm/GRAM ``utils/volume.py``): it takes
``sqrt(|det|)`` of an (N, N, M, M) float32 tensor, whose gradient is NaN where det = 0
and rounding noise near it, and whose value there is sqrt of rounding noise (here 0).
NaN or inf inputs give a NaN loss (the published code's NaN volume is kept, not mapped
to 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch, reference
from .._amp import autocast_off
from .._module import BackendLoss
from .._ops import backend_module
from .._validation import (
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_features,
    check_pair,
)
from ..backends.gram import GramBlock, GramCoefs

#: Most other modalities (K = M - 1) supported. The Laplace expansion of the per-column
#: constants costs O(K^2 2^K) (N,)-vector ops, and the Triton kernels unroll over K.
MAX_OTHERS = 7

#: Most others the Triton and CUDA kernels take: they hold the K tiles <t, o^r> of a program
#: at once (triton/gram.py ``MAX_OTHERS``, csrc/include/flashcontrast/gram.h
#: ``kGramMaxK``). More run on "torch" (``_dispatch.VARIANTS["gram_many_others"]``).
KERNEL_MAX_OTHERS = 5


def gram_variant(k: int) -> Optional[str]:
    """The dispatch variant of a GRAM call with ``k`` others: "gram_many_others" above
    :data:`KERNEL_MAX_OTHERS`, else None."""
    return "gram_many_others" if k > KERNEL_MAX_OTHERS else None


# ----------------------------------------------------------------------------- constants


def _laplace(h: list, rows: tuple, cols: tuple, memo: dict, one: Tensor) -> Tensor:
    """det of the submatrix h[rows][cols] by expansion along its first row (memoised)."""
    if not rows:
        return one
    key = (rows, cols)
    if key in memo:
        return memo[key]
    r0, rest = rows[0], rows[1:]
    total = None
    for idx, c in enumerate(cols):
        term = h[r0][c] * _laplace(h, rest, cols[:idx] + cols[idx + 1 :], memo, one)
        if total is None:
            total = term
        elif idx % 2:
            total = total - term
        else:
            total = total + term
    memo[key] = total
    return total


def column_constants(others: Tensor) -> tuple[Tensor, Tensor]:
    """(det_h (N,), adj_h (N, K, K)) of H_j = Gram(o^1_j, ..., o^K_j), differentiably.

    Args:
        others: (K, N, D) in the accumulation dtype (float32 or float64).

    det and adjugate are computed by explicit cofactor (Laplace) expansion of the batched
    K x K matrices: polynomials in the entries, exact derivatives everywhere, including
    singular H_j (collinear or coincident other modalities). adj H_j is symmetric.
    """
    k = others.shape[0]
    h = [[None] * k for _ in range(k)]
    for r in range(k):
        for s in range(r, k):
            h[r][s] = h[s][r] = (others[r] * others[s]).sum(dim=-1)  # (N,)
    return _constants(h)


def column_constants_from_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`column_constants` from the (N, K, K) Gram matrices H_j themselves (autograd
    then saves O(N K^2), not the features)."""
    k = gram.shape[-1]
    return _constants([[gram[:, r, s] for s in range(k)] for r in range(k)])


def _constants(h: list) -> tuple[Tensor, Tensor]:
    """(det, adj) of the batched K x K matrices given entry by entry, h[r][s] (N,)."""
    k = len(h)
    one = torch.ones_like(h[0][0])
    memo: dict = {}
    full = tuple(range(k))
    det_h = _laplace(h, full, full, memo, one)
    adj = [[None] * k for _ in range(k)]
    for r in range(k):
        for c in range(r, k):
            minor = _laplace(h, full[:r] + full[r + 1 :], full[:c] + full[c + 1 :], memo, one)
            adj[r][c] = adj[c][r] = minor if (r + c) % 2 == 0 else -minor
    adj_h = torch.stack([torch.stack(row, dim=-1) for row in adj], dim=-2)  # (N, K, K)
    return det_h, adj_h


# Rows of one chunk of the Gram products: (K, rows, D) in float32, about 4 MiB.
_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(others: Tensor):
    k, n, d = others.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, k * d))
    for start in range(0, n, step):
        yield start, min(n, start + step)


@torch.library.custom_op("flashcontrast::gram_matrices", mutates_args=())
@autocast_off
def gram_matrices(others: Tensor) -> Tensor:
    """H_j = Gram(o^1_j, ..., o^K_j), (N, K, K) in the accumulation dtype, from others
    (K, N, D) upcast a row chunk at a time: no copy of the features outlives the call."""
    acc = accumulation_dtype(others.dtype)
    out = others.new_empty((others.shape[1], others.shape[0], others.shape[0]), dtype=acc)
    for start, stop in _row_chunks(others):
        o = others[:, start:stop].to(acc)
        out[start:stop] = torch.einsum("knd,lnd->nkl", o, o)
    return out


@gram_matrices.register_fake
def _gram_matrices_fake(others):
    k, n, _ = others.shape
    return others.new_empty((n, k, k), dtype=accumulation_dtype(others.dtype))


@torch.library.custom_op("flashcontrast::gram_matrices_bwd", mutates_args=())
@autocast_off
def gram_matrices_bwd(others: Tensor, grad: Tensor) -> Tensor:
    """d others (K, N, D), others' dtype: d o^r_j = sum_s (dH_j[r, s] + dH_j[s, r]) o^s_j."""
    acc = accumulation_dtype(others.dtype)
    out = torch.empty_like(others, memory_format=torch.contiguous_format)
    for start, stop in _row_chunks(others):
        g = grad[start:stop].to(acc)
        g = g + g.transpose(1, 2)
        out[:, start:stop] = torch.einsum("nkl,lnd->knd", g, others[:, start:stop].to(acc))
    return out


@gram_matrices_bwd.register_fake
def _gram_matrices_bwd_fake(others, grad):
    return torch.empty_like(others, memory_format=torch.contiguous_format)


def _gram_matrices_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _gram_matrices_backward(ctx, grad):
    (others,) = ctx.saved_tensors
    return gram_matrices_bwd(others, grad)


torch.library.register_autograd(
    "flashcontrast::gram_matrices", _gram_matrices_backward, setup_context=_gram_matrices_setup
)


def floor_from_gram(gram: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`degeneracy_floor` from the Gram matrices (N, K, K): rtol prod_r H_j[r, r]."""
    with torch.no_grad():
        diag = gram.diagonal(dim1=-2, dim2=-1)  # (N, K): |o^r_j|^2
        return diag.prod(dim=-1).mul_(reference.gram_degenerate_rtol(dtype))


def degeneracy_floor(others: Tensor) -> Tensor:
    """floor_h (N,) = rtol prod_r |o^r_j|^2, the per-column part of the degeneracy floor
    (module docstring): det_ij <= |t_i|^2 floor_h_j counts as a zero volume.

    Args:
        others: (K, N, D) in the accumulation dtype (float32 or float64).

    Not differentiated: a threshold, not a term of the loss. NaN in o^r_j gives a NaN
    floor, and every comparison with it is False, so the volume is NaN (not 0).
    """
    with torch.no_grad():
        norms = (others * others).sum(dim=-1)  # (K, N)
        return norms.prod(dim=0).mul_(reference.gram_degenerate_rtol(others.dtype))


def gram_loss_from_stats(
    row_lse: Tensor,
    col_lse: Tensor,
    diag: Tensor,
    row_sum: Tensor,
    col_sum: Tensor,
    label_smoothing: float,
) -> Tensor:
    """1/2 [mean_i CE_row_i + mean_j CE_col_j], torch's label smoothing eps:
    CE_row_i = LSE_j L_ij - (1 - eps) L_ii - eps / N sum_j L_ij (columns alike)."""
    eps, n = label_smoothing, row_lse.shape[0]
    rows = row_lse - (1.0 - eps) * diag - (eps / n) * row_sum
    cols = col_lse - (1.0 - eps) * diag - (eps / n) * col_sum
    return 0.5 * (rows.mean() + cols.mean())


# ----------------------------------------------------------------------------- ops


@torch.library.custom_op("flashcontrast::gram_fwd", mutates_args=())
@autocast_off
def gram_fwd(
    anchor: Tensor,
    others: Tensor,
    scale: Tensor,
    det_h: Tensor,
    adj_h: Tensor,
    floor_h: Tensor,
    label_smoothing: float,
    gradient: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (0-d), row LSE (N,) and column LSE (N,) of the logits -scale * V. ``gradient``
    ("full" or "published") only selects the backward (see :func:`gram_loss`)."""
    module = backend_module(backend, "gram")
    stats = module.gram_forward(GramBlock(anchor, others, scale, det_h, adj_h, floor_h))
    row_lse, col_lse, diag, row_sum, col_sum = stats
    loss = gram_loss_from_stats(row_lse, col_lse, diag, row_sum, col_sum, label_smoothing)
    return loss, row_lse, col_lse


@gram_fwd.register_fake
def _gram_fwd_fake(
    anchor, others, scale, det_h, adj_h, floor_h, label_smoothing, gradient, backend
):
    acc = accumulation_dtype(anchor.dtype)
    n = anchor.shape[0]
    return (
        anchor.new_empty((), dtype=acc),
        anchor.new_empty(n, dtype=acc),
        anchor.new_empty(n, dtype=acc),
    )


@torch.library.custom_op("flashcontrast::gram_bwd", mutates_args=())
@autocast_off
def gram_bwd(
    anchor: Tensor,
    others: Tensor,
    scale: Tensor,
    det_h: Tensor,
    adj_h: Tensor,
    floor_h: Tensor,
    row_lse: Tensor,
    col_lse: Tensor,
    grad: Tensor,
    label_smoothing: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_anchor, d_others_u, dscale, col_tt, col_uu) of the backend contract."""
    block = GramBlock(anchor, others, scale, det_h, adj_h, floor_h)
    coefs = GramCoefs(row_lse, col_lse, grad, label_smoothing)
    return backend_module(backend, "gram").gram_backward(block, coefs)


@gram_bwd.register_fake
def _gram_bwd_fake(
    anchor, others, scale, det_h, adj_h, floor_h, row_lse, col_lse, grad, label_smoothing, backend
):
    acc = accumulation_dtype(anchor.dtype)
    k, n, _ = others.shape
    return (
        torch.empty_like(anchor, memory_format=torch.contiguous_format),
        torch.empty_like(others, memory_format=torch.contiguous_format),
        anchor.new_empty((), dtype=acc),
        anchor.new_empty(n, dtype=acc),
        anchor.new_empty((n, k, k), dtype=acc),
    )


def _gram_setup_context(ctx, inputs, output) -> None:
    anchor, others, scale, det_h, adj_h, floor_h, label_smoothing, gradient, backend = inputs
    _, row_lse, col_lse = output
    ctx.backend = backend
    ctx.label_smoothing = label_smoothing
    ctx.gradient = gradient
    ctx.save_for_backward(anchor, others, scale, det_h, adj_h, floor_h, row_lse, col_lse)
    ctx.mark_non_differentiable(row_lse, col_lse)


def _gram_backward(ctx, grad_loss, _grad_row, _grad_col):
    anchor, others, scale, det_h, adj_h, floor_h, row_lse, col_lse = ctx.saved_tensors
    consts = (anchor, others, scale, det_h, adj_h, floor_h)
    grad = grad_loss.to(row_lse.dtype)
    eps, backend = ctx.label_smoothing, ctx.backend
    if ctx.gradient == "full":
        d_anchor, d_others_u, dscale, col_tt, col_uu = gram_bwd(
            *consts, row_lse, col_lse, grad, eps, backend
        )
    else:
        # GRAM's published gradient: the anchor through the row term only, the others
        # through the column term only. The backward's tile coefficient is
        # g/(2N) (P_row + P_col - 2(1 - eps) I - 2 eps/N); an infinite column LSE drops
        # P_col, a row LSE lowered by log 2 doubles P_row, and g/2 halves the rest: the
        # row term alone, g/(2N) (P_row - (1 - eps) I - eps/N), and the column term alike.
        # Two backward sweeps instead of one; the forward is shared.
        inf = torch.full_like(row_lse, float("inf"))
        half, log2 = grad * 0.5, math.log(2.0)
        rows = gram_bwd(*consts, row_lse - log2, inf, half, eps, backend)
        cols = gram_bwd(*consts, inf, col_lse - log2, half, eps, backend)
        d_anchor, dscale = rows[0], rows[2] + cols[2]
        d_others_u, col_tt, col_uu = cols[1], cols[3], cols[4]
    # col_tt = dL/d det_h and col_uu = -dL/d adj_h: autograd carries them on through
    # column_constants (outside this op) to the other modalities.
    return d_anchor, d_others_u, dscale, col_tt, -col_uu, None, None, None, None


torch.library.register_autograd(
    "flashcontrast::gram_fwd", _gram_backward, setup_context=_gram_setup_context
)


# ----------------------------------------------------------------------------- public API


def _check_others(anchor: Tensor, others: object, check=check_features) -> list:
    """The K other modalities as a list, each checked by ``check(name, x)`` (the
    process-group version passes its shard check, which allows n_r = 0) and against the
    anchor's shape, dtype and device."""
    if isinstance(others, Tensor) or not isinstance(others, Sequence):
        raise TypeError(
            "others must be a list or tuple of (N, D) tensors, one per other modality, "
            f"got {type(others).__name__}"
        )
    others = list(others)
    if not others:
        raise ValueError("others is empty: GRAM needs at least one other modality (M >= 2)")
    if len(others) > MAX_OTHERS:
        raise ValueError(
            f"GRAM supports up to {MAX_OTHERS} other modalities (M <= {MAX_OTHERS + 1}), "
            f"got {len(others)}"
        )
    for k, o in enumerate(others):
        check(f"others[{k}]", o)
        check_pair("anchor", anchor, f"others[{k}]", o)
    return others


GRADIENTS = ("full", "published")


def _check_gradient(gradient: object) -> str:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    return gradient


def _check_label_smoothing(label_smoothing: object) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(
            f"label_smoothing must be a float in [0, 1), got {type(label_smoothing).__name__}"
        )
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return float(label_smoothing)


@autocast_off
def gram_loss(
    anchor: Tensor,
    others: Sequence[Tensor],
    logit_scale: Scalar,
    *,
    label_smoothing: float = 0.0,
    gradient: str = "full",
    backend: str = "auto",
) -> Tensor:
    """GRAM's volume contrastive loss, without the (N, N, M, M) Gram tensor or N x N logits.

    V_ij is the volume spanned by (t_i, o^1_j, ..., o^K_j), the logits are -logit_scale * V
    (small volume = aligned), and L = 1/2 [CE(L, arange N) + CE(L^T, arange N)] with
    ``label_smoothing`` in both, as ispamm/GRAM's training loss (d2a + a2d) with
    ``logit_scale = 1 / temperature`` (GRAM trains with label_smoothing=0.1).

    Unlike the published code the gradients are finite where det G_ij = 0 (collinear or
    coincident vectors): a determinant within rounding of 0 (below 64 eps of Hadamard's
    bound) is a zero volume with derivative 0, the same on every backend (module
    docstring). NaN or inf in the inputs give a NaN loss.

    Args:
        anchor: t, (N, D) float32, float16, bfloat16 or float64.
        others: list or tuple of K = M - 1 tensors o^k, each (N, D), same dtype and device
            as ``anchor``; 1 <= K <= MAX_OTHERS (7). They are stacked once into a
            (K, N, D) tensor: a visible O(K N D) copy.
        logit_scale: s = 1 / temperature, a float or a one-element tensor (gets a
            gradient when it requires one).
        label_smoothing: eps in [0, 1), applied in both cross entropies.
        gradient: "full" (default), the gradient of this loss; or "published", the
            gradient GRAM's training code (``model/gram.py``) produces: it computes the
            row term ("d2a") from ``volume_computation(feat_t, feat_v_all, ...)`` and the
            column term ("a2d") from ``volume_computation(feat_t_all, feat_v, ...)`` with
            the ``*_all`` tensors from a no-grad all_gather (even on one process), so the
            anchor gets the row term's gradient only and the other modalities the column
            term's only (the logit scale both). Same loss value; costs a second backward
            sweep. Not supported by backend="reference" (it differentiates the dense
            loss): use "torch".
        backend: "auto", "triton", "torch" or "reference" (see
            :func:`flashcontrast.backend_for`).

    Returns:
        The mean loss, a 0-d tensor: float32 for 32/16-bit features, float64 for float64.

    NaN or inf in the inputs are not checked for and propagate to the loss (NaN).
    """
    a = check_features("anchor", anchor)
    others = _check_others(a, others)
    scale = as_scalar_tensor("logit_scale", logit_scale, a)
    eps = _check_label_smoothing(label_smoothing)
    gradient = _check_gradient(gradient)
    chosen = _dispatch.resolve("gram", a.device, backend, a.dtype, gram_variant(len(others)))
    if chosen == "reference":
        if gradient != "full":
            raise ValueError('gradient="published" needs a kernel backend, not "reference"')
        return reference.gram_loss(a, others, scale, label_smoothing=eps)
    stacked = torch.stack(others)  # (K, N, D): the one visible copy of the others
    gram = gram_matrices(stacked)  # (N, K, K), saving only the features for its backward
    det_h, adj_h = column_constants_from_gram(gram)
    floor_h = floor_from_gram(gram, gram.dtype)
    loss, _, _ = gram_fwd(a, stacked, scale, det_h, adj_h, floor_h, eps, gradient, chosen)
    return loss


@autocast_off
def gram_volume(anchor: Tensor, others: Sequence[Tensor]) -> Tensor:
    """All (N_a, N_o) Gramian volumes V_ij = sqrt(max(det Gram(t_i, o^1_j, ..., o^K_j), 0)).

    MATERIALIZES the (N_a, N_o) volumes (and K such dot-product matrices) by design: it is
    for retrieval and evaluation (rank the candidates j of each anchor i by volume), not
    for training, which :func:`gram_loss` does in O(N D) memory. Row i = anchor sample,
    column j = the sample shared by the others; N_a and N_o may differ. Same formula and
    degeneracy floor as the loss (volume 0 and derivative 0 where det is within rounding
    of 0; NaN for NaN or inf inputs), differentiable.

    Args:
        anchor: (N_a, D). others: list or tuple of K >= 1 tensors (N_o, D), same dtype and
            device as ``anchor``.

    Returns:
        (N_a, N_o) volumes, float32 for 32/16-bit inputs, float64 for float64.
    """
    a = check_features("anchor", anchor)
    if isinstance(others, Tensor) or not isinstance(others, Sequence) or not others:
        raise TypeError("others must be a non-empty list or tuple of (N, D) tensors")
    others = list(others)
    for k, o in enumerate(others):
        check_features(f"others[{k}]", o)
        if o.shape[1] != a.shape[1] or o.shape[0] != others[0].shape[0]:
            raise ValueError(
                f"others[{k}] has shape {tuple(o.shape)}: every other must be (N_o, D) with "
                f"D = {a.shape[1]} and one N_o"
            )
        if o.dtype != a.dtype or o.device != a.device:
            raise TypeError(f"others[{k}] must share anchor's dtype and device")
    if len(others) > MAX_OTHERS:
        raise ValueError(f"GRAM supports up to {MAX_OTHERS} other modalities")
    acc = accumulation_dtype(a.dtype)
    t = a.to(acc)
    o = torch.stack(others).to(acc)  # (K, N_o, D)
    det_h, adj_h = column_constants(o)
    u = torch.matmul(t, o.transpose(1, 2))  # (K, N_a, N_o)
    q = torch.einsum("rij,jrs,sij->ij", u, adj_h, u)
    tt = (t * t).sum(dim=1)
    det = det_h[None, :] * tt[:, None] - q
    return reference._safe_sqrt(det, tt.detach()[:, None] * degeneracy_floor(o)[None, :])


class GramLoss(BackendLoss):
    """GRAM's volume contrastive loss as a module: ``GramLoss()(anchor, others, scale)``.

    Holds no parameters: the logit scale (1 / temperature) belongs to the model.

    Args:
        label_smoothing: eps in [0, 1) (GRAM's training uses 0.1).
        gradient: "full" or "published" (see :func:`gram_loss`).
        backend: "auto", "triton", "torch" or "reference".
    """

    option_names = ("label_smoothing", "gradient")

    def __init__(
        self, label_smoothing: float = 0.0, backend: str = "auto", *, gradient: str = "full"
    ) -> None:
        super().__init__(backend)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.gradient = _check_gradient(gradient)

    def forward(self, anchor: Tensor, others: Sequence[Tensor], logit_scale: Scalar) -> Tensor:
        """(N, D), K x (N, D), scalar -> 0-d mean loss."""
        return gram_loss(anchor, others, logit_scale, **self.call_options())
