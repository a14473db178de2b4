"""CLIP InfoNCE through the public API, on every backend that can run here, against the
float64 reference by the verification rule (docs/verification.md); the cases CLIP shares
with SigLIP (sizes, dtypes, unnormalized features) are in test_pair_objectives.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flashcontrast
from flashcontrast import reference
from gradcheck_inputs import pair_leaves
from verification import (
    BACKENDS,
    assert_by_rule,
    check_pair_objective,
    clip_lse_rounding_allowance,
    pair_inputs,
    pair_loss_and_grads,
)

NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


def _check(backend, n, d, dtype, scale, bias, grad_out=1.7):
    ours = lambda *x: flashcontrast.clip_loss(*x, backend=backend)  # noqa: E731
    check_pair_objective(ours, reference.clip_loss, n, d, dtype, scale, bias, grad_out)
    assert flashcontrast.last_backend() == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
@pytest.mark.parametrize("bias", [None, -2.5])
def test_scales_and_bias(backend, scale, bias):
    _check(backend, 97, 64, torch.float32, scale=scale, bias=bias, grad_out=-0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_scale_is_finite(backend):
    """s = 1e4: the logits span +-1e4, where a naive exp overflows.

    The result must be finite and meet the rule against the float32 reference, with the
    gradients allowed the error the contract's float32 LSEs owe: softmax probabilities
    recomputed from saved LSEs of magnitude 1e4 (the blockwise design, as in flash
    attention) are up to |lse| 2^-24 ~ 6e-4 relatively off, where the reference's fused
    log_softmax subtracts the exact row maximum first (verification.
    clip_lse_rounding_allowance). A fixed bound (1e-4 of each output's magnitude, as here
    before) is not one: how far the gradient moves depends on how many rows have their top
    two logits within a few units of each other: it failed at torch.manual_seed 81, 117
    and 149 (the float32 reference itself failed it at 81 and 149).
    """
    a, b = pair_inputs(97, 100, torch.float32)
    exact = pair_loss_and_grads(reference.clip_loss, a, b, 1e4, None, 1.7, torch.float64)
    same = pair_loss_and_grads(reference.clip_loss, a, b, 1e4, None, 1.7, torch.float32)
    ours = pair_loss_and_grads(
        lambda *x: flashcontrast.clip_loss(*x, backend=backend), a, b, 1e4, None, 1.7
    )
    extra = clip_lse_rounding_allowance(a, b, 1e4, None, 1.7)
    allowance = [0.0, extra["da"], extra["db"], extra["dscale"]]
    assert_by_rule(NAMES[:4], ours, same, exact, torch.float32, allowance)


def test_gradcheck_float64_torch_backend():
    a, b, s, bias = pair_leaves(9, 5)
    assert torch.autograd.gradcheck(
        lambda *x: flashcontrast.clip_loss(*x, backend="torch"), (a, b, s, bias)
    )


def test_scale_shapes_and_python_floats():
    a, b = pair_inputs(13, 8, torch.float32)
    want = reference.clip_loss(a, b, torch.tensor(7.0))
    for scale in (7.0, 7, torch.tensor([7.0]), torch.tensor(7.0, dtype=torch.float64)):
        torch.testing.assert_close(flashcontrast.clip_loss(a, b, scale, backend="torch"), want)
    param = torch.nn.Parameter(torch.tensor([7.0]))
    flashcontrast.clip_loss(a, b, param, backend="torch").backward()
    assert param.grad is not None and param.grad.shape == (1,)


def test_module_and_backend_visibility():
    a, b = pair_inputs(13, 8, torch.float32)
    module = flashcontrast.ClipLoss(backend="torch")
    assert "torch" in repr(module)
    torch.testing.assert_close(module(a, b, 3.0), reference.clip_loss(a, b, torch.tensor(3.0)))
    assert flashcontrast.backend_for("clip", "cpu") == "torch"
    flashcontrast.clip_loss(a, b, 3.0, backend="reference")
    assert flashcontrast.last_backend() == "reference"


def test_torch_compile_fullgraph():
    a, b = pair_inputs(33, 16, torch.float32)

    def step(x, y, s):
        return flashcontrast.clip_loss(x, y, s, backend="torch") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s = torch.tensor(10.0, requires_grad=True)
        loss = fn(x, y, s)
        loss.backward()
        outs.append([loss.detach(), x.grad, y.grad, s.grad])
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(4, 3), torch.randn(5, 3), 1.0), ValueError, "same shape"),
        ((torch.randn(4), torch.randn(4), 1.0), ValueError, "2-D"),
        ((torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), 1.0), TypeError, "dtype"),
        ((torch.randn(4, 3), torch.randn(4, 3, device="meta"), 1.0), ValueError, "device"),
        ((torch.randn(0, 3), torch.randn(0, 3), 1.0), ValueError, "empty batch"),
        ((torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), ValueError, "logit_scale"),
        ((torch.randn(4, 3), torch.randn(4, 3), "1"), TypeError, "logit_scale"),
        ((torch.randn(4, 3).int(), torch.randn(4, 3).int(), 1.0), TypeError, "float32"),
        (([[1.0]], torch.randn(1, 1), 1.0), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clearly(args, error, match):
    with pytest.raises(error, match=match):
        flashcontrast.clip_loss(*args, backend="torch")


def test_unknown_and_unavailable_backends():
    a, b = pair_inputs(4, 3, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        flashcontrast.clip_loss(a, b, 1.0, backend="fast")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run clip"):
        flashcontrast.clip_loss(a, b, 1.0, backend="cuda")


def test_triton_on_cpu_without_interpreter_raises():
    code = (
        "import torch, flashcontrast\n"
        "a = torch.randn(4, 3)\n"
        "try:\n"
        "    flashcontrast.clip_loss(a, a, 1.0, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "RAISED" in out.stdout, out.stderr
    assert "TRITON_INTERPRET" in out.stdout
