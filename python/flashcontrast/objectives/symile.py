"""Symile (docs/objectives.md section 5): checks, torch.library ops, autograd, public API.

MIP(x^1, ..., x^M) = sum_d prod_m x^m_d. Each modality m in turn is the anchor; the
others keep their list order; L = (1/M) sum_m mean_i (LSE_c logits_m[i, c] - s MIP_i),
MIP_i = MIP(x^1_i, ..., x^M_i) the positive (the same for every anchor).

"n"          the candidates of anchor row i are the columns j of W^m = prod_o x^o[pi_mo]
             (N, D), with column i replaced by the positive: ONE op for the whole loss,
             ``flashcontrast::symile_n`` (objectives/_symile_n.py): a pair-engine "rows"
             sweep per anchor with the positive logit as the override, W rebuilt in the
             backward. The permutations pi are drawn by ``symile_negative_permutations``:
             the published package's random stream.
"n_squared"  all N^(M-1) index tuples of the others: ``symile_n2_fwd`` (M = 3, every
             backend) or ``symile_nk_fwd`` (M > 3, the "torch" backend only), which
             generate the candidates block by block and never store them.

With "n_squared" the op ``flashcontrast::symile_n2`` computes the positive logit
s * MIP_i itself and differentiates it in its backward, beside the kernels' gradients.

Each row's cross entropy LSE_i - s MIP_i is >= 0 exactly (the LSE runs over a set that
holds the positive). With "n" the op uses its own positive as the override, so the
computed LSE is >= it too. With "n_squared" the kernels generate the positive candidate
themselves, with their own rounding: the 16-bit kernels (Triton, CUDA) form x_i * y_j and
round it to the input dtype for the tensor-core dot, Triton fp32 on a GPU uses TF32, and
fp32 sums in another order than ``prod.sum`` here. So their positive differs from this
one in its last bits, and where the positive dominates (always at N = 1, where the LSE
over one candidate is that candidate) LSE_i - s MIP_i came out negative: fp16 Triton at
N = 1 -3e-4 to -2e-3 for scales up to 50, the CUDA bf16 kernels -3e-2, fp32 -1e-6.

The exact fix is a diagonal override in the n_squared kernels, as the engine has; it changes
the backend contract and every backend, csrc/ included. Until then the value of each
n_squared row's cross entropy is clamped at 0, which is exact where it binds (the true
value lies in [0, the rounding difference]), and its gradient is left the unclamped one:
a rounding correction, not a change of the function, so a converged row keeps its small
but real gradient (at N = 1 both are 0 up to rounding).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _dispatch, reference
from .._amp import autocast_off
from .._module import BackendLoss
from .._ops import backend_module
from .._sampling import symile_negative_permutations
from .._validation import (
    Scalar,
    accumulation_dtype,
    as_scalar_tensor,
    check_features,
    check_pair,
    check_strided,
    check_symile_modalities,
)
from ._symile_n import add_positive_gradient, mip, symile_n

__all__ = ["SymileLoss", "symile_loss"]

NEGATIVE_SAMPLING = ("n", "n_squared")


def _contiguous_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- n_squared
# One op owns the whole loss: the kernels (symile_n2_* for M = 3 on every backend,
# symile_nk_* for M > 3 on "torch") give each anchor's row LSEs and their gradients in the
# accumulation dtype; the positive logits p = s MIP are computed and differentiated inside
# the op too, from row chunks upcast, and both gradients meet in float32 before the one
# rounding to the inputs' dtype (near convergence they nearly cancel:
# tests/test_half_precision_gradients.py). Only the inputs and the (M, N) LSEs are saved.


def _anchor_lse(reps: list[Tensor], a: int, scale: Tensor, backend: str) -> Tensor:
    """Row LSEs (N,) of anchor a over all N^(M-1) tuples of the others."""
    module = backend_module(backend, "symile")
    others = [r for o, r in enumerate(reps) if o != a]
    if len(reps) == 3:
        return module.symile_n2_forward(reps[a], *others, scale)
    return module.symile_nk_forward(reps[a], torch.stack(others), scale)


@torch.library.custom_op("flashcontrast::symile_n2", mutates_args=())
@autocast_off
def symile_n2(reps: list[Tensor], scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(ce (M, N), row_lse (M, N)), accumulation dtype: ce_ai = LSE_ai - s MIP_i."""
    acc = accumulation_dtype(reps[0].dtype)
    p = scale * mip(reps, acc)
    lse = torch.stack([_anchor_lse(reps, a, scale, backend) for a in range(len(reps))])
    return lse - p, lse


@symile_n2.register_fake
def _symile_n2_fake(reps, scale, backend):
    acc = accumulation_dtype(reps[0].dtype)
    shape = (len(reps), reps[0].shape[0])
    return reps[0].new_empty(shape, dtype=acc), reps[0].new_empty(shape, dtype=acc)


