"""The CUDA backend's Symile "n_squared" and GRAM kernels (csrc/kernels/symile.cu, gram.cu)
against dense float64 computations of the contract formulas in
flashcontrast/backends/__init__.py. (Symile "n" runs on the pair engine:
tests/test_cuda_pair.py, tests/test_engine.py.)

Kernel tests run on each ``kernel_target`` (tests/conftest.py): a GPU (marked ``gpu``,
skipped with the reason where torch sees none or ``_C`` is not built) and csrc/ built for the
CPU (tests/cuda_emulator, marked ``emulator``); the fixture sets DEVICE. The last tests run
without a GPU: the backend refuses CPU tensors with a sentence, ``_C`` bad arguments by name.

Rule (tests/verification.py): error(kernel) <= 2 * error(dense float32 on the same rounded
inputs) + atol, errors against float64 (as tests/test_cuda_pair.py).
"""

from __future__ import annotations

import pytest
import torch

from c_structs import gram_params, triple_params
from flashcontrast import _cuda_ext
from flashcontrast.backends import cuda as cuda_backend
from flashcontrast.backends.gram import GramBlock, GramCoefs
from verification import assert_by_rule

HAS_C = _cuda_ext.HAS_C
HAS_CUDA = torch.cuda.is_available()
HAS_SYMILE = "symile" in cuda_backend.OBJECTIVES
HAS_GRAM = "gram" in cuda_backend.OBJECTIVES


DEVICE = "cuda"  # set per test by the kernel_target fixture
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def _unit(n, d, dtype, count=1):
    xs = [
        torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1) for _ in range(count)
    ]
    return [x.to(dtype) for x in xs]


def _grads(fn, inputs, wrt):
    """(outputs, autograd grads of the scalar fn(...)[-1] w.r.t. inputs[wrt])."""
    inputs = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    *outs, loss = fn(*inputs)
    grads = torch.autograd.grad(loss, [inputs[i] for i in wrt])
    return [o.detach() for o in outs], list(grads)


# ----------------------------------------------------------------------------- symile n2


def dense_n2(x, y, z, scale, grad_rows):
    logits = scale * torch.einsum("id,jd,kd->ijk", x, y, z)
    row_lse = torch.logsumexp(logits.reshape(x.shape[0], -1), 1)
    return row_lse, (grad_rows * row_lse).sum()


def _check_n2(x, y, z, scale):
    """x (n, D) against the m^2 pairs of y, z (m, D), n = m or not."""
    (n, d), m = x.shape, y.shape[0]
    grad_rows = torch.randn(n, device=DEVICE) / n
    s32 = torch.tensor(scale, device=DEVICE)
    lse = cuda_backend.symile_n2_forward(x, y, z, s32)
    ours = [lse, *cuda_backend.symile_n2_backward(x, y, z, s32, lse, grad_rows)]

    def ref(dt):
        args = [x.to(dt), y.to(dt), z.to(dt), torch.tensor(scale, dtype=dt, device=DEVICE),
                grad_rows.to(dt)]  # fmt: skip
        (lse,), grads = _grads(dense_n2, args, (0, 1, 2, 3))
        return [lse, *grads]

    assert [tuple(t.shape) for t in ours] == [(n,), (n, d), (m, d), (m, d), ()]
    assert all(t.dtype == torch.float32 for t in ours[1:4])  # fp32 for every input dtype
    assert_by_rule(("row_lse", "dx", "dy", "dz", "dscale"), ours, ref(torch.float32),
                   ref(torch.float64), x.dtype)  # fmt: skip


