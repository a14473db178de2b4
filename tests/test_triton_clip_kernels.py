"""The Triton CLIP kernels, called directly, against a dense float64 computation.

Verification rule (DESIGN.md): error(kernel vs float64) <= 2 * error(the same dense
computation in the input dtype vs float64) + a small atol scaled by the output's size,
plus, for the gradients, the error the contract's float32 LSEs imply (see
lse_rounding_allowance: it only matters at extreme scales such as s = 1e4).
Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so sizes stay small and tiles 32 x 32.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from flashcontrast.backends.triton import triton_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = triton_unavailable_reason(DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

if _REASON is None:
    from flashcontrast.backends.triton import clip
    from flashcontrast.backends.triton._plan import override_tiles
else:  # keeps collection working; every test is skipped
    clip = override_tiles = None

# atol per unit of max|reference| (plus the same amount absolute), per input dtype.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
NAMES = ("row_lse", "col_lse", "diag", "da", "db", "dscale", "dbias")


def dense(a, b, scale, bias, grad, dtype):
    """Every output of the contract, materialising S, computed in ``dtype``."""
    a, b = a.to(dtype), b.to(dtype)
    s = scale.to(dtype)
    x = a @ b.T
    S = s * x + (bias.to(dtype) if bias is not None else 0)
    row_lse, col_lse = S.logsumexp(1), S.logsumexp(0)
    n = a.shape[0]
    eye = torch.eye(n, dtype=dtype, device=a.device)
    p = torch.softmax(S, 1) + torch.softmax(S, 0) - 2 * eye
    dS = grad.to(dtype) / (2 * n) * p
    da, db = s * dS @ b, s * dS.T @ a
    return row_lse, col_lse, S.diagonal(), da, db, (dS * x).sum(), dS.sum()


def make_inputs(n, d, dtype, layout, normalize=True):
    def one():
        t = torch.randn(n, d, device=DEVICE)
        if normalize:
            t = t / t.norm(dim=1, keepdim=True)
        t = t.to(dtype)
        if layout == "transposed":  # (D, N) storage: stride(0) == 1
            return t.T.contiguous().T
        if layout == "slice":  # every other column of a wider matrix
            wide = torch.zeros(n, 2 * d + 1, dtype=dtype, device=DEVICE)
            wide[:, 1::2] = t
            return wide[:, 1::2]
        return t

    a, b = one(), one()
    assert (layout == "contiguous") == (a.is_contiguous() and b.is_contiguous()) or n == 1
    return a, b


def scalar(value):
    return None if value is None else torch.tensor(float(value), device=DEVICE)


def run_kernels(a, b, scale, bias, grad):
    row_lse, col_lse, diag = clip.clip_forward(a, b, scale, bias)
    da, db, dscale, dbias = clip.clip_backward(a, b, scale, bias, row_lse, col_lse, grad)
    return row_lse, col_lse, diag, da, db, dscale, dbias


def check_contract(outs, a):
    n, d = a.shape
    row_lse, col_lse, diag, da, db, dscale, dbias = outs
    for t in (row_lse, col_lse, diag):
        assert t.shape == (n,) and t.dtype == torch.float32 and t.device == a.device
    for t in (da, db):
        assert t.shape == (n, d) and t.dtype == a.dtype and t.device == a.device
    for t in (dscale, dbias):
        assert t.shape == () and t.dtype == torch.float32
    # torch.library custom ops may not return aliasing outputs.
    storages = {t.untyped_storage().data_ptr() for t in outs}
    assert len(storages) == len(outs)


def lse_rounding_allowance(a, b, scale, bias, grad):
    """Gradient error owed to the contract's float32 LSEs, on top of the 2x rule.

    The backward forms P = exp(S - lse) from the saved lse, rounded to float32: a
    relative error up to |lse| 2^-24 in every P, which dense torch (softmax of its own S)
    does not have. It matters only at extreme scales (|lse| ~ 1e4: ~5e-4 in P).
    """
    a, b = a.double(), b.double()
    x = a @ b.T
    S = scale.double() * x + (bias.double() if bias is not None else 0)
    row, col = S.logsumexp(1), S.logsumexp(0)
    c = grad.double().abs() / (2 * a.shape[0])
    err = c * (torch.exp(S - row[:, None]) * row.abs()[:, None] + torch.exp(S - col) * col.abs())
    err = err * 2.0**-24
    s = scale.double().abs()
    da = s * (err @ b.abs()).max()
    db = s * (err.T @ a.abs()).max()
    return (0.0, 0.0, 0.0, da.item(), db.item(), (err * x.abs()).sum().item(), err.sum().item())


def check_against_float64(a, b, scale, bias, grad, outs):
    truth = dense(a.double(), b.double(), scale, bias, grad, torch.float64)
    same = dense(a, b, scale, bias, grad, a.dtype)
    allowance = lse_rounding_allowance(a, b, scale, bias, grad)
    for name, got, ref, base, extra in zip(NAMES, outs, truth, same, allowance):
        assert torch.isfinite(got).all(), f"{name} is not finite"
        err = (got.double() - ref).abs().max().item()
        err_torch = (base.double() - ref).abs().max().item()
        atol = ATOL[a.dtype] * (1.0 + ref.abs().max().item()) + 2 * extra
        assert err <= 2 * err_torch + atol, (
            f"{name}: kernel error {err:.3e} > 2 x torch {a.dtype} error {err_torch:.3e} "
            f"+ atol {atol:.1e}"
        )


CASES = [
    # n, d, scale, bias, grad, dtype, layout
    (1, 3, 1.0, None, 1.0, torch.float32, "contiguous"),
    (1, 100, 1e4, 0.3, -0.7, torch.float32, "transposed"),
    (7, 3, 30.0, None, 0.7, torch.float32, "slice"),
    (7, 100, 100.0, -2.0, 2.5, torch.float32, "transposed"),
    (97, 64, 30.0, None, -1.3, torch.float32, "contiguous"),
    (97, 100, 1e4, 1.5, 0.7, torch.float32, "contiguous"),
    (97, 3, 100.0, 0.5, 1.0, torch.float32, "slice"),
    (300, 64, 1e4, None, 0.7, torch.float32, "transposed"),
    (300, 100, 30.0, -1.0, 3.0, torch.float32, "contiguous"),
    (7, 64, 1.0, None, 0.7, torch.float16, "contiguous"),
    (97, 100, 30.0, 0.25, -2.0, torch.float16, "slice"),
    (300, 64, 100.0, None, 0.7, torch.float16, "transposed"),
    (97, 3, 1e4, None, 1.0, torch.float16, "contiguous"),
    (1, 64, 30.0, 1.0, 0.7, torch.bfloat16, "contiguous"),
    (97, 64, 30.0, None, 0.7, torch.bfloat16, "transposed"),
    (300, 100, 1e4, -0.5, -1.1, torch.bfloat16, "slice"),
]


@pytest.mark.parametrize(
    "n,d,scale,bias,grad,dtype,layout",
    CASES,
    ids=[f"n{c[0]}-d{c[1]}-s{c[2]:g}-b{c[3]}-{str(c[5])[6:]}-{c[6]}" for c in CASES],
)
def test_matches_float64(n, d, scale, bias, grad, dtype, layout):
    a, b = make_inputs(n, d, dtype, layout)
    scale, bias, grad = scalar(scale), scalar(bias), scalar(grad)
    outs = run_kernels(a, b, scale, bias, grad)
    check_contract(outs, a)
    check_against_float64(a, b, scale, bias, grad, outs)


@pytest.mark.parametrize(
    "tiles",
    [
        dict(block_d=16, max_programs=1),  # D in chunks, one program: G = H = SPLIT = 1
        dict(block_m=64, block_n=32, block_d=32, max_programs=3),  # rectangular tiles
        dict(block_m=16, block_n=64, block_d=128, max_programs=64),  # many H, SPLIT > 1
    ],
    ids=["chunked-1prog", "rect-3prog", "wide-64prog"],
)
def test_tile_shapes_and_grids(tiles):
    """Other tiles, chunkings and (G, H, SPLIT) grids give the same numbers."""
    a, b = make_inputs(97, 100, torch.float32, "slice")
    scale, bias, grad = scalar(50.0), scalar(-0.5), scalar(1.7)
    with override_tiles(**tiles):
        outs = run_kernels(a, b, scale, bias, grad)
        again = clip.clip_forward(a, b, scale, bias)
    check_against_float64(a, b, scale, bias, grad, outs)
    for first, second in zip(outs[:3], again):  # the forward has no atomics
        assert torch.equal(first, second)


@pytest.mark.parametrize("n", [1, 7, 33])
def test_extreme_scale_is_finite(n):
    """s = 1e4 on unnormalised features with a large bias: no inf - inf anywhere."""
    a, b = make_inputs(n, 5, torch.float32, "contiguous", normalize=False)
    b[0] = a[0]  # a near-one-hot row next to ordinary ones
    scale, bias, grad = scalar(1e4), scalar(-3e3), scalar(1.0)
    outs = run_kernels(a, b, scale, bias, grad)
    for name, t in zip(NAMES, outs):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    check_against_float64(a, b, scale, bias, grad, outs)


def test_nothing_n_by_n_is_allocated(monkeypatch):
    """Every buffer the launchers allocate is O(N (D + programs)), never N x N, and
    strided inputs are read in place (no .contiguous() copy)."""
    n, d, programs = 300, 3, 4
    a, b = make_inputs(n, d, torch.float32, "transposed")
    shapes = []
    for name in ("empty", "zeros", "full", "empty_like", "zeros_like", "empty_strided"):
        original = getattr(torch, name)

        def recording(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            shapes.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch, name, recording)
    copied = []
    contiguous = torch.Tensor.contiguous

    def recording_contiguous(self, *args, **kwargs):
        if not self.is_contiguous():
            copied.append(tuple(self.shape))
        return contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", recording_contiguous)
    with override_tiles(max_programs=programs):
        outs = run_kernels(a, b, scalar(30.0), None, scalar(1.0))
    monkeypatch.undo()
    assert not copied, f"strided inputs were copied: {copied}"
    assert shapes, "the launchers allocated nothing through torch?"
    biggest = max(math.prod(s) for s in shapes)
    assert biggest <= max(n * d, 2 * 2 * programs * n) < n * n // 4, shapes
    workspace = [s for s in shapes if len(s) == 3]  # the forward's (2, G + H, N) partials
    assert len(workspace) == 1 and workspace[0][0] == 2 and workspace[0][2] == n
    assert workspace[0][1] <= programs + 1, workspace  # G + H, not N / BLOCK_M
    check_against_float64(a, b, scalar(30.0), None, scalar(1.0), outs)


def test_unavailable_reason(monkeypatch):
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    assert (triton_unavailable_reason(torch.device("cpu")) is None) == interpreting
    assert "not meta" in (triton_unavailable_reason(torch.device("meta")) or "")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in triton_unavailable_reason(torch.device("cpu"))


def test_rejects_bad_inputs():
    a, b = make_inputs(7, 3, torch.float32, "contiguous")
    with pytest.raises(ValueError):
        clip.clip_forward(a, b[:5], scalar(1.0), None)
    with pytest.raises(TypeError):
        clip.clip_forward(a.double(), b.double(), scalar(1.0), None)
