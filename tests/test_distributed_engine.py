"""flashcontrast.distributed CLIP and SigLIP with their tiles on the Triton and CUDA engines.

The distributed losses run their local tiles on the pair engine (``backends/pair.py``) of
the backend ``backend=`` names; tests/test_distributed*.py cover ``backend="torch"``. Here
the same losses run on ``backend="triton"`` (the interpreter: TRITON_INTERPRET=1, set by
conftest.py and inherited by the spawned ranks) and ``backend="cuda"`` (csrc/ built for the
CPU, tests/cuda_emulator): each spawned gloo rank installs the emulated extension itself
(``cuda_emulator.install`` with a MonkeyPatch of its own: the conftest fixture that does
it for in-process tests patches only the parent process; the build is cached on disk, so
the ranks load it), on W = 1, 2, 3 ranks with uneven shards, an empty one among them for
W > 1. Per world size and backend: CLIP "gather" with groups, CLIP "ring" with groups and
a bias, SigLIP "gather" and "ring" with a bias, float32, an upstream gradient != 1 and
``grad_scaling="sum"`` (feature gradients 1x; the W x of "ddp" is the torch tests'), and
CLIP "ring" and SigLIP "ring" in bfloat16 too (16-bit features travel, partial gradients
are summed in float32 and rounded once). The
parent concatenates the ranks' feature gradients in rank order and checks the loss and
every gradient of every rank by the verification rule (verification.assert_by_rule)
against the single-process reference in float64, the float32 reference being the
same-dtype one (on the bfloat16-rounded inputs for bfloat16, with that dtype's atol).
Sizes are small (N <= 25, D = 20): the interpreter and the emulator are slow. Last, a
backend that cannot run (float64 features on "triton"; "cuda" on a rank without the
extension) fails the setup checks of every rank.
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import spawn
from verification import CUDA_EMULATED, TRITON, assert_by_rule

D = 20
SCALE = 9.0
GRAD_OUT = 0.7
SIZES = {1: [13], 2: [0, 17], 3: [11, 0, 14]}  # uneven, an empty shard for W > 1
# (loss, strategy, bias, groups, feature dtype)
CASES = (
    ("clip", "gather", None, True, "float32"),
    ("clip", "ring", 0.5, True, "float32"),
    ("clip", "ring", -1.0, False, "bfloat16"),
    ("siglip", "gather", -4.0, False, "float32"),
    ("siglip", "ring", -4.0, False, "bfloat16"),
)
NAMES = ("loss", "da", "db", "dscale", "dbias")


def _data(n: int, case: tuple) -> tuple:
    """Global features A, B (N, D), normalized, in the case's dtype, and ids (N,) in
    groups of 3."""
    g = torch.Generator().manual_seed(CASES.index(case))
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    dtype = getattr(torch, case[4])
    return a.to(dtype), b.to(dtype), torch.arange(n) // 3


def _key(case: tuple) -> str:
    return "/".join(map(str, case))


def _install(backend: str) -> None:
    """Route backend="cuda" to the emulated extension in this (spawned) process."""
    if backend == "cuda":
        import cuda_emulator

        cuda_emulator.install(pytest.MonkeyPatch(), f"test_distributed_engine/{backend}")


def _body(backend: str, rank: int, world: int) -> dict:
    """Every case on this rank: the backend that ran, the loss and this rank's gradients
    (as lists)."""
    import flashcontrast
    import flashcontrast.distributed as fd

    _install(backend)
    sizes = SIZES[world]
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    out = {}
    for case in CASES:
        name, strategy, bias, grouped, _ = case
        a_all, b_all, ids = _data(sum(sizes), case)
        a = a_all[sl].clone().requires_grad_(True)
        b = b_all[sl].clone().requires_grad_(True)
        s = torch.tensor(SCALE, requires_grad=True)
        bi = None if bias is None else torch.tensor(bias, requires_grad=True)
        kw = dict(strategy=strategy, backend=backend, grad_scaling="sum")
        if name == "clip":
            loss = fd.clip_loss(a, b, s, bi, groups=ids[sl] if grouped else None, **kw)
        else:
            loss = fd.siglip_loss(a, b, s, bi, **kw)
        ran = flashcontrast.last_backend()
        loss.backward(torch.tensor(GRAD_OUT))
        grads = [a.grad, b.grad, s.grad] + ([] if bi is None else [bi.grad])
        out[_key(case)] = [ran, loss.item()] + [g.float().tolist() for g in grads]
    return out


def _reference(case: tuple, n: int, dtype: torch.dtype) -> list:
    """Loss and gradients of the single-process loss on the global batch in ``dtype``."""
    import flashcontrast

    name, _, bias, grouped, _ = case
    a_all, b_all, ids = _data(n, case)
    a = a_all.to(dtype).requires_grad_(True)
    b = b_all.to(dtype).requires_grad_(True)
    s = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
    bi = None if bias is None else torch.tensor(bias, dtype=dtype, requires_grad=True)
    if name == "clip":
        groups = ids if grouped else None
        loss = flashcontrast.clip_loss(a, b, s, bi, groups=groups, backend="reference")
    else:
        loss = flashcontrast.reference.siglip_loss(a, b, s, bi)
    loss.backward(torch.tensor(GRAD_OUT, dtype=dtype))
    grads = [a.grad, b.grad, s.grad] + ([] if bi is None else [bi.grad])
    return [loss.detach(), *grads]


def _results(world: int, backend: str, tmp_path, body=None) -> list:
    """Each rank's result of ``body`` (default: :func:`_body` on ``backend``)."""
    import functools

    if backend == "cuda":
        import cuda_emulator

        cuda_emulator.module()  # build (or load) once here, so the ranks find it cached
    return spawn(world, tmp_path, body or functools.partial(_body, backend))


