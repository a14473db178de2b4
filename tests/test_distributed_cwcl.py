"""flashcontrast.distributed.cwcl_loss: W = 1 to 4 gloo ranks, uneven shards and an empty
one, both strategies and gradient scalings, on the torch engine and (W = 2) the Triton
interpreter; each rank's loss and gradients against the single-process
flashcontrast.cwcl_loss of the concatenated batch in float64, and a bad shard on one rank
raising on every rank."""

from __future__ import annotations

import pytest
import torch

from dist_harness import assert_rank_errors, spawn

D, DU = 10, 6
SIZES = {1: [7], 2: [0, 9], 3: [5, 1, 6], 4: [3, 0, 4, 5]}
# (strategy, grad_scaling, bias)
CASES = (("gather", "ddp", None), ("ring", "sum", 0.3), ("gather", "sum", -1.0))


def _data(n: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(n)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=dtype), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=dtype), dim=1)
    u = torch.randn(n, DU, generator=g, dtype=dtype)
    return a, b, u


def _single(case, a, b, u, grad_out=0.6):
    """The single-process loss and gradients (features, scale, bias) of the whole batch."""
    import flashcontrast

    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    s = torch.tensor(7.0, dtype=a.dtype, requires_grad=True)
    bias = None if case[2] is None else torch.tensor(case[2], dtype=a.dtype, requires_grad=True)
    loss = flashcontrast.cwcl_loss(a, b, s, bias, weight_features=u, backend="torch")
    grads = torch.autograd.grad(loss * grad_out, [a, b, s] + ([bias] if bias is not None else []))
    return loss.detach(), grads


def _errors(rank: int, world: int) -> dict:
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    a, b, u = _data(n)
    bad = u[:, :3] if rank == world - 1 else u  # Du differs on the last rank
    try:
        fd.cwcl_loss(a, b, 7.0, weight_features=bad)
    except Exception as e:
        return {"du": f"{type(e).__name__}: {e}"}
    return {"du": None}


def _body(rank: int, world: int, backend: str = "torch", dtype=torch.float64) -> dict:
    import flashcontrast.distributed as fd

    sizes = SIZES[world]
    n_all = sum(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    a_all, b_all, u_all = _data(n_all)
    out = {}
    for case in CASES:
        strategy, scaling, bias0 = case
        want, grads = _single(case, a_all, b_all, u_all)
        a = a_all[lo:hi].to(dtype).requires_grad_()
        b = b_all[lo:hi].to(dtype).requires_grad_()
        s = torch.tensor(7.0, dtype=dtype, requires_grad=True)
        bias = None if bias0 is None else torch.tensor(bias0, dtype=dtype, requires_grad=True)
        loss = fd.cwcl_loss(
            a, b, s, bias, weight_features=u_all[lo:hi].to(dtype), strategy=strategy,
            grad_scaling=scaling, backend=backend,
        )  # fmt: skip
        leaves = [a, b, s] + ([bias] if bias is not None else [])
        got = torch.autograd.grad(loss * 0.6, leaves)
        factor = world if scaling == "ddp" else 1
        errs = {
            "loss": (loss.detach() - want).abs().item(),
            "da": (got[0] - factor * grads[0][lo:hi]).abs().max().item() if hi > lo else 0.0,
            "db": (got[1] - factor * grads[1][lo:hi]).abs().max().item() if hi > lo else 0.0,
            "dscale": (got[2] - grads[2]).abs().item(),
        }
        if bias is not None:
            errs["dbias"] = (got[3] - grads[3]).abs().item()
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
        assert_rank_errors(results, "du", "weight_features' Du")


def test_triton_engine_two_ranks(tmp_path):
    """CLIP's sweep on the Triton kernels (the interpreter), float32 features (Triton has
    no float64 tiles) against the float64 single-process loss: float32 rounding only."""
    results = spawn(2, tmp_path, _triton_body)
    _check(results, 1e-5)
