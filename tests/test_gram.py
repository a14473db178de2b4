"""GRAM volume loss (objectives.md section 4) through the public API, on the torch and
Triton backends, against the float64 reference by DESIGN.md's verification rule.
"""

from __future__ import annotations

import pytest
import torch

from flashcontrast import GramLoss, _dispatch, gram_loss, gram_volume, reference
from flashcontrast.backends import blockwise
from flashcontrast.bench.memory import memory_use
from verification import BACKENDS, TRITON_SKIP, assert_by_rule


def _inputs(n, d, m, dtype, normalize=True):
    xs = [torch.randn(n, d) for _ in range(m)]
    if normalize:
        xs = [torch.nn.functional.normalize(x, dim=1) for x in xs]
    return [x.to(dtype) for x in xs]


def _loss_and_grads(fn, xs, scale, grad_out, acc=None):
    xs = [x.detach().to(acc or x.dtype).requires_grad_() for x in xs]
    dt = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=dt, requires_grad=True)
    loss = fn(xs[0], xs[1:], s)
    return [loss.detach(), *torch.autograd.grad(loss * grad_out, [*xs, s])]


def _check(backend, n, d, m, dtype, scale, eps, grad_out=1.7, normalize=True):
    xs = _inputs(n, d, m, dtype, normalize)
    names = ["loss", "d_anchor", *[f"d_others[{k}]" for k in range(m - 1)], "d_scale"]

    def ref(a, o, s):
        return reference.gram_loss(a, o, s, label_smoothing=eps)

    def ours(a, o, s):
        return gram_loss(a, o, s, label_smoothing=eps, backend=backend)

    exact = _loss_and_grads(ref, xs, scale, grad_out, torch.float64)
    same = _loss_and_grads(ref, xs, scale, grad_out, dtype)
    got = _loss_and_grads(ours, xs, scale, grad_out)
    assert _dispatch.last_backend() == backend
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_by_rule(names, got, same, exact, dtype)