@pytest.mark.parametrize("backend", [TRITON, CUDA_EMULATED])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_engine_backends_match_the_reference(world, backend, tmp_path):
    results = _results(world, backend, tmp_path)
    n = sum(SIZES[world])
    for case in CASES:
        key = _key(case)
        exact = _reference(case, n, torch.float64)
        same = _reference(case, n, torch.float32)
        names = NAMES[: len(exact)]
        per_rank = [res[key] for res in results]
        assert [r[0] for r in per_rank] == [backend] * world, (key, [r[0] for r in per_rank])
        # the feature gradients of the global batch, rank by rank (an empty rank: (0, D))
        da, db = (
            torch.cat([torch.tensor(r[k], dtype=torch.float32).reshape(-1, D) for r in per_rank])
            for k in (2, 3)
        )
        for rank, r in enumerate(per_rank):
            scalars = [torch.tensor(x, dtype=torch.float32) for x in [r[1], *r[4:]]]
            kernel = [scalars[0], da, db, *scalars[1:]]
            try:
                assert_by_rule(names, kernel, same, exact, getattr(torch, case[4]))
            except AssertionError as e:
                raise AssertionError(f"{backend} W={world} rank {rank} {key}: {e}") from None
            assert r[1] == per_rank[0][1], f"{key}: rank {rank}'s loss differs from rank 0's"


def _unrunnable_body(rank: int, world: int) -> dict:
    """Backends that cannot run: "triton" with float64 features (every rank), and "cuda"
    where only rank 0 has the (emulated) extension. (error type, message) per call."""
    import flashcontrast.distributed as fd

    if rank == 0:
        _install("cuda")
    out = {}
    for key, dtype, backend in (("float64", torch.float64, "triton"), ("cuda", None, "cuda")):
        a, b = torch.randn(3 + rank, D, dtype=dtype), torch.randn(3 + rank, D, dtype=dtype)
        try:
            fd.clip_loss(a, b, SCALE, backend=backend)
            out[key] = None
        except Exception as e:  # every type is recorded, and asserted on
            out[key] = [type(e).__name__, str(e)]
    return out


@pytest.mark.parametrize("backend", [CUDA_EMULATED])
def test_a_backend_that_cannot_run_raises_on_every_rank(backend, tmp_path):
    """Resolved among each rank's setup checks: one rank's failure fails every rank."""
    results = _results(2, "cuda", tmp_path, _unrunnable_body)
    for res in results:
        assert res["float64"][0] == "TypeError" and "float64" in res["float64"][1], res
    assert results[1]["cuda"][0] == "RuntimeError", results[1]
    assert "backend='cuda' cannot run clip" in results[1]["cuda"][1], results[1]
    assert "rank(s) [1] failed their checks" in results[0]["cuda"][1], results[0]


# ----------------------------------------------------------------------------- multi-view, Symile
# MV-InfoNCE, MV-DHEL and Symile "n" on the same engines, the same layouts: per world size
# and backend both strategies of each (MV with groups on one strategy each, Symile with
# explicit global permutations), float32 and one bfloat16 case each, "sum" scaling, the
# upstream gradient 0.7, against the float64 single-process reference by the rule.

