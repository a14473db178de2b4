"""The CUDA backend's SigLIP, multi-view (csrc/kernels/{siglip,multiview}.cu) and CLIP-groups
kernels against dense float64 computations of the contract formulas (backends/__init__.py).

Kernel tests run on each ``kernel_target`` (tests/conftest.py): a GPU (marked ``gpu``,
skipped with the reason where torch sees none or ``_C`` is not built) and csrc/ built for
the CPU (tests/cuda_emulator, marked ``emulator``); the fixture sets DEVICE.
Rule (tests/verification.py): error(kernel) <= 2 * error(dense fp32 torch on the same
rounded inputs) + atol, errors against float64.
The no-GPU tests run wherever the suite runs: CPU tensors must raise a clear RuntimeError.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashcontrast import _cuda_ext
from flashcontrast.backends import cuda as cuda_backend
from verification import assert_by_rule

HAS_C = _cuda_ext.HAS_C
HAS_CUDA = torch.cuda.is_available()
_C = _cuda_ext._C
HAS_SIGLIP = HAS_C and "siglip" in cuda_backend.OBJECTIVES
HAS_MV = HAS_C and "multiview" in cuda_backend.OBJECTIVES
HAS_CLIP = HAS_C and "clip" in cuda_backend.OBJECTIVES


DEVICE = "cuda"  # set per test by the kernel_target fixture
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _unit(*shape, dtype):
    return F.normalize(torch.randn(*shape, device=DEVICE), dim=-1).to(dtype)


def _t(x, dt):
    return torch.tensor(x, dtype=dt, device=DEVICE)


# ----------------------------------------------------------------------------- SigLIP oracle


def dense_siglip(a, b, scale, bias, grad):
    """(total, da, db, dscale, dbias) of the contract, by autograd through the dense loss."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    scale = scale.detach().requires_grad_()
    bias_t = (bias if bias is not None else torch.zeros_like(scale)).detach().requires_grad_()
    s = scale * (a @ b.t()) + bias_t
    n = a.shape[0]
    z = 2 * torch.eye(n, dtype=s.dtype, device=s.device) - 1
    t = -z * s
    # softplus(t) = max(t, 0) + log1p(e^-|t|): exact with finite gradients at any scale
    # (F.softplus with a huge threshold overflows e^t above t = 709 even in float64).
    total = (torch.relu(t) + torch.log1p(torch.exp(-t.abs()))).sum()
    grads = torch.autograd.grad(total / n * grad, (a, b, scale, bias_t))
    return (total.detach(), *grads)


def _check_siglip(a, b, scale, bias, grad=1.3):
    dtype = a.dtype
    s32, s64 = _t(scale, torch.float32), _t(scale, torch.float64)
    b32 = None if bias is None else _t(bias, torch.float32)
    b64 = None if bias is None else _t(bias, torch.float64)
    total = cuda_backend.siglip_forward(a, b, s32, b32)
    assert total.shape == () and total.dtype == torch.float32
    bwd = cuda_backend.siglip_backward(a, b, s32, b32, _t(grad, torch.float32))
    assert bwd[0].dtype == dtype and bwd[1].dtype == dtype and bwd[0].shape == a.shape
    exact = dense_siglip(a.double(), b.double(), s64, b64, grad)
    same = dense_siglip(a.float(), b.float(), s32, b32, grad)
    names = ("total", "da", "db", "dscale", "dbias")
    assert_by_rule(names, (total, *bwd), same, exact, dtype)


@pytest.mark.parametrize("n", [1, 7, 97, 300, 1025])
@pytest.mark.parametrize("d", [3, 64, 100, 513])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_siglip_sizes(n, d, dtype):
    a, b = _unit(n, d, dtype=dtype), _unit(n, d, dtype=dtype)
    _check_siglip(a, b, 10.0, -10.0)