@torch.library.custom_op("flashcontrast::symile_n2_bwd", mutates_args=())
@autocast_off
def symile_n2_bwd(
    reps: list[Tensor], scale: Tensor, row_lse: Tensor, grad: Tensor, backend: str
) -> list[Tensor]:
    """[d x^1, ..., d x^M (inputs' dtype), d scale (0-d, accumulation dtype)] of
    sum_ai grad_ai ce_ai."""
    acc = accumulation_dtype(reps[0].dtype)
    module = backend_module(backend, "symile")
    m = len(reps)
    d = [torch.zeros(r.shape, dtype=acc, device=r.device) for r in reps]
    dscale = torch.zeros((), dtype=acc, device=reps[0].device)
    for a in range(m):
        others = [o for o in range(m) if o != a]
        if m == 3:
            da, *dothers, ds = module.symile_n2_backward(
                reps[a], *(reps[o] for o in others), scale, row_lse[a], grad[a]
            )
        else:
            stacked = torch.stack([reps[o] for o in others])
            da, dstack, ds = module.symile_nk_backward(reps[a], stacked, scale, row_lse[a], grad[a])
            dothers = list(dstack)
        d[a] += da
        for o, x in zip(others, dothers):
            d[o] += x
        dscale += ds
    dp = -grad.sum(dim=0)  # d ce_a / d p = -1: p = s MIP
    dscale += add_positive_gradient(d, reps, scale, dp, acc)
    return [x.to(r.dtype) for x, r in zip(d, reps)] + [dscale]


@symile_n2_bwd.register_fake
def _symile_n2_bwd_fake(reps, scale, row_lse, grad, backend):
    acc = accumulation_dtype(reps[0].dtype)
    return [torch.empty_like(r, memory_format=torch.contiguous_format) for r in reps] + [
        reps[0].new_empty((), dtype=acc)
    ]


def _n2_setup_context(ctx, inputs, output) -> None:
    reps, scale, backend = inputs
    ctx.backend = backend
    ctx.m = len(reps)
    ctx.save_for_backward(*reps, scale, output[1])
    ctx.mark_non_differentiable(output[1])


def _n2_backward(ctx, grad_ce, _grad_lse):
    saved = ctx.saved_tensors
    reps, (scale, row_lse) = list(saved[: ctx.m]), saved[ctx.m :]
    out = symile_n2_bwd(reps, scale, row_lse, grad_ce.to(row_lse.dtype), ctx.backend)
    return out[:-1], out[-1].to(scale.dtype), None


torch.library.register_autograd(
    "flashcontrast::symile_n2", _n2_backward, setup_context=_n2_setup_context
)


# ----------------------------------------------------------------------------- public API


def _check_representations(
    representations: object, check=check_features, clip_loss: str = "flashcontrast.clip_loss"
) -> list:
    """The M >= 3 representations as a list, each checked by ``check(name, x)`` (the
    process-group version passes its shard check, which allows n_r = 0) and against
    representations[0]'s shape, dtype and device; M = 2 raises pointing to ``clip_loss``."""
    if isinstance(representations, torch.Tensor) or not isinstance(representations, (list, tuple)):
        raise TypeError(
            "representations must be a list or tuple of M >= 3 tensors (N, D), got "
            f"{type(representations).__name__}"
        )
    reps = list(representations)
    check_symile_modalities(len(reps), clip_loss)
    for k, r in enumerate(reps):
        check(f"representations[{k}]", r)
    for k, r in enumerate(reps[1:], start=1):
        check_pair("representations[0]", reps[0], f"representations[{k}]", r)
    return reps


def _permutations(perms: object, m: int, n: int, device: torch.device) -> Tensor:
    """Explicit (M, M-1, N) index maps, checked, as int64 on ``device``.

    A tensor must be dense, of an integer dtype, and on the features' device or on the CPU
    (then copied over once, as PyTorch lets CPU indices index device tensors). The values
    are checked only where that costs no synchronization: on the CPU and not while
    torch.compile traces (there the check would be data-dependent control flow)."""
    if isinstance(perms, torch.Tensor):
        check_strided("permutations", perms)
        if perms.dtype.is_floating_point or perms.dtype.is_complex or perms.dtype == torch.bool:
            raise TypeError(f"permutations must be an integer tensor, got {perms.dtype}")
        if perms.device != device and perms.device.type != "cpu":
            raise ValueError(
                f"permutations is on {perms.device} but the representations are on {device}: "
                "put it on their device (or on the CPU)"
            )
        t = perms
    else:
        try:
            t = torch.as_tensor(perms, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"permutations must be an (M, M-1, N) integer tensor: {exc}") from exc
    if tuple(t.shape) != (m, m - 1, n):
        raise ValueError(
            f"permutations must have shape (M, M-1, N) = {(m, m - 1, n)}, got {tuple(t.shape)}"
        )
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(t.min()) < 0 or int(t.max()) >= n:
            raise ValueError(f"permutations must hold row indices in [0, {n})")
    return t.to(device=device, dtype=torch.long)


