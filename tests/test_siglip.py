"""SigLIP's own cases: biases, float64, s = 1e4, strided inputs, several blocks, the
module, torch.compile; each through the public API on every backend that runs here,
checked against the float64 reference by the verification rule (docs/verification.md).
test_pair_objectives.py holds the cases SigLIP shares with CLIP."""

from __future__ import annotations

import pytest
import torch

import flashcontrast
from flashcontrast import SigLipLoss, reference, siglip_loss
from flashcontrast.backends import blockwise
from flashcontrast.bench.memory import memory_use
from gradcheck_inputs import pair_leaves
from verification import (
    BACKENDS,
    TRITON_SKIP,
    assert_by_rule,
    check_pair_objective,
    pair_inputs,
    pair_loss_and_grads,
)

NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


def _ours(backend):
    return lambda *x: siglip_loss(*x, backend=backend)


def _check(backend, n, d, dtype, scale, bias, grad_out=1.7):
    check_pair_objective(_ours(backend), reference.siglip_loss, n, d, dtype, scale, bias, grad_out)
    assert flashcontrast.last_backend() == backend


@pytest.mark.parametrize("n", [1, 7, 97])
@pytest.mark.parametrize("bias", [None, -10.0, 3.0])
def test_matches_reference_float64_torch(n, bias):
    _check("torch", n, 100, torch.float64, scale=30.0, bias=bias, grad_out=-0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("bias", [-10.0, 0.0, 3.0])
def test_scales_and_bias(backend, scale, bias):
    """scale 100 is SigLIP's temperature floor (t = 0.01)."""
    _check(backend, 97, 64, torch.float32, scale=scale, bias=bias, grad_out=-0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [None, -10.0])
def test_extreme_scale_is_finite(backend, bias):
    """s = 1e4: logits span +-1e4, where a naive log(1 + exp) overflows."""
    _check(backend, 97, 100, torch.float32, scale=1e4, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Transposed and column-sliced views give the loss and gradients of contiguous copies."""
    grads = []
    for fn, dtype in ((_ours(backend), torch.float32), (reference.siglip_loss, torch.float64)):
        torch.manual_seed(1)
        base_a = torch.randn(80, 50).to(dtype).requires_grad_()
        base_b = torch.randn(50, 80).to(dtype).requires_grad_()
        a = base_a.t()[:, :40]  # (50, 40), column-major
        b = base_b[:, ::2]  # (50, 40), row stride 80, column stride 2
        assert not a.is_contiguous() and not b.is_contiguous()
        loss = fn(a, b, 5.0, -2.0)
        loss.backward()
        grads.append([loss.detach().double(), base_a.grad.double(), base_b.grad.double()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_blocks(backend, monkeypatch):
    """Several row blocks (torch) / small tiles, multi-chunk D and split grids (triton)."""
    a, b = pair_inputs(130, 70, torch.float32)
    exact = pair_loss_and_grads(reference.siglip_loss, a, b, 20.0, -5.0, 0.9, torch.float64)
    same = pair_loss_and_grads(reference.siglip_loss, a, b, 20.0, -5.0, 0.9, torch.float32)
    if backend == "torch":
        monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", 17 * 130)
        ours = pair_loss_and_grads(_ours(backend), a, b, 20.0, -5.0, 0.9)
    else:
        from flashcontrast.backends.triton._plan import override_tiles

        with override_tiles(block_m=16, block_n=32, block_d=16, max_programs=5):
            ours = pair_loss_and_grads(_ours(backend), a, b, 20.0, -5.0, 0.9)
    assert_by_rule(NAMES, ours, same, exact, torch.float32)


def test_gradcheck_float64_torch_backend(monkeypatch):
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", 4 * 9)  # three row blocks
    a, b, s, bias = pair_leaves(9, 5)
    assert torch.autograd.gradcheck(lambda *x: siglip_loss(*x, backend="torch"), (a, b, s, bias))
    assert torch.autograd.gradcheck(
        lambda x, y, z: siglip_loss(x, y, z, None, backend="torch"), (a, b, s)
    )


def test_scalars_none_bias_and_module():
    a, b = pair_inputs(13, 8, torch.float32)
    want = reference.siglip_loss(a, b, torch.tensor(7.0), torch.tensor(-1.0))
    for scale in (7.0, 7, torch.tensor([7.0]), torch.tensor(7.0, dtype=torch.float64)):
        torch.testing.assert_close(siglip_loss(a, b, scale, -1.0, backend="torch"), want)
    torch.testing.assert_close(
        siglip_loss(a, b, 7.0, None, backend="torch"), siglip_loss(a, b, 7.0, 0.0)
    )
    scale, bias = torch.nn.Parameter(torch.tensor([7.0])), torch.nn.Parameter(torch.tensor([-1.0]))
    module = SigLipLoss(backend="torch")
    assert "torch" in repr(module)
    loss = module(a, b, scale, bias)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert scale.grad.shape == (1,) and bias.grad.shape == (1,)
    siglip_loss(a, b, 3.0, -1.0, backend="reference")
    assert flashcontrast.last_backend() == "reference"
    assert flashcontrast.backend_for("siglip", "cpu") == "torch"


def test_torch_compile_fullgraph():
    a, b = pair_inputs(33, 16, torch.float32)

    def step(x, y, s, t):
        return siglip_loss(x, y, s, t, backend="torch") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s = torch.tensor(10.0, requires_grad=True)
        t = torch.tensor(-10.0, requires_grad=True)
        loss = fn(x, y, s, t)
        loss.backward()
        outs.append([loss.detach(), x.grad, y.grad, s.grad, t.grad])
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(4, 3), torch.randn(5, 3), 1.0, 0.0), ValueError, "same shape"),
        ((torch.randn(4), torch.randn(4), 1.0, 0.0), ValueError, "2-D"),
        (
            (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), 1.0, 0.0),
            TypeError,
            "dtype",
        ),
        ((torch.randn(4, 3), torch.randn(4, 3, device="meta"), 1.0, 0.0), ValueError, "device"),
        ((torch.randn(0, 3), torch.randn(0, 3), 1.0, 0.0), ValueError, "empty batch"),
        ((torch.randn(4, 0), torch.randn(4, 0), 1.0, 0.0), ValueError, "no features"),
        ((torch.randn(4, 3), torch.randn(4, 3), torch.ones(2), 0.0), ValueError, "logit_scale"),
        ((torch.randn(4, 3), torch.randn(4, 3), None, 0.0), TypeError, "logit_scale"),
        ((torch.randn(4, 3), torch.randn(4, 3), 1.0, "0"), TypeError, "logit_bias"),
        ((torch.randn(4, 3), torch.randn(4, 3), 1.0, torch.ones(3)), ValueError, "logit_bias"),
        ((torch.randn(4, 3).int(), torch.randn(4, 3).int(), 1.0, 0.0), TypeError, "float32"),
        (([[1.0]], torch.randn(1, 1), 1.0, 0.0), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clearly(args, error, match):
    with pytest.raises(error, match=match):
        siglip_loss(*args, backend="torch")


def test_unknown_backend_and_triton_float64():
    a, b = pair_inputs(4, 3, torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        siglip_loss(a, b, 1.0, 0.0, backend="fast")
    if TRITON_SKIP is None:
        with pytest.raises(TypeError, match="float64"):
            siglip_loss(a, b, 1.0, 0.0, backend="triton")


def test_torch_backend_allocates_no_n_by_n_buffer(monkeypatch):
    n, d, rows = 3000, 16, 64
    nxn = n * n * 4
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", rows * n)
    a, b = torch.randn(n, d), torch.randn(n, d)

    def fwd_bwd(backend):
        def run():
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            s = torch.tensor(10.0, requires_grad=True)
            t = torch.tensor(-10.0, requires_grad=True)
            siglip_loss(x, y, s, t, backend=backend).backward()

        return run

    ref = memory_use(fwd_bwd("reference"), torch.device("cpu"))
    assert ref.largest_allocation >= nxn, "the measurement must see the reference's N x N"
    ours = memory_use(fwd_bwd("torch"), torch.device("cpu"))
    assert ours.largest_allocation <= rows * n * 4 + 64
    assert ours.peak_bytes < nxn / 10