@pytest.mark.parametrize("scale,bias", [(1.0, None), (30.0, 2.5), (100.0, -10.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_siglip_scales_bias_grad(scale, bias, dtype):
    a, b = _unit(97, 100, dtype=dtype), _unit(97, 100, dtype=dtype)
    _check_siglip(a, b, scale, bias, grad=-0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.usefixtures("kernel_target")
def test_siglip_strided(dtype):
    a = _unit(90, 100, dtype=dtype).t().contiguous().t()  # column-major
    b_full = torch.zeros(90, 260, device=DEVICE, dtype=dtype)
    b_full[:, 0:200:2] = _unit(90, 100, dtype=dtype)
    b = b_full[:, 0:200:2]
    _check_siglip(a, b, 20.0, -5.0)
    s = _t(20.0, torch.float32)
    got = cuda_backend.siglip_forward(a, b, s, None)
    want = cuda_backend.siglip_forward(a.contiguous(), b.contiguous(), s, None)
    assert torch.equal(got, want)  # deterministic, order-identical


@pytest.mark.usefixtures("kernel_target")
def test_siglip_extreme_scale_is_finite():
    """s = 1e4: finite, and by the rule against dense float32 (as tests/test_siglip.py
    checks the public loss there), not a fixed fraction of each output: how far the
    gradients move under rounding depends on how many logits land within a few units of
    0 at that scale, which changes with the draw."""
    a, b = _unit(97, 100, dtype=torch.float32), _unit(97, 100, dtype=torch.float32)
    _check_siglip(a, b, 1e4, None, grad=1.0)


# ----------------------------------------------------------------------------- multi-view oracle


def dense_selfsim(u, scale, per_view, groups):
    """(V, N) row LSEs of the contract with an explicit (V N, V N) mask."""
    v, n, d = u.shape
    x = u.reshape(v * n, d)
    s = scale * (x @ x.t())
    idx = torch.arange(v * n, device=u.device)
    view, sample = idx // n, idx % n
    allowed = idx[:, None] != idx[None, :]
    if per_view:
        allowed &= view[:, None] == view[None, :]
    if groups is not None:
        g = groups[sample]
        allowed &= ~((g[:, None] == g[None, :]) & (sample[:, None] != sample[None, :]))
    return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=1).reshape(v, n)


def dense_selfsim_grads(u, scale, per_view, groups, grad_rows):
    u = u.detach().requires_grad_()
    scale = scale.detach().requires_grad_()
    lse = dense_selfsim(u, scale, per_view, groups)
    return (lse.detach(), *torch.autograd.grad((lse * grad_rows).sum(), (u, scale)))


def _check_mv(u, scale, per_view, groups, grad_rows=None):
    dtype = u.dtype
    v, n, _ = u.shape
    if grad_rows is None:
        grad_rows = torch.randn(v, n, device=DEVICE)
    s32, s64 = _t(scale, torch.float32), _t(scale, torch.float64)
    lse = cuda_backend.selfsim_rowlse_forward(u, s32, per_view, groups)
    assert lse.shape == (v, n) and lse.dtype == torch.float32
    du, ds = cuda_backend.selfsim_rowlse_backward(u, s32, per_view, groups, lse, grad_rows)
    assert du.dtype == torch.float32 and du.shape == u.shape and ds.shape == ()
    exact = dense_selfsim_grads(u.double(), s64, per_view, groups, grad_rows.double())
    same = dense_selfsim_grads(u.float(), s32, per_view, groups, grad_rows)
    assert_by_rule(("row_lse", "du", "dscale"), (lse, du, ds), same, exact, dtype)


@pytest.mark.parametrize("v,n", [(2, 1), (2, 7), (3, 97), (2, 300), (4, 129)])
@pytest.mark.parametrize("d", [3, 64, 100])
@pytest.mark.parametrize("per_view", [False, True], ids=["stack", "per_view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_multiview_sizes(v, n, d, per_view, dtype):
    if per_view and n == 1:
        pytest.skip("per-view rows of a 1-sample view have no column (row_lse = -inf)")
    _check_mv(_unit(v, n, d, dtype=dtype), 10.0, per_view, None)


@pytest.mark.parametrize("per_view", [False, True], ids=["stack", "per_view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gdtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.usefixtures("kernel_target")
def test_multiview_groups(per_view, dtype, gdtype):
    n = 131
    groups = torch.randint(0, 40, (n,), device=DEVICE, dtype=gdtype)  # many duplicates
    groups[:3] = 1000  # one group of three
    _check_mv(_unit(3, n, 70, dtype=dtype), 14.0, per_view, groups)


@pytest.mark.usefixtures("kernel_target")
def test_multiview_strided_and_empty_rows():
    base = _unit(5, 40, 90, dtype=torch.float32)
    u = base.transpose(0, 1)[:3]  # (3, 5, 90) view, strides (90, 3600, 1): view stride < row's
    _check_mv(u, 8.0, False, None)
    _check_mv(base[:, :, ::3], 8.0, True, None)  # stride_d = 3
    # A sample whose group is everything: per-view rows have no column -> -inf, du 0 there.
    groups = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    w = _unit(2, 4, 16, dtype=torch.float32)
    lse = cuda_backend.selfsim_rowlse_forward(w, _t(5.0, torch.float32), True, groups)
    assert torch.isneginf(lse).all()
    du, ds = cuda_backend.selfsim_rowlse_backward(
        w, _t(5.0, torch.float32), True, groups, lse, torch.ones(2, 4, device=DEVICE)
    )
    assert torch.equal(du, torch.zeros_like(du)) and ds.item() == 0.0


# ----------------------------------------------------------------------------- CLIP groups


def dense_clip_groups(a, b, scale, bias, groups, grad):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    scale = scale.detach().requires_grad_()
    bias_t = (bias if bias is not None else torch.zeros_like(scale)).detach().requires_grad_()
    s = scale * (a @ b.t()) + bias_t
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    s = s.masked_fill((groups[:, None] == groups[None, :]) & ~eye, float("-inf"))
    row, col, diag = torch.logsumexp(s, 1), torch.logsumexp(s, 0), s.diagonal()
    loss = 0.5 * ((row - diag).mean() + (col - diag).mean())
    grads = torch.autograd.grad(loss * grad, (a, b, scale, bias_t))
    return (row.detach(), col.detach(), diag.detach(), *grads)


@pytest.mark.parametrize("n", [1, 7, 97, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("gdtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.usefixtures("kernel_target")
def test_clip_groups(n, dtype, gdtype):
    d = 100
    a, b = _unit(n, d, dtype=dtype), _unit(n, d, dtype=dtype)
    groups = torch.randint(0, max(1, n // 3), (n,), device=DEVICE, dtype=gdtype)
    s32, s64, b32, b64 = (_t(20.0, torch.float32), _t(20.0, torch.float64),
                          _t(-1.5, torch.float32), _t(-1.5, torch.float64))  # fmt: skip
    fwd = cuda_backend.clip_forward(a, b, s32, b32, groups)
    bwd = cuda_backend.clip_backward(a, b, s32, b32, fwd[0], fwd[1], _t(0.8, torch.float32),
                                     groups)  # fmt: skip
    g64 = groups.long()
    exact = dense_clip_groups(a.double(), b.double(), s64, b64, g64, 0.8)
    same = dense_clip_groups(a.float(), b.float(), s32, b32, g64, 0.8)
    names = ("row_lse", "col_lse", "diag", "da", "db", "dscale", "dbias")
    assert_by_rule(names, (*fwd, *bwd), same, exact, dtype)


@pytest.mark.usefixtures("kernel_target")
def test_clip_distinct_groups_equal_no_groups_bitwise():
    """All ids distinct masks nothing: the results equal the ungrouped kernels bit for bit."""
    a, b = _unit(130, 70, dtype=torch.bfloat16), _unit(130, 70, dtype=torch.bfloat16)
    s = _t(30.0, torch.float32)
    plain = cuda_backend.clip_forward(a, b, s, None)
    grouped = cuda_backend.clip_forward(a, b, s, None, torch.arange(130, device=DEVICE))
    for x, y in zip(plain, grouped):
        assert torch.equal(x, y)
    g = _t(1.0, torch.float32)
    pb = cuda_backend.clip_backward(a, b, s, None, plain[0], plain[1], g)
    gb = cuda_backend.clip_backward(a, b, s, None, plain[0], plain[1], g,
                                    torch.arange(130, device=DEVICE))  # fmt: skip
    assert torch.equal(pb[1], gb[1]) and torch.equal(pb[2], gb[2])  # deterministic parts


# ----------------------------------------------------------------------------- no GPU


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: this checks the no-GPU error path")
def test_cpu_tensors_raise_clearly():
    x = torch.randn(5, 3)
    u = torch.randn(2, 5, 3)
    s = torch.tensor(1.0)
    g = torch.arange(5)
    v = torch.zeros(2, 5)
    calls = [
        lambda: cuda_backend.siglip_forward(x, x, s, None),
        lambda: cuda_backend.siglip_backward(x, x, s, s, s),
        lambda: cuda_backend.selfsim_rowlse_forward(u, s, False, None),
        lambda: cuda_backend.selfsim_rowlse_backward(u, s, True, g, v, v),
        lambda: cuda_backend.clip_forward(x, x, s, None, g),
        lambda: cuda_backend.clip_backward(x, x, s, None, g.float(), g.float(), s, g),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"cannot run .*(needs CUDA tensors|not built|no )"):
            call()


@pytest.mark.skipif(not (HAS_SIGLIP and HAS_MV), reason="_C lacks the kernels")
@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: this checks the no-GPU error path")
def test_c_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match=r"_C\.siglip_forward: a_ptr is null"):
        _C.siglip_forward(0, 0, 5, 3, 3, 1, 3, 1, "float32", 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"_C\.selfsim_rowlse_forward: v must be >= 1"):
        _C.selfsim_rowlse_forward(8, 0, 5, 3, 15, 3, 1, "float32", 8, False, 0, 8, 8, 64, 0)
    with pytest.raises(RuntimeError, match=r"_C\.siglip_forward_workspace_elems: .*failed"):
        _C.siglip_forward_workspace_elems(5, 3, 0)
    with pytest.raises(RuntimeError, match=r"_C\.selfsim_rowlse_backward: .*failed"):
        _C.selfsim_rowlse_backward(1 << 20, 2, 5, 3, 15, 3, 1, "float32", 8, True, 0,
                                   8, 8, 8, 8, 8, 64, 0)  # fmt: skip