# D >= M throughout: with D < M the M vectors are always dependent, every volume is 0 in
# exact arithmetic and the computed ones (and their ~1/sqrt gradients) are rounding noise.
SHAPES = [(2, 1, 3), (3, 7, 3), (4, 37, 17), (6, 7, 17), (3, 37, 64), (2, 37, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "n", "d"), SHAPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_reference_fp32(backend, m, n, d, eps):
    _check(backend, n, d, m, torch.float32, scale=10.0, eps=eps)


@pytest.mark.parametrize(("m", "n", "d"), SHAPES)
def test_matches_reference_float64_torch(m, n, d):
    _check("torch", n, d, m, torch.float64, scale=10.0, eps=0.1, grad_out=-0.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_scales(backend, scale):
    _check(backend, 37, 17, 4, torch.float32, scale=scale, eps=0.1, grad_out=-0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalized_and_strided(backend):
    _check(backend, 37, 17, 3, torch.float32, scale=2.0, eps=0.0, normalize=False)
    a = torch.randn(24, 40).t()[:, :17]  # (40, 17) column-major view
    o = [torch.randn(40, 34)[:, ::2], torch.randn(17, 40).t()]
    assert not a.is_contiguous() and not o[0].is_contiguous()
    got = gram_loss(a, o, 3.0, backend=backend)
    want = reference.gram_loss(a.double(), [x.double() for x in o], 3.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64_torch_backend():
    xs = [torch.randn(6, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, o1, o2, s: gram_loss(a, [o1, o2], s, label_smoothing=0.1, backend="torch"),
        (*xs, s),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_gradients_at_collinear_and_coincident_inputs(backend):
    """Coincident (o^1 = t), collinear (o^2 = 2 o^1: every H_j singular) and a duplicated
    sample: det = 0 exactly in many places, where sqrt(|det|) (the published code) has NaN
    gradients. Ours are finite, and the loss still matches the reference."""
    t = torch.nn.functional.normalize(torch.randn(9, 8), dim=1)
    t[3] = t[2]
    o1 = t.clone()
    o2 = 2.0 * o1
    o3 = torch.randn(9, 8)
    for others in ([o1], [o1, o2], [o2, o3], [o1, o2, o3]):
        a = t.clone().requires_grad_()
        os_ = [o.clone().requires_grad_() for o in others]
        s = torch.tensor(4.0, requires_grad=True)
        loss = gram_loss(a, os_, s, label_smoothing=0.1, backend=backend)
        grads = torch.autograd.grad(loss, [a, *os_, s])
        assert torch.isfinite(loss)
        for g in grads:
            assert torch.isfinite(g).all()
        want = reference.gram_loss(t.double(), [o.double() for o in others], 4.0, 0.1)
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4)
    # The published form sqrt(|det G|) through torch.linalg.det: NaN at det = 0.
    x = t[:2].clone().requires_grad_()
    g = torch.stack([x[0], x[0]]) @ torch.stack([x[0], x[0]]).T
    torch.linalg.det(g).abs().sqrt().backward()
    assert not torch.isfinite(x.grad).all()


def test_gram_volume_matches_reference():
    a = torch.randn(11, 9, dtype=torch.float64, requires_grad=True)
    o = [torch.randn(5, 9, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    got, want = gram_volume(a, o), reference.gram_volume(a, o)
    assert got.shape == (11, 5)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.sum(), [a, *o])
    for g, w in zip(grads, torch.autograd.grad(want.sum(), [a, *o])):
        torch.testing.assert_close(g, w)
    half = gram_volume(a.detach().bfloat16(), [x.detach().bfloat16() for x in o])
    assert half.dtype == torch.float32


def test_module_reference_backend_and_python_scalars():
    xs = _inputs(13, 8, 3, torch.float32)
    module = GramLoss(label_smoothing=0.1, backend="torch")
    assert "0.1" in repr(module) and "torch" in repr(module)
    want = reference.gram_loss(xs[0], xs[1:], torch.tensor(3.0), 0.1)
    torch.testing.assert_close(module(xs[0], xs[1:], 3.0), want)
    torch.testing.assert_close(module(xs[0], tuple(xs[1:]), torch.tensor([3.0])), want)
    ref = gram_loss(xs[0], xs[1:], 3.0, label_smoothing=0.1, backend="reference")
    assert _dispatch.last_backend() == "reference"
    torch.testing.assert_close(ref, want)
    param = torch.nn.Parameter(torch.tensor([3.0]))
    module(xs[0], xs[1:], param).backward()
    assert param.grad is not None and param.grad.shape == (1,)


def test_torch_compile_fullgraph():
    xs = _inputs(21, 16, 3, torch.float32)

    def step(a, o1, o2, s):
        return gram_loss(a, [o1, o2], s, label_smoothing=0.1, backend="torch") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        leaves = [x.clone().requires_grad_() for x in xs]
        s = torch.tensor(10.0, requires_grad=True)
        loss = fn(*leaves, s)
        loss.backward()
        outs.append([loss.detach(), *(x.grad for x in leaves), s.grad])
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager)


_A = torch.randn(4, 3)
_O = [torch.randn(4, 3)]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((_A, _O[0], 1.0), {}, TypeError, "list or tuple"),
        ((_A, [], 1.0), {}, ValueError, "at least one other modality"),
        ((_A, [torch.randn(4, 3)] * 8, 1.0), {}, ValueError, "up to 7"),
        ((_A, [torch.randn(5, 3)], 1.0), {}, ValueError, "same shape"),
        ((_A, [torch.randn(4, 3, dtype=torch.float64)], 1.0), {}, TypeError, "dtype"),
        ((_A, [torch.randn(4, 3, device="meta")], 1.0), {}, ValueError, "device"),
        ((torch.randn(4), _O, 1.0), {}, ValueError, "2-D"),
        ((torch.randn(0, 3), [torch.randn(0, 3)], 1.0), {}, ValueError, "empty batch"),
        ((_A, _O, torch.ones(2)), {}, ValueError, "logit_scale"),
        ((_A, _O, 1.0), {"label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ((_A, _O, 1.0), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ((_A, _O, 1.0), {"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
        ((_A, _O, 1.0), {"backend": "fast"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_raises_clearly(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        gram_loss(*args, **{"backend": "torch", **kwargs})


def test_triton_rejects_float64():
    if TRITON_SKIP is not None:
        pytest.skip(TRITON_SKIP)
    xs = _inputs(4, 3, 2, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        gram_loss(xs[0], xs[1:], 1.0, backend="triton")


@pytest.mark.slow
def test_scale_n8192_m4_on_cpu_memory_linear(monkeypatch):
    """The issue's scale test: M = 4 at N = 8192 (D = 16) on the CPU, torch backend.

    One N x N float32 matrix is 256 MiB and the published (N, N, M, M) Gram tensor 4 GiB;
    the inputs are 2 MiB. With a budget of 32 rows x N per (rows x N) buffer (2K + 6 of
    them, 12.6 MB), the peak is a few copies of the inputs plus that one block budget:
    27 MB measured, 9x below one N x N matrix. (~20-45 s on 2 busy CPU cores, most of
    it profiler overhead; deselect with -m 'not slow'.)
    """
    n, d, m, rows = 8192, 16, 4, 32
    k = m - 1
    block_bytes = rows * n * (2 * k + 6) * 4
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", block_bytes // 4)
    xs = _inputs(n, d, m, torch.float32)
    inputs_bytes = m * n * d * 4
    out = {}

    def run():
        leaves = [x.clone().requires_grad_() for x in xs]
        s = torch.tensor(10.0, requires_grad=True)
        loss = gram_loss(leaves[0], leaves[1:], s, label_smoothing=0.1, backend="torch")
        loss.backward()
        out["loss"] = loss.detach()
        out["grads"] = [x.grad for x in leaves] + [s.grad]

    use = memory_use(run, torch.device("cpu"))
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(g).all() for g in out["grads"])
    assert use.peak_bytes <= 8 * inputs_bytes + block_bytes, use
    assert use.peak_bytes < n * n * 4 / 8, use
    assert use.largest_allocation <= max(rows * n * k * 4, k * n * d * 4) + 64, use


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
@pytest.mark.parametrize("m", [2, 6])
def test_triton_gpu_tile_shapes(m):
    """The GPU launchers' tiles (forward 64 x 64, backward 64 x 32, D chunks of 32: see
    triton/gram.py's _tiles) give the reference's loss and gradients in the interpreter."""
    from flashcontrast.backends.triton.clip import override_tiles

    with override_tiles(block_m=64, block_n=32, block_d=32):
        _check("triton", 97, 40, m, torch.float32, scale=10.0, eps=0.1)
    with override_tiles(block_m=64, block_n=64, block_d=32):
        _check("triton", 97, 40, m, torch.float32, scale=10.0, eps=0.1)
