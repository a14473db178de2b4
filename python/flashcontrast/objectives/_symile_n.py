"""Symile with "n" negatives as one op on the pair engine: ``flashcontrast::symile_n``.

For anchor modality a (the others o_1 .. o_K, K = M - 1, in list order) the candidates
of row i are the N columns of W^a = prod_k o_k[pi_ak] (N, D), with the candidate at
column i replaced by the positive logit p_i = s MIP(x^1_i, ..., x^M_i):

    ce_ai = LSE_j L^a_ij - p_i,   L^a_ij = s <x^a_i, W^a_j> (j != i),   L^a_ii = p_i.

Forward: per anchor one "rows" sweep of x^a against W^a with the positive logits as the
override (``backends/pair.py``), W^a built in the accumulation dtype and handed to the
engine in the inputs' dtype (as the tensor-core products read it), freed before the next
anchor. Returns ce (M, N) and the row (max, sum) pairs; saves only the inputs, the
permutations and the pairs (no W, no float32 copy of 16-bit features).

Backward (given dL/dce (M, N)): per anchor the engine's backward with coefficients
gr = dL/dce_a returns d x^a, dW^a (float32) and d p from the override (gr Q at the
positive); dW^a reaches the others by the product rule, d o_k[pi_ak] += dW^a prod_{k' != k}
o_k'[pi_ak'], scattered with index_add; p's total gradient, sum_a (dpos_a - dL/dce_a),
reaches every modality as dp s prod_{m' != m} x^m'. Everything meets in float32 and is
rounded to the inputs' dtype once, so the positive's two large, nearly cancelling parts
(the softmax weight on it and the -1) never round apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._amp import autocast_off
from .._ops import backend_module
from .._validation import accumulation_dtype
from ..backends.pair import Coefs, Pair, Stats, lse

#: row-only softmax; the positive (column i of row i) is overridden by p_i
PAIR = Pair("rows")


def _product(xs: list[Tensor], acc: torch.dtype) -> Tensor:
    """prod_k xs[k] elementwise, in ``acc``, (N, D)."""
    out = xs[0].to(acc)
    for x in xs[1:]:
        out = out * x.to(acc)
    return out


def _gathered(reps: list[Tensor], perms: Tensor, a: int) -> list[Tensor]:
    """The others of anchor a, each permuted: [o_k[pi_ak] for k], (N, D) each."""
    others = [r for o, r in enumerate(reps) if o != a]
    return [x[perms[a, k]] for k, x in enumerate(others)]


def mip(reps: list[Tensor], acc: torch.dtype) -> Tensor:
    """MIP(x^1_i, ..., x^M_i) = sum_d prod_m x^m_id, (N,), in ``acc``."""
    return _product(reps, acc).sum(dim=1)


@torch.library.custom_op("flashcontrast::symile_n", mutates_args=())
@autocast_off
def symile_n(
    reps: list[Tensor], perms: Tensor, scale: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(ce (M, N), row_max (M, N), row_sum (M, N)) in the accumulation dtype."""
    acc = accumulation_dtype(reps[0].dtype)
    engine = backend_module(backend, "pair")
    p = scale * mip(reps, acc)
    ce, mx, sm = [], [], []
    for a in range(len(reps)):
        w = _product(_gathered(reps, perms, a), acc).to(reps[0].dtype)
        st = engine.pair_forward(reps[a], w, scale, None, PAIR, positive_logits=p)
        ce.append(lse(st.row_max, st.row_sum) - p)
        mx.append(st.row_max)
        sm.append(st.row_sum)
    return torch.stack(ce), torch.stack(mx), torch.stack(sm)


@symile_n.register_fake
def _symile_n_fake(reps, perms, scale, backend):
    acc = accumulation_dtype(reps[0].dtype)
    shape = (len(reps), reps[0].shape[0])
    return tuple(reps[0].new_empty(shape, dtype=acc) for _ in range(3))


