"""The verification rule (docs/verification.md) and the helpers the backend tests share.

error(kernel) <= 2 * error(same-dtype reference) + atol, errors measured against the
float64 reference, per output (loss and each gradient), atol scaled by the output's size
(the rule itself: ``flashcontrast.bench.rule``).
"""

from __future__ import annotations

import pytest
import torch

from cuda_emulator import SKIP_REASON as EMULATOR_SKIP
from flashcontrast import reference
from flashcontrast.backends.triton import triton_unavailable_reason
from flashcontrast.bench.rule import check_rule

# Why the Triton backend cannot run on CPU tensors here (None: it can, in the interpreter).
TRITON_SKIP = triton_unavailable_reason(torch.device("cpu"))
TRITON = pytest.param(
    "triton", marks=pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
)
# The CUDA backend on CPU tensors: csrc/ built for the CPU (tests/cuda_emulator); the
# conftest fixture `_emulated_cuda_backend` swaps it in for every test given backend="cuda".
CUDA_EMULATED = pytest.param(
    "cuda",
    marks=[
        pytest.mark.emulator,
        pytest.mark.skipif(EMULATOR_SKIP is not None, reason=str(EMULATOR_SKIP)),
    ],
)
# The kernel backends every objective's tests run on the CPU.
BACKENDS = ["torch", TRITON, CUDA_EMULATED]
# The backends the pair engine's contract tests run (backends/pair.py): each kernel
# backend joins when its pair_forward / pair_backward exist.
TRITON_ENGINE: list = [TRITON]
CUDA_ENGINE: list = [CUDA_EMULATED]
ENGINE_BACKENDS = ["torch", *TRITON_ENGINE, *CUDA_ENGINE]


def assert_by_rule(*args, **kwargs) -> None:
    """Assert the rule for each output of a kernel against the float64 oracle: the
    arguments of ``flashcontrast.bench.rule.check_rule`` (names, kernel, same_dtype_ref,
    exact, dtype, allowance=None), which the GPU report's smoke records too."""
    for result in check_rule(*args, **kwargs):
        assert result.ok, result.describe()


def clip_lse_rounding_allowance(a, b, scale, bias, grad_out) -> dict[str, float]:
    """Gradient error the CLIP contract's float32 LSEs imply, per gradient (da, db, dscale,
    dbias), for the loss grad_out * L on features a, b (computed in float64).

    The backward forms P = exp(S - lse) from the saved row and column LSEs rounded to
    float32: each P_ij is off relatively by up to |lse| 2^-24, which the dense reference
    (softmax of its own S, the row maximum subtracted exactly) does not have. With
    dS = grad_out / (2N) (P_row + P_col - 2I) that is |d dS_ij| <= c (P_row_ij |row_i| +
    P_col_ij |col_j|) 2^-24, c = |grad_out| / (2N), carried through da = s dS b,
    db = s dS^T a, dscale = sum dS * (a b^T), dbias = sum dS. It matters at extreme scales
    only: at s = 1e4, |lse| ~ 1e4 makes it ~6e-4 relative in P, where the reference's P
    (and so its error) can be far more accurate; at s <= 100 it is below the rule's atol.
    """
    a, b = a.detach().double(), b.detach().double()
    s = float(scale)
    x = a @ b.T
    z = s * x + (0.0 if bias is None else float(bias))
    row, col = z.logsumexp(1), z.logsumexp(0)
    c = abs(float(grad_out)) / (2 * a.shape[0])
    p_row, p_col = torch.exp(z - row[:, None]), torch.exp(z - col[None, :])
    err = c * (p_row * row.abs()[:, None] + p_col * col.abs()[None, :]) * 2.0**-24
    return {
        "da": abs(s) * (err @ b.abs()).max().item(),
        "db": abs(s) * (err.T @ a.abs()).max().item(),
        "dscale": (err * x.abs()).sum().item(),
        "dbias": err.sum().item(),
    }