D_MORE = 16
VIEWS = 3
# (loss, strategy, groups, feature dtype)
MORE_CASES = (
    ("mv_infonce", "gather", True, "float32"),
    ("mv_infonce", "ring", False, "bfloat16"),
    ("mv_dhel", "gather", False, "bfloat16"),
    ("mv_dhel", "ring", True, "float32"),
    ("symile", "gather", False, "float32"),
    ("symile", "ring", False, "float32"),
    ("symile", "ring", False, "bfloat16"),
)


def _more_data(n: int, case: tuple) -> tuple:
    """The global features (V or M = 3, N, D) normalized in the case's dtype, group ids
    (N,) in groups of 3, and Symile's permutations (3, 2, N) over the global N."""
    g = torch.Generator().manual_seed(100 + MORE_CASES.index(case))
    x = torch.nn.functional.normalize(torch.randn(VIEWS, n, D_MORE, generator=g), dim=-1)
    perms = torch.stack([torch.stack([torch.randperm(n, generator=g) for _ in range(2)])
                         for _ in range(3)])  # fmt: skip
    return x.to(getattr(torch, case[3])), torch.arange(n) // 3, perms


def _more_loss(case, x, s, ids, perms, backend, dist: bool, **kw):
    """The case's loss: flashcontrast.distributed's (``dist``) or the single-process one."""
    import flashcontrast
    import flashcontrast.distributed as fd

    name, _, grouped, _ = case
    mod = fd if dist else flashcontrast
    if name == "symile":
        return mod.symile_loss(list(x), s, permutations=perms, backend=backend, **kw)
    fn = mod.multiview_infonce_loss if name == "mv_infonce" else mod.multiview_dhel_loss
    return fn(x, s, groups=ids if grouped else None, backend=backend, **kw)


def _more_body(backend: str, rank: int, world: int) -> dict:
    import flashcontrast

    _install(backend)
    sizes = SIZES[world]
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    out = {}
    for case in MORE_CASES:
        x_all, ids, perms = _more_data(sum(sizes), case)
        x = x_all[:, sl].clone().requires_grad_(True)
        s = torch.tensor(SCALE, requires_grad=True)
        kw = dict(strategy=case[1], grad_scaling="sum")
        loss = _more_loss(case, x, s, ids[sl], perms, backend, True, **kw)
        ran = flashcontrast.last_backend()
        loss.backward(torch.tensor(GRAD_OUT))
        out[_key(case)] = [ran, loss.item(), x.grad.float().tolist(), s.grad.item()]
    return out


def _more_reference(case: tuple, n: int, dtype: torch.dtype) -> list:
    x_all, ids, perms = _more_data(n, case)
    x = x_all.to(dtype).requires_grad_(True)
    s = torch.tensor(SCALE, dtype=dtype, requires_grad=True)
    loss = _more_loss(case, x, s, ids, perms, "reference", False)
    loss.backward(torch.tensor(GRAD_OUT, dtype=dtype))
    return [loss.detach(), x.grad, s.grad]


@pytest.mark.parametrize("backend", [TRITON, CUDA_EMULATED])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_engine_backends_multiview_and_symile(world, backend, tmp_path):
    import functools

    results = _results(world, backend, tmp_path, functools.partial(_more_body, backend))
    n = sum(SIZES[world])
    for case in MORE_CASES:
        key = _key(case)
        exact = _more_reference(case, n, torch.float64)
        same = _more_reference(case, n, torch.float32)
        per_rank = [res[key] for res in results]
        assert [r[0] for r in per_rank] == [backend] * world, (key, [r[0] for r in per_rank])
        # (V, n_r, D) per rank, concatenated along the samples (an empty rank: (V, 0, D))
        dx = torch.cat(
            [torch.tensor(r[2], dtype=torch.float32).reshape(VIEWS, -1, D_MORE) for r in per_rank],
            dim=1,
        )
        for rank, r in enumerate(per_rank):
            kernel = [torch.tensor(r[1]), dx, torch.tensor(r[3])]
            try:
                assert_by_rule(("loss", "dx", "dscale"), kernel, same, exact,
                               getattr(torch, case[3]))  # fmt: skip
            except AssertionError as e:
                raise AssertionError(f"{backend} W={world} rank {rank} {key}: {e}") from None
            assert r[1] == per_rank[0][1], f"{key}: rank {rank}'s loss differs from rank 0's"