@torch.library.custom_op("flashcontrast::symile_n_bwd", mutates_args=())
@autocast_off
def symile_n_bwd(
    reps: list[Tensor],
    perms: Tensor,
    scale: Tensor,
    row_max: Tensor,
    row_sum: Tensor,
    grad: Tensor,
    backend: str,
) -> list[Tensor]:
    """[d x^1, ..., d x^M (inputs' dtype), d scale (0-d, accumulation dtype)]."""
    acc = accumulation_dtype(reps[0].dtype)
    engine = backend_module(backend, "pair")
    m = len(reps)
    p = scale * mip(reps, acc)
    d = [torch.zeros(r.shape, dtype=acc, device=r.device) for r in reps]
    dp = -grad.sum(dim=0)  # d ce_a / d p = -1 for every anchor
    dscale = torch.zeros((), dtype=acc, device=reps[0].device)
    for a in range(m):
        gathered = _gathered(reps, perms, a)
        w = _product(gathered, acc).to(reps[0].dtype)
        stats = Stats(row_max=row_max[a], row_sum=row_sum[a])
        g = engine.pair_backward(
            reps[a], w, scale, None, PAIR, stats, Coefs(rows=grad[a]),
            positive_logits=p, out_dtype=acc,
        )  # fmt: skip
        d[a] += g.da
        dp += g.dpos
        dscale += g.dscale
        add_factor_gradients(d, gathered, perms, a, g.db, acc)
    dscale += add_positive_gradient(d, reps, scale, dp, acc)
    return [x.to(r.dtype) for x, r in zip(d, reps)] + [dscale]


def add_factor_gradients(
    d: list[Tensor], gathered: list[Tensor], perms: Tensor, a: int, db: Tensor, acc: torch.dtype
) -> None:
    """The product rule of W^a = prod_k o_k[pi_ak] (N, D) given dW^a = ``db`` (N, D):
    d o_k[pi_ak] += db prod_{k' != k} o_k'[pi_ak'], index-added into the accumulators
    ``d`` (one (N, D) tensor per modality, in ``acc``, in place). ``gathered``: the
    permuted others [o_k[pi_ak] for k] (N, D) each, ``perms`` (M, M-1, N)."""
    others = [o for o in range(len(d)) if o != a]
    for k, o in enumerate(others):
        rest = [x for k2, x in enumerate(gathered) if k2 != k]  # empty for M = 2
        d[o].index_add_(0, perms[a, k], db * _product(rest, acc) if rest else db)


def add_positive_gradient(
    d: list[Tensor], reps: list[Tensor], scale: Tensor, dp: Tensor, acc: torch.dtype
) -> Tensor:
    """p = s MIP with upstream dp (N,): d x^m += dp s prod_{m' != m} x^m' (into the float32
    accumulators d, in place); returns d s = dp . MIP."""
    for k in range(len(reps)):
        rest = [x for k2, x in enumerate(reps) if k2 != k]
        d[k] += (dp * scale)[:, None] * _product(rest, acc)
    return (dp * mip(reps, acc)).sum()


@symile_n_bwd.register_fake
def _symile_n_bwd_fake(reps, perms, scale, row_max, row_sum, grad, backend):
    acc = accumulation_dtype(reps[0].dtype)
    return [torch.empty_like(r, memory_format=torch.contiguous_format) for r in reps] + [
        reps[0].new_empty((), dtype=acc)
    ]


def _setup_context(ctx, inputs, output) -> None:
    reps, perms, scale, backend = inputs
    ctx.backend = backend
    ctx.m = len(reps)
    ctx.save_for_backward(*reps, perms, scale, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_ce, _grad_max, _grad_sum):
    saved = ctx.saved_tensors
    reps, (perms, scale, row_max, row_sum) = list(saved[: ctx.m]), saved[ctx.m :]
    out = symile_n_bwd(reps, perms, scale, row_max, row_sum, grad_ce.to(row_max.dtype),
                       ctx.backend)  # fmt: skip
    return out[:-1], None, out[-1].to(scale.dtype), None


torch.library.register_autograd("flashcontrast::symile_n", _backward, setup_context=_setup_context)
