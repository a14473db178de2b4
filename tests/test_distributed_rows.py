"""flashcontrast.distributed.infonce_loss and uniform_loss (row-only sweeps over a process
group): W = 1 to 4 gloo ranks, uneven shards and an empty one, both gradient scalings, on
the torch engine in float64 and (W = 2) on the Triton kernels in float32; each rank's loss
and gradients against the single-process function of the concatenated batch; "ring" and a
bad shard raise on every rank."""

from __future__ import annotations

import pytest
import torch

from dist_harness import assert_rank_errors, spawn

D = 8
SIZES = {1: [6], 2: [0, 9], 3: [4, 1, 6], 4: [3, 0, 4, 5]}
# (objective, grad_scaling, bias)
CASES = (
    ("infonce", "ddp", None),
    ("infonce", "sum", 0.4),
    ("uniform", "ddp", None),
    ("uniform", "sum", None),
)


def _data(n: int):
    g = torch.Generator().manual_seed(n)
    q = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    return q, k


def _call(fn_module, case, q, k, s, bias, **kw):
    if case[0] == "infonce":
        return fn_module.infonce_loss(q, k, s, bias, **kw)
    return fn_module.uniform_loss(q, 1.5, **kw) + 0 * s  # s: no gradient, same leaves


def _single(case, q, k):
    import flashcontrast

    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    s = torch.tensor(6.0, dtype=q.dtype, requires_grad=True)
    bias = None if case[2] is None else torch.tensor(case[2], dtype=q.dtype, requires_grad=True)
    loss = _call(flashcontrast, case, q, k, s, bias, backend="torch")
    leaves = [q, k, s] + ([bias] if bias is not None else [])
    return loss.detach(), torch.autograd.grad(loss * 0.7, leaves, allow_unused=True)


def _errors(rank: int, world: int) -> dict:
    import flashcontrast.distributed as fd

    q, k = _data(SIZES[world][rank])
    out = {}
    for kind, call in (
        ("ring", lambda: fd.infonce_loss(q, k, 6.0, strategy="ring")),
        ("dim", lambda: fd.uniform_loss(q[:, :5] if rank == world - 1 else q)),
    ):
        try:
            call()
            out[kind] = None
        except Exception as e:
            out[kind] = f"{type(e).__name__}: {e}"
    return out


def _body(rank: int, world: int, backend: str = "torch", dtype=torch.float64) -> dict:
    import flashcontrast.distributed as fd

    sizes = SIZES[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    q_all, k_all = _data(sum(sizes))
    out = {}
    for case in CASES:
        want, grads = _single(case, q_all, k_all)
        q = q_all[lo:hi].to(dtype).requires_grad_()
        k = k_all[lo:hi].to(dtype).requires_grad_()
        s = torch.tensor(6.0, dtype=dtype, requires_grad=True)
        bias = None if case[2] is None else torch.tensor(case[2], dtype=dtype, requires_grad=True)
        loss = _call(fd, case, q, k, s, bias, grad_scaling=case[1], backend=backend)
        leaves = [q, k, s] + ([bias] if bias is not None else [])
        got = torch.autograd.grad(loss * 0.7, leaves, allow_unused=True)
        factor = world if case[1] == "ddp" else 1
        errs = {"loss": (loss.detach() - want).abs().item()}
        for name, x, y, local in zip(("dq", "dk", "ds", "db"), got, grads, (1, 1, 0, 0)):
            if x is None or y is None:
                assert x is None and y is None, (case, name)
                continue
            y = factor * y[lo:hi] if local else y
            errs[name] = (x - y).abs().max().item() if x.numel() else 0.0
        out["/".join(map(str, case))] = errs
    return {"cases": out, "errors": _errors(rank, world) if world > 1 else {}}


def _triton_body(rank: int, world: int) -> dict:
    return _body(rank, world, "triton", torch.float32)


def _check(results: list, tol: float) -> None:
    for r, res in enumerate(results):
        assert set(res["cases"]) == {"/".join(map(str, c)) for c in CASES}
        for key, errs in res["cases"].items():
            for name, err in errs.items():
                assert err < tol, f"rank {r} {key}: {name} off by {err:.3g}"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matches_single_process(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    _check(results, 1e-12)
    if world > 1:
        assert_rank_errors(results, "ring", "ring")
        assert_rank_errors(results, "dim", "same feature dimension D")


def test_triton_engine_two_ranks(tmp_path):
    """The row sweeps on the Triton kernels (the interpreter), float32 features against
    the float64 single-process loss: float32 rounding only."""
    _check(spawn(2, tmp_path, _triton_body), 1e-5)
