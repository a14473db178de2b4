"""MV-InfoNCE and MV-DHEL on the torch and Triton backends, against the float64 reference
(and, with groups, the masked oracles of reference_groups) by the verification rule
(docs/verification.md)."""

from __future__ import annotations

import pytest
import torch

from flashcontrast import (
    MultiviewDHELLoss,
    MultiviewInfoNCELoss,
    _dispatch,
    multiview_dhel_loss,
    multiview_infonce_loss,
    reference,
    reference_groups,
)
from flashcontrast.backends import blockwise
from flashcontrast.bench.memory import memory_use
from verification import BACKENDS, TRITON_SKIP, assert_by_rule

NAMES = ("loss", "d_views", "d_scale")
LOSSES = {
    "infonce": (multiview_infonce_loss, reference_groups.multiview_infonce_loss_masked),
    "dhel": (multiview_dhel_loss, reference_groups.multiview_dhel_loss_masked),
}


def _views(v, n, d, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(v, n, d), dim=-1).to(dtype)


def _loss_and_grads(fn, u, scale, grad_out, groups=None, acc=None):
    x = u.detach().to(acc or u.dtype).requires_grad_()
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=dt, requires_grad=True)
    loss = fn(x, s, groups)
    return [loss.detach(), *torch.autograd.grad(loss * grad_out, [x, s])]


def _check(kind, backend, v, n, d, scale, groups=None, dtype=torch.float32, grad_out=1.7):
    ours_fn, oracle = LOSSES[kind]
    u = _views(v, n, d, dtype)
    exact = _loss_and_grads(oracle, u, scale, grad_out, groups, torch.float64)
    same = _loss_and_grads(oracle, u, scale, grad_out, groups, torch.float32)
    ours = _loss_and_grads(
        lambda x, s, g: ours_fn(x, s, groups=g, backend=backend), u, scale, grad_out, groups
    )
    assert _dispatch.last_backend() == backend
    assert ours[1].dtype == dtype
    assert_by_rule(NAMES, ours, same, exact, dtype)


CASES = [(2, 7, 17), (3, 37, 3), (8, 7, 64), (3, 1, 17), (8, 37, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["infonce", "dhel"])
@pytest.mark.parametrize(("v", "n", "d"), CASES)
def test_matches_reference_fp32(backend, kind, v, n, d):
    if kind == "dhel" and n == 1:
        pytest.skip("MV-DHEL needs N >= 2 (tested in test_bad_inputs)")
    _check(kind, backend, v, n, d, scale=1 / 0.07)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["infonce", "dhel"])
@pytest.mark.parametrize("tau", [1.0, 0.1, 0.01])
def test_temperatures(backend, kind, tau):
    """tau = 0.01 with V = 8: the reference's raw exp would overflow; ours stays finite."""
    _check(kind, backend, 8, 13, 17, scale=1 / tau, grad_out=-0.6)