def gram_det_rounding_allowance(anchor, others, scale, label_smoothing, grad_out, dtype):
    """What one near-singular G_ij's det rounding can cost each GRAM output (loss, d_anchor,
    d_others..., d_scale) in ``dtype`` (float32 for 16-bit inputs), to first order, from the
    inputs' conditioning (computed in float64).

    Why the rule alone is not enough: where some G_ij is near singular (D close to M: M = D
    = 3, or M = 5 in D = 6) its computed det is off by a few u B_ij (B_ij = prod diag G_ij,
    Hadamard's bound; u = 2^-24), and dV_ij = d det_ij / (2 V_ij), d(dV_ij / dx) =
    -(d det_ij / dx) d det_ij / (4 V_ij^3) let that one entry dominate an output's error.
    The kernel's error and the reference's are then two independent draws of it, not sums
    over many entries (which the rule's 2x covers), and the kernel's exceeds twice the
    reference's by chance: at 12% of seeds at M = D = 3, N = 7 (torch backend), and at
    hypothesis draws with M = 5, D = 6. The kernels' det (det(H) |t|^2 - u^T adj(H) u) is as
    accurate as the reference's LU: both err by 0.75 u B (median), 3.3-3.9 u B (99th
    percentile), 7 u B at most over 2e5 random triples at D = 3 and D = 64.

    So, for each entry: |delta det_ij| <= 4 u B_ij (the rule doubles the allowance), carried
    to first order through V_ij, dV_ij / dx and the softmax weights w = g dL/dV (g the
    upstream gradient, s the logit scale: |delta P_ij| <= P_ij ((1 - P_ij) dV_ij +
    sum_{l != j} P_il dV_il), rows and columns alike); an entry that close to the
    degeneracy floor may land on either side of it, so it is owed its whole volume and
    gradient. The allowance is the largest single entry's contribution to each output
    (component): errors spread over many entries are the rule's. Well-conditioned inputs
    get <= 1% of the rule's bound at D >= 37, ~20% at M = 6, D = 17.
    """
    work = torch.promote_types(dtype, torch.float32)
    unit = torch.finfo(work).eps / 2
    t = anchor.detach().double()
    o = [x.detach().double() for x in others]
    n, d = t.shape
    m = len(o) + 1
    s, g, eps = abs(float(scale)), abs(float(grad_out)), float(label_smoothing)
    x = torch.cat(
        [
            t[:, None, None, :].expand(n, n, 1, d),
            torch.stack(o, dim=1)[None].expand(n, n, m - 1, d),
        ],
        dim=2,
    )  # (N, N, M, D): anchor i and sample j's others
    gram = x @ x.transpose(-1, -2)
    det = torch.linalg.det(gram)
    bound = gram.diagonal(dim1=-2, dim2=-1).prod(-1)
    floor = reference.gram_degenerate_rtol(work) * bound
    err = 4 * unit * bound
    ambiguous = (det - floor).abs() <= err
    kept = (det > floor) & ~ambiguous
    live = kept | ambiguous
    eye = torch.eye(m, dtype=gram.dtype).expand_as(gram)
    safe = torch.where(live[..., None, None], gram, eye)
    adj = torch.linalg.det(safe)[..., None, None] * torch.linalg.inv(safe)
    ddet = (2 * adj @ x).abs() * live[..., None, None]  # |d det_ij / d x|, (N, N, M, D)
    vol = torch.sqrt(torch.where(live, torch.maximum(det, floor), torch.ones_like(det)))
    zero = torch.zeros_like(det)
    dv = torch.where(kept, err / (2 * vol), torch.where(ambiguous, vol, zero))
    ddv = torch.where(kept, err / (4 * vol**3), torch.where(ambiguous, 1 / (2 * vol), zero))
    dvdx = torch.where(live, 1 / (2 * vol), zero)  # times ddet: |dV_ij / dx|
    v_model = torch.where(det > floor, vol, zero)  # the volumes a `work` evaluation sees
    z = -s * v_model
    p_row, p_col = torch.softmax(z, 1), torch.softmax(z, 0)
    target = (1 - eps) * torch.eye(n, dtype=z.dtype) + eps / n
    dl_dz = (p_row + p_col - 2 * target) / (2 * n)
    dz = g * dl_dz  # grad_out * dL/dz: the gradients are those of grad_out * L
    w = s * dz.abs()  # |grad_out dL/dV|
    # |delta P_ij| = P_ij |dV_ij - sum_l P_il dV_il| <= P_ij ((1 - P_ij) dV_ij + the rest)
    row_mix = (p_row * dv).sum(1, keepdim=True) - p_row * dv
    col_mix = (p_col * dv).sum(0, keepdim=True) - p_col * dv
    mix = p_row * ((1 - p_row) * dv + row_mix) + p_col * ((1 - p_col) * dv + col_mix)
    ddz = s * g / (2 * n) * mix  # |delta dz|
    dw = s * ddz
    per = ddet * (w * ddv + dw * dvdx)[..., None, None]  # (N, N, M, D)
    return [
        (s * dl_dz.abs() * dv).max().item(),  # the loss itself, not grad_out * L
        per[:, :, 0, :].amax(1).max().item(),
        *(per[:, :, r, :].amax(0).max().item() for r in range(1, m)),
        (dz.abs() * dv + ddz * v_model).max().item(),
    ]


def pair_inputs(n: int, d: int, dtype: torch.dtype, normalize: bool = True):
    """Two (N, D) feature matrices, row-normalized unless asked otherwise."""
    a, b = torch.randn(n, d), torch.randn(n, d)
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.to(dtype), b.to(dtype)


def check_pair_objective(ours, ref, n, d, dtype, scale, bias, grad_out=1.7, normalize=True):
    """``ours(a, b, scale, bias)`` on (n, D) features against ``ref`` (a reference.py
    function) by the rule: the loss in float32 (float64 for float64 features), the feature
    gradients in the features' dtype. Returns nothing; asserts."""
    names = ("loss", "d_image", "d_text", "d_scale", "d_bias")
    a, b = pair_inputs(n, d, dtype, normalize)
    exact = pair_loss_and_grads(ref, a, b, scale, bias, grad_out, torch.float64)
    same_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    same = pair_loss_and_grads(ref, a, b, scale, bias, grad_out, same_dtype)
    got = pair_loss_and_grads(ours, a, b, scale, bias, grad_out)
    assert got[0].dtype == same_dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert_by_rule(names, got, same, exact, dtype)


def pair_loss_and_grads(fn, a, b, scale, bias, grad_out, acc=None):
    """Loss and gradients of fn(a, b, scale, bias) w.r.t. features, scale and bias (bias
    skipped when None), in ``acc`` (default: a's dtype), for upstream gradient grad_out."""
    a = a.detach().to(acc or a.dtype).requires_grad_()
    b = b.detach().to(acc or b.dtype).requires_grad_()
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=dt, requires_grad=True)
    bb = None if bias is None else torch.tensor(bias, dtype=dt, requires_grad=True)
    loss = fn(a, b, s, bb)
    inputs = [a, b, s] + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(loss * grad_out, inputs)
    return [loss.detach(), *grads]