@pytest.mark.parametrize("n", [1, 7, 67])
@pytest.mark.parametrize("d", [3, 40, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_symile_n2(n, d, dtype):
    # sum_d x y z of unit vectors is ~ 1/D: scale by sqrt(D) to keep logits O(scale).
    x, y, z = _unit(n, d, dtype, 3)
    _check_n2(x, y, z, 10.0 * d**0.5)


@pytest.mark.usefixtures("kernel_target")
def test_symile_n2_strided():
    x, y = _unit(70, 48, torch.float32, 2)
    z_full = torch.zeros(70, 100, device=DEVICE)
    z_full[:, 1:97:2] = _unit(70, 48, torch.float32)[0]
    _check_n2(x.t().contiguous().t(), y, z_full[:, 1:97:2], 40.0)


@pytest.mark.parametrize(("n", "m"), [(5, 9), (9, 5), (1, 7), (7, 1), (70, 9), (9, 70)])
@pytest.mark.parametrize("d", [3, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_symile_n2_rectangular(n, m, d, dtype):
    """Rows x (n, D) against the m^2 pairs of y, z (m, D), as the Triton and torch backends
    take them (a process group's rank-local part): n != m either way, two 64-row blocks of
    x against one column block of z and one against two, D one or two 32-wide chunks, the
    last block and chunk partial."""
    x = _unit(n, d, dtype)[0]
    y, z = _unit(m, d, dtype, 2)
    _check_n2(x, y, z, 10.0 * d**0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_symile_n2_rectangular_partial_blocks(dtype):
    """Two row blocks of x (the second of 2 rows) against three column blocks of z (the last
    of 2), strided y."""
    x = _unit(66, 40, dtype)[0]
    y_full = torch.zeros(130, 90, device=DEVICE, dtype=dtype)
    y_full[:, 1:81:2] = _unit(130, 40, dtype)[0]
    _check_n2(x, y_full[:, 1:81:2], _unit(130, 40, dtype)[0], 60.0)


@pytest.mark.usefixtures("kernel_target")
def test_symile_n2_no_rows_or_no_pairs():
    """n = 0: no row LSEs; m = 0: every row LSE -inf (no candidate); the gradients of
    either exactly 0 in their shapes, nothing launched."""
    s = torch.tensor(3.0, device=DEVICE)
    for n, m in ((0, 6), (4, 0)):
        x, y = _unit(n, 8, torch.float32)[0], _unit(m, 8, torch.float32)[0]
        lse = cuda_backend.symile_n2_forward(x, y, y, s)
        assert lse.shape == (n,) and bool((lse == float("-inf")).all())
        grads = cuda_backend.symile_n2_backward(x, y, y, s, lse, torch.ones(n, device=DEVICE))
        assert [tuple(t.shape) for t in grads] == [(n, 8), (m, 8), (m, 8), ()]
        assert all(not t.any() for t in grads)


@pytest.mark.usefixtures("kernel_target")
def test_symile_n2_rejects_mismatched_shapes():
    x, y = _unit(4, 8, torch.float32)[0], _unit(5, 8, torch.float32)[0]
    s = torch.tensor(3.0, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \(n, D\) and y, z \(m, D\)"):
        cuda_backend.symile_n2_forward(x, y, y[:4], s)
    with pytest.raises(ValueError, match=r"x \(n, D\) and y, z \(m, D\)"):
        cuda_backend.symile_n2_forward(x[:, :6], y, y, s)


# ----------------------------------------------------------------------------- GRAM


def gram_constants(others):
    """det_h (N,), adj_h (N, K, K) of the K x K Gram matrices (float64), and the float32
    degeneracy floor floor_h (N,) = 64 eps_32 prod_r |o^r_j|^2 (the contract's input)."""
    h = torch.einsum("rnd,snd->nrs", others.double(), others.double())
    det = torch.linalg.det(h)
    floor = 64 * torch.finfo(torch.float32).eps * h.diagonal(dim1=1, dim2=2).prod(dim=1)
    return det, det[:, None, None] * torch.linalg.inv(h), floor


def dense_gram(anchor, others, scale, det_h, adj_h, floor_h, grad, eps):
    """The contract's L = -scale V, V = sqrt(det) above the floor |t_i|^2 floor_h_j, with
    det_h / adj_h as inputs (so that autograd gives col_tt = d/d det_h and col_uu =
    -d/d adj_h), torch's smoothed CE."""
    u = torch.einsum("id,rjd->ijr", anchor, others)
    tt = (anchor * anchor).sum(1)
    det = det_h[None, :] * tt[:, None] - torch.einsum("ijr,jrs,ijs->ij", u, adj_h, u)
    pos = det > tt.detach()[:, None] * floor_h[None, :]
    v = torch.where(pos, torch.sqrt(torch.where(pos, det, torch.ones_like(det))), 0.0)
    logits = -scale * v
    labels = torch.arange(anchor.shape[0], device=anchor.device)
    ce = torch.nn.functional.cross_entropy
    loss = 0.5 * (
        ce(logits, labels, label_smoothing=eps) + ce(logits.t(), labels, label_smoothing=eps)
    )
    stats = (torch.logsumexp(logits, 1), torch.logsumexp(logits, 0), logits.diagonal(),
             logits.sum(1), logits.sum(0))  # fmt: skip
    return (*stats, grad * loss)


def _check_gram(anchor, others, scale, eps=0.1, grad=1.3):
    k, n, d = others.shape
    det_h, adj_h, floor_h = gram_constants(others)
    s32 = torch.tensor(scale, device=DEVICE)
    consts = det_h.float(), adj_h.float(), floor_h.float()
    block = GramBlock(anchor, others, s32, *consts)
    fwd = cuda_backend.gram_forward(block)
    bwd = cuda_backend.gram_backward(
        block, GramCoefs(fwd[0], fwd[1], torch.tensor(grad, device=DEVICE), eps)
    )
    ours = [*fwd, *bwd]

    def ref(dt):
        args = [anchor.to(dt), others.to(dt), torch.tensor(scale, dtype=dt, device=DEVICE),
                det_h.to(dt), adj_h.to(dt), floor_h.to(dt)]  # fmt: skip
        stats, (da, do, ds, dtt, dadj) = _grads(
            lambda *a: dense_gram(*a, grad, eps), args, (0, 1, 2, 3, 4)
        )
        return [*stats, da, do, ds, dtt, -dadj]

    names = ("row_lse", "col_lse", "diag", "row_sum", "col_sum",
             "d_anchor", "d_others_u", "dscale", "col_tt", "col_uu")  # fmt: skip
    assert bwd[0].dtype == anchor.dtype and bwd[1].shape == (k, n, d)
    assert_by_rule(names, ours, ref(torch.float32), ref(torch.float64), anchor.dtype)


@pytest.mark.parametrize("n", [1, 7, 97, 130])
@pytest.mark.parametrize(("k", "d"), [(1, 7), (2, 64), (4, 100), (5, 33)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.usefixtures("kernel_target")
def test_gram(n, k, d, dtype):
    anchor = _unit(n, d, dtype)[0]
    others = torch.stack(_unit(n, d, dtype, k))
    _check_gram(anchor, others, 1 / 0.07)


@pytest.mark.usefixtures("kernel_target")
def test_gram_strided_no_smoothing():
    anchor = _unit(77, 50, torch.float32)[0].t().contiguous().t()
    others = torch.stack(_unit(77, 50, torch.float32, 3), dim=1).transpose(0, 1)  # (K, N, D) view
    assert not others.is_contiguous()
    _check_gram(anchor, others, 5.0, eps=0.0, grad=-0.7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.usefixtures("kernel_target")
def test_gram_rectangular_out_dtype_and_total(dtype):
    """A rectangular block (n = 70 rows against m = 45 columns, row_offset = 20) with
    out_dtype=float32 and total = 200: d_anchor (n, D) and d_others_u (K, m, D) come back
    in float32, and rounded to the inputs' dtype they are the out_dtype=None call's; both
    are close to the float32 call on the same rounded inputs."""
    n, m, k, d = 70, 45, 2, 40
    anchor = _unit(n, d, dtype)[0]
    others = torch.stack(_unit(m, d, dtype, k))
    det_h, adj_h, floor_h = (c.float() for c in gram_constants(others))
    s32, g = torch.tensor(7.0, device=DEVICE), torch.tensor(0.9, device=DEVICE)

    def call(t, o, out_dtype):
        block = GramBlock(t, o, s32, det_h, adj_h, floor_h, row_offset=20)
        fwd = cuda_backend.gram_forward(block)
        bwd = cuda_backend.gram_backward(block, GramCoefs(fwd[0], fwd[1], g, 0.1, 200), out_dtype)
        return fwd, bwd

    fwd, wide = call(anchor, others, torch.float32)
    _, narrow = call(anchor, others, None)
    _, exact = call(anchor.float(), others.float(), None)
    assert [t.shape for t in fwd] == [(n,), (m,), (n,), (n,), (m,)]
    assert wide[0].dtype == wide[1].dtype == torch.float32 and narrow[0].dtype == dtype
    assert wide[1].shape == (k, m, d)
    for w, nw in zip(wide[:2], narrow[:2]):
        assert torch.equal(w.to(dtype), nw)
    for name, w, e in zip(("d_anchor", "d_others_u", "dscale"), wide, exact):
        torch.testing.assert_close(w, e, rtol=5e-2, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------- no GPU


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: this checks the no-GPU error path")
def test_cpu_tensors_raise_clearly():
    x = torch.randn(5, 3)
    s = torch.tensor(1.0)
    v = torch.zeros(5)
    calls = [
        lambda: cuda_backend.symile_n2_forward(x, x, x, s),
        lambda: cuda_backend.symile_n2_backward(x, x, x, s, v, v),
        lambda: cuda_backend.gram_forward(GramBlock(x, x[None], s, v, torch.ones(5, 1, 1), v)),
        lambda: cuda_backend.gram_backward(
            GramBlock(x, x[None], s, v, torch.ones(5, 1, 1), v), GramCoefs(v, v, s, 0.1)
        ),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"cannot run .*(needs CUDA tensors|not built|no )"):
            call()


@pytest.mark.skipif(not (HAS_C and HAS_SYMILE and HAS_GRAM), reason="_C lacks the kernels")
@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: this checks the no-GPU error path")
def test_c_refuses_bad_arguments_by_name():
    c = _cuda_ext._C
    # symile_n2 and GRAM take typed structs (named fields) and keyword-only addresses.
    triple = triple_params(c, n=0)
    ws = dict(workspace=8, workspace_elems=64, stream=0)
    with pytest.raises(ValueError, match=r"_C\.symile_n2_backward: TripleParams\.n must be >= 1"):
        c.symile_n2_backward(triple, row_lse=8, grad_rows=8, dx=8, dy=8, dz=8, dscale=8, **ws)
    gram = gram_params(c)
    outs = dict(row_lse=8, col_lse=8, diag=8, row_sum=8, col_sum=8, **ws)
    with pytest.raises(ValueError, match=r"_C\.gram_forward: GramParams\.k \(others per sample\)"):
        c.gram_forward(gram, **outs)
    gram.k = 2
    with pytest.raises(RuntimeError, match=r"_C\.gram_forward_workspace_elems: .*failed"):
        c.gram_forward_workspace_elems(gram, device=0)
    triple.x = triple.y = triple.z = 1 << 20
    triple.n = 5
    with pytest.raises(RuntimeError, match=r"_C\.symile_n2_forward: .*failed"):
        c.symile_n2_forward(triple, row_lse=8, **ws)