@autocast_off
def symile_loss(
    representations: Sequence[Tensor],
    logit_scale: Scalar,
    *,
    negative_sampling: str = "n",
    generator: Optional[torch.Generator] = None,
    permutations: Optional[Union[Tensor, Sequence]] = None,
    backend: str = "auto",
) -> Tensor:
    """The Symile loss of ``symile.Symile(negative_sampling)(representations, logit_scale)``,
    without materializing the (N, N) or (N, N^(M-1)) logits.

    Args:
        representations: list or tuple of M >= 3 tensors (N, D), one dtype (float32,
            float16, bfloat16 or float64) and device. M = 2 raises (use ``clip_loss``).
        logit_scale: the multiplier s (already exponentiated), a float or a one-element
            tensor, which receives a gradient when it requires one.
        negative_sampling: "n" (N - 1 random negatives per row, O(M N D) extra memory) or
            "n_squared" (all N^(M-1) index tuples; M > 3 on the "torch" backend only).
        generator: for "n", the ``torch.Generator`` to draw the permutations from. Without
            it (and without ``permutations``) they come from the default generator in the
            published package's order: after ``torch.manual_seed(k)`` this returns what
            ``symile.Symile("n")`` returns after the same seed.
        permutations: for "n", explicit (M, M-1, N) row index maps (``perms[m, k]``
            shuffles the k-th non-anchor modality when m is the anchor): an integer
            tensor (or nested lists) on the representations' device or on the CPU.
        backend: "auto", "cuda", "triton", "torch" or "reference".

    Returns:
        The mean loss, a 0-d tensor: float32 (float64 for float64 representations).

    Under ``torch.compile(fullgraph=True)``: explicit ``permutations`` trace (their values
    are then not range-checked); with neither ``permutations`` nor ``generator`` the
    ``torch.randperm`` draws are traced into the graph and take the default generator's
    stream as in eager mode; a ``generator`` cannot be traced (an error with
    fullgraph=True, a graph break without). backend="reference" with explicit
    permutations does not trace (the oracle reads their values).
    """
    reps = _check_representations(representations)
    if negative_sampling not in NEGATIVE_SAMPLING:
        raise ValueError(f"negative_sampling must be 'n' or 'n_squared', got {negative_sampling!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if negative_sampling == "n_squared" and permutations is not None:
        raise ValueError('permutations only apply to negative_sampling="n"')
    if permutations is not None and generator is not None:
        raise ValueError("give either permutations or generator, not both")
    m = len(reps)
    n = reps[0].shape[0]
    device, dtype = reps[0].device, reps[0].dtype
    scale = as_scalar_tensor("logit_scale", logit_scale, reps[0])
    perms = None
    if negative_sampling == "n" and permutations is not None:
        perms = _permutations(permutations, m, n, device)

    variant = "symile_n_squared_many" if negative_sampling == "n_squared" and m > 3 else None
    chosen = _dispatch.resolve("symile", device, backend, dtype, variant)
    if chosen == "reference":
        return reference.symile_loss(
            reps,
            scale,
            negative_sampling,
            generator=generator,
            permutations=perms,
        )

    if negative_sampling == "n":
        if perms is None:
            perms = symile_negative_permutations(m, n, generator=generator, device=device)
        ce, _, _ = symile_n(reps, perms, scale, chosen)  # (M, N): the whole loss in one op
        return ce.mean(dim=1).sum() / m

    ce, _ = symile_n2(reps, scale, chosen)  # (M, N) per-row cross entropies
    # >= 0 in exact arithmetic; the kernels round the positive their own way: value
    # max(ce, 0) exactly (x - x is 0; +inf stays), gradient that of ce
    ce = ce - ce.detach().clamp_max(0.0)
    return ce.mean(dim=1).sum() / m


class SymileLoss(BackendLoss):
    """Symile as a module: ``SymileLoss("n")([x, y, z], logit_scale)``.

    Holds no parameters (the logit scale belongs to the model).

    Args:
        negative_sampling: "n" or "n_squared".
        backend: "auto", "cuda", "triton", "torch" or "reference".
    """

    option_names = ("negative_sampling",)

    def __init__(self, negative_sampling: str = "n", backend: str = "auto") -> None:
        super().__init__(backend)
        if negative_sampling not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"negative_sampling must be 'n' or 'n_squared', got {negative_sampling!r}"
            )
        self.negative_sampling = negative_sampling

    def forward(
        self,
        representations: Sequence[Tensor],
        logit_scale: Scalar,
        generator: Optional[torch.Generator] = None,
        permutations: Optional[Union[Tensor, Sequence]] = None,
    ) -> Tensor:
        """M tensors (N, D) and a scalar -> 0-d mean loss."""
        return symile_loss(
            representations,
            logit_scale,
            negative_sampling=self.negative_sampling,
            generator=generator,
            permutations=permutations,
            backend=self.backend,
        )