def test_reference_matches_exact_float64():
    """The reference module and the masked oracle agree without groups (no-groups path)."""
    u = _views(3, 9, 5, torch.float64)
    for kind, ref in (
        ("infonce", reference.multiview_infonce_loss),
        ("dhel", reference.multiview_dhel_loss),
    ):
        ours_fn, oracle = LOSSES[kind]
        want = ref(u, 4.0)
        torch.testing.assert_close(oracle(u, 4.0), want)
        torch.testing.assert_close(ours_fn(u, 4.0, backend="torch"), want)
        torch.testing.assert_close(ours_fn(list(u), 4.0, backend="reference"), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dhel_v2_is_dhel(backend):
    """V = 2: L = mean_i [LSE_{j!=i} s a_i.a_j + LSE_{j!=i} s b_i.b_j - s a_i.b_i]."""
    a, b = _views(2, 11, 8)
    s = 1 / 0.2
    eye = torch.eye(11, dtype=torch.bool)
    aa = (s * a.double() @ a.double().T).masked_fill(eye, float("-inf")).logsumexp(1)
    bb = (s * b.double() @ b.double().T).masked_fill(eye, float("-inf")).logsumexp(1)
    want = (aa + bb - s * (a.double() * b.double()).sum(1)).mean()
    got = multiview_dhel_loss([a, b], s, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


GROUPS = {
    "distinct": lambda n: torch.randperm(n),
    "duplicates": lambda n: torch.randint(0, 4, (n,)),
    "pairs_int32": lambda n: (torch.arange(n) // 2).to(torch.int32),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["infonce", "dhel"])
@pytest.mark.parametrize("groups", sorted(GROUPS))
def test_groups_match_masked_oracle(backend, kind, groups):
    n = 19
    _check(kind, backend, 3, n, 17, scale=10.0, groups=GROUPS[groups](n))


@pytest.mark.parametrize("kind", ["infonce", "dhel"])
def test_distinct_groups_equal_no_groups(kind):
    fn, _ = LOSSES[kind]
    u = _views(3, 15, 6, torch.float64)
    torch.testing.assert_close(
        fn(u, 5.0, groups=torch.randperm(15), backend="torch"), fn(u, 5.0, backend="torch")
    )


def test_groups_change_the_loss_and_oracle_masks_as_documented():
    """Duplicate ids remove exactly the cross-sample same-group similarities."""
    u = _views(2, 4, 3, torch.float64)
    g = torch.tensor([0, 0, 1, 2])
    s = 3.0
    z = u.reshape(8, 3)
    sim = s * z @ z.T
    allowed = ~torch.eye(8, dtype=torch.bool)
    allowed[[0, 0, 1, 1, 4, 4, 5, 5], [1, 5, 0, 4, 1, 5, 0, 4]] = False  # samples 0 and 1
    den = torch.stack([sim[r][allowed[r]].logsumexp(0) for r in range(8)]).view(2, 4)
    num = s * (u[0] * u[1]).sum(1) + torch.log(torch.tensor(2.0, dtype=torch.float64))
    want = (den.logsumexp(0) - num).mean()
    got = multiview_infonce_loss(u, s, groups=g, backend="torch")
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, multiview_infonce_loss(u, s, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_and_strided(backend):
    _check("infonce", backend, 3, 21, 16, scale=20.0, dtype=torch.bfloat16)
    # (N, V, D) storage transposed to (V, N, D): read in place by the kernels.
    w = torch.randn(21, 3, 16).transpose(0, 1)
    assert not w.is_contiguous()
    for fn, ref in (
        (multiview_infonce_loss, reference.multiview_infonce_loss),
        (multiview_dhel_loss, reference.multiview_dhel_loss),
    ):
        got = fn(w, 2.0, backend=backend)
        torch.testing.assert_close(got.double(), ref(w.double(), 2.0), rtol=1e-5, atol=1e-5)


def test_triton_d_chunks_and_small_tiles():
    if TRITON_SKIP is not None:
        pytest.skip(str(TRITON_SKIP))
    from flashcontrast.backends.triton._plan import override_tiles

    with override_tiles(block_m=16, block_n=32, block_d=16):
        _check("infonce", "triton", 3, 23, 50, scale=10.0, groups=torch.randint(0, 5, (23,)))
        _check("dhel", "triton", 3, 23, 50, scale=10.0)


@pytest.mark.parametrize("kind", ["infonce", "dhel"])
def test_gradcheck_float64_torch(kind):
    fn, _ = LOSSES[kind]
    u = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0, 1, 0, 2, 1])
    assert torch.autograd.gradcheck(lambda x, t: fn(x, t, backend="torch"), (u, s))
    assert torch.autograd.gradcheck(lambda x, t: fn(x, t, groups=g, backend="torch"), (u, s))


def test_modules_and_sequence_input():
    views = list(_views(3, 9, 5))
    for module, ref in (
        (MultiviewInfoNCELoss(backend="torch"), reference.multiview_infonce_loss),
        (MultiviewDHELLoss(backend="torch"), reference.multiview_dhel_loss),
    ):
        assert "torch" in repr(module)
        torch.testing.assert_close(module(views, 3.0), ref(views, 3.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(views=torch.randn(1, 4, 3)), ValueError, "V >= 2"),
        (dict(views=[torch.randn(4, 3)]), ValueError, "V >= 2"),
        (dict(views=torch.randn(4, 3)), ValueError, r"\(V, N, D\)"),
        (dict(views=[torch.randn(4, 3), torch.randn(5, 3)]), ValueError, "shape"),
        (dict(views=torch.randn(2, 4, 3).int()), TypeError, "float32"),
        (dict(views=torch.randn(2, 0, 3)), ValueError, "empty batch"),
        (dict(groups=torch.zeros(5, dtype=torch.long)), ValueError, "groups"),
        (dict(groups=torch.zeros(4, 1, dtype=torch.long)), ValueError, "groups"),
        (dict(groups=torch.zeros(4)), TypeError, "integer"),
        (dict(groups=torch.zeros(4, dtype=torch.bool)), TypeError, "integer"),
        (dict(groups=[0, 1, 2, 3]), TypeError, "integer tensor"),
        (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale"),
    ],
)
@pytest.mark.parametrize("kind", ["infonce", "dhel"])
def test_bad_inputs(kind, kwargs, error, match):
    fn, _ = LOSSES[kind]
    args = dict(views=torch.randn(2, 4, 3), logit_scale=1.0, groups=None) | kwargs
    with pytest.raises(error, match=match):
        fn(args["views"], args["logit_scale"], groups=args["groups"], backend="torch")


def test_dhel_needs_two_samples_and_triton_rejects_float64():
    with pytest.raises(ValueError, match="N >= 2"):
        multiview_dhel_loss(torch.randn(3, 1, 4), 1.0, backend="torch")
    if TRITON_SKIP is None:
        with pytest.raises(TypeError, match="float64"):
            multiview_infonce_loss(torch.randn(2, 3, 4, dtype=torch.float64), 1.0, backend="triton")


@pytest.mark.parametrize("kind", ["infonce", "dhel"])
def test_torch_compile_fullgraph(kind):
    fn, _ = LOSSES[kind]
    u = _views(3, 11, 8)
    g = torch.randint(0, 3, (11,))

    def step(x, s):
        return fn(x, s, groups=g, backend="torch") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (step, compiled):
        x = u.clone().requires_grad_()
        s = torch.tensor(10.0, requires_grad=True)
        loss = f(x, s)
        loss.backward()
        outs.append([loss.detach(), x.grad, s.grad])
    for eager, comp in zip(*outs):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("kind", ["infonce", "dhel"])
def test_torch_backend_allocates_no_vn_squared_buffer(monkeypatch, kind):
    fn, _ = LOSSES[kind]
    v, n, d, rows = 4, 800, 16, 32
    r = v * n
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", rows * r)
    u = torch.randn(v, n, d)
    g = torch.randint(0, 50, (n,))

    def run(backend):
        def call():
            x = u.clone().requires_grad_()
            s = torch.tensor(5.0, requires_grad=True)
            fn(x, s, groups=g, backend=backend).backward()

        return call

    ref = memory_use(run("reference"), torch.device("cpu"))
    full = r * r * 4 if kind == "infonce" else v * n * n * 4
    assert ref.largest_allocation >= full, "the measurement must see the reference's matrix"
    ours = memory_use(run("torch"), torch.device("cpu"))
    assert ours.largest_allocation <= max(rows * r * 8, r * d * 4) + 64
    assert ours.peak_bytes < r * r * 4 / 10
