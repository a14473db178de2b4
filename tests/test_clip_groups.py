"""CLIP InfoNCE with group masks (``groups=``, false negatives), on every backend that can
run here, against a masked materializing float64 oracle by the verification rule
(docs/verification.md).

Semantics under test: S_ij with i != j and groups_i == groups_j is excluded (-inf) from
both the row and the column logsumexp; the positive S_ii always stays.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import flashcontrast
from gradcheck_inputs import pair_leaves
from verification import BACKENDS, TRITON, TRITON_SKIP, assert_by_rule

NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


def clip_loss_masked(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    groups: Optional[torch.Tensor],
) -> torch.Tensor:
    """The oracle: dense N x N logits, same-group off-diagonal pairs at -inf, then
    OpenCLIP's 1/2 [CE(S, arange) + CE(S^T, arange)]."""
    logits = scale * (a @ b.T)
    if bias is not None:
        logits = logits + bias
    n = a.shape[0]
    if groups is not None:
        same = groups.view(n, 1) == groups.view(1, n)
        same &= ~torch.eye(n, dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(n)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _inputs(n: int, d: int, dtype: torch.dtype = torch.float32):
    a = F.normalize(torch.randn(n, d), dim=1)
    b = F.normalize(torch.randn(n, d), dim=1)
    return a.to(dtype), b.to(dtype)


def _groups(kind: str, n: int) -> torch.Tensor:
    if kind == "distinct":
        return torch.randperm(n) * 3 - 7  # any distinct ids, negatives included
    if kind == "same":
        return torch.full((n,), 5)
    if kind == "dups":
        return torch.randint(0, max(1, n // 4), (n,))
    if kind == "pairs":  # two captions per image, say: ids 0 0 1 1 2 2 ...
        return torch.arange(n) // 2
    raise ValueError(kind)


def _loss_and_grads(fn, a, b, scale, bias, groups, grad_out, acc=None):
    a = a.detach().to(acc or a.dtype).requires_grad_()
    b = b.detach().to(acc or b.dtype).requires_grad_()
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=dt, requires_grad=True)
    bb = torch.tensor(0.0 if bias is None else bias, dtype=dt, requires_grad=True)
    loss = fn(a, b, s, bb, groups)
    grads = torch.autograd.grad(loss * grad_out, [a, b, s, bb], allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip([a, b, s, bb], grads)]
    return [loss.detach(), *grads]


def _ours(backend):
    def fn(a, b, s, bias, groups):
        return flashcontrast.clip_loss(a, b, s, bias, groups=groups, backend=backend)

    return fn


def _check(backend, n, d, kind, scale=10.0, bias=0.3, grad_out=1.7, dtype=torch.float32):
    a, b = _inputs(n, d, dtype)
    g = _groups(kind, n)
    exact = _loss_and_grads(clip_loss_masked, a, b, scale, bias, g, grad_out, torch.float64)
    same = _loss_and_grads(clip_loss_masked, a, b, scale, bias, g, grad_out, torch.float32)
    ours = _loss_and_grads(_ours(backend), a, b, scale, bias, g, grad_out)
    assert flashcontrast.last_backend() == backend
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    assert_by_rule(NAMES, ours, same, exact, dtype)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 97])
@pytest.mark.parametrize("d", [3, 64])
@pytest.mark.parametrize("kind", ["dups", "pairs", "same"])
def test_matches_masked_oracle_fp32(backend, n, d, kind):
    _check(backend, n, d, kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_scales(backend, scale):
    _check(backend, 45, 24, "dups", scale=scale, bias=-1.5, grad_out=-0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    a, b = _inputs(61, 40, dtype)
    g = _groups("dups", 61)
    exact = _loss_and_grads(clip_loss_masked, a, b, 30.0, None, g, 1.3, torch.float64)
    same = _loss_and_grads(clip_loss_masked, a, b, 30.0, None, g, 1.3, torch.float32)
    ours = _loss_and_grads(_ours(backend), a, b, 30.0, None, g, 1.3)
    assert_by_rule(NAMES, ours, same, exact, dtype)


def test_float64_torch_matches_oracle_tightly():
    a, b = _inputs(41, 16, torch.float64)
    g = _groups("dups", 41)
    want = _loss_and_grads(clip_loss_masked, a, b, 20.0, 0.7, g, 2.5)
    got = _loss_and_grads(_ours("torch"), a, b, 20.0, 0.7, g, 2.5)
    assert got[0].dtype == torch.float64
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_distinct_groups_equal_no_groups(backend, dtype):
    """All ids distinct: the very same loss and gradients as groups=None (bitwise)."""
    a, b = _inputs(53, 20)
    g = _groups("distinct", 53).to(dtype)
    with_groups = _loss_and_grads(_ours(backend), a, b, 14.0, 0.2, g, 1.7)
    without = _loss_and_grads(_ours(backend), a, b, 14.0, 0.2, None, 1.7)
    for x, y in zip(with_groups, without):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_same_group_gives_zero(backend):
    """One group: each row and column keeps only its positive, so L = 0, dL = 0."""
    ours = _check(backend, 33, 16, "same")
    for t in ours:
        assert torch.all(t == 0) or t.abs().max() < 1e-6, t


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_and_int64_ids_agree(backend):
    a, b = _inputs(40, 12)
    g = _groups("dups", 40)
    r64 = _loss_and_grads(_ours(backend), a, b, 9.0, None, g, 1.0)
    r32 = _loss_and_grads(_ours(backend), a, b, 9.0, None, g.int(), 1.0)
    for x, y in zip(r64, r32):
        assert torch.equal(x, y)


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
@pytest.mark.parametrize(
    "tiles",
    [
        dict(block_m=16, block_n=16, max_programs=3),  # G, H > 1; SPLIT > 1
        dict(block_m=16, block_n=32, block_d=16, max_programs=5),  # D in chunks
    ],
)
def test_triton_tile_layouts(tiles):
    from flashcontrast.backends.triton._plan import override_tiles

    with override_tiles(**tiles):
        _check("triton", 71, 40, "dups", scale=25.0, bias=0.1, grad_out=0.9)
        _check("triton", 71, 40, "pairs", scale=25.0, bias=None, grad_out=0.9)


def test_reference_backend_uses_the_mask():
    a, b = _inputs(31, 8, torch.float64)
    g = _groups("dups", 31)
    s = torch.tensor(12.0, dtype=torch.float64)
    got = flashcontrast.clip_loss(a, b, s, 0.5, groups=g, backend="reference")
    assert flashcontrast.last_backend() == "reference"
    torch.testing.assert_close(got, clip_loss_masked(a, b, s, torch.tensor(0.5), g))


def test_auto_picks_a_backend_with_groups():
    a, b = _inputs(16, 8)
    g = _groups("dups", 16)
    got = flashcontrast.clip_loss(a, b, 5.0, groups=g)
    assert flashcontrast.last_backend() == "torch"
    want = clip_loss_masked(a.double(), b.double(), torch.tensor(5.0).double(), None, g)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64_torch_backend():
    a, b, s, bias = pair_leaves(11, 5)
    g = torch.tensor([0, 1, 0, 2, 2, 3, 4, 0, 5, 5, 6])

    def fn(*x):
        return flashcontrast.clip_loss(*x, groups=g, backend="torch")

    assert torch.autograd.gradcheck(fn, (a, b, s, bias))


def test_module_forwards_groups():
    a, b = _inputs(19, 8)
    g = _groups("pairs", 19)
    module = flashcontrast.ClipLoss(backend="torch")
    torch.testing.assert_close(
        module(a, b, 4.0, groups=g),
        flashcontrast.clip_loss(a, b, 4.0, groups=g, backend="torch"),
    )


def test_torch_compile_fullgraph_with_groups():
    a, b = _inputs(33, 16)
    g = _groups("dups", 33)

    def step(x, y, s, groups):
        return flashcontrast.clip_loss(x, y, s, groups=groups, backend="torch") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for fn in (step, compiled):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s = torch.tensor(10.0, requires_grad=True)
        loss = fn(x, y, s, g)
        loss.backward()
        outs.append([loss.detach(), x.grad, y.grad, s.grad])
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("backend", ["torch", TRITON, "reference", "auto"])
@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        (torch.zeros(5, dtype=torch.int64), ValueError, "shape"),
        (torch.zeros(4, 1, dtype=torch.int64), ValueError, "shape"),
        (torch.zeros(4), TypeError, "int32 or int64"),
        (torch.zeros(4, dtype=torch.bool), TypeError, "int32 or int64"),
        (torch.zeros(4, dtype=torch.int64, device="meta"), ValueError, "groups is on meta"),
        ([0, 0, 1, 1], TypeError, "integer tensor"),
    ],
)
def test_bad_groups_raise_clearly(backend, groups, error, match):
    a, b = _inputs(4, 3)
    with pytest.raises(error, match=match):
        flashcontrast.clip_loss(a, b, 1.0, groups=groups, backend=backend)


def test_cuda_backend_with_groups_on_cpu_raises_clearly():
    """The CUDA pair engine takes group ids (tests/test_cuda_pair.py, on a GPU and on the
    emulator); on CPU tensors the backend refuses with the reason instead of crashing."""
    a, b = _inputs(4, 3)
    g = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="cuda"):
        flashcontrast.clip_loss(a, b, 1.0, groups=g, backend="cuda")
    from flashcontrast.backends import cuda
    from flashcontrast.backends.pair import Pair

    with pytest.raises(RuntimeError, match="CUDA"):
        cuda.pair_forward(a, b, torch.tensor(1.0), None, Pair("softmax"), row_groups=g,
                          col_groups=g)  # fmt: skip
