"""flashcontrast.distributed over real processes: W in 1..4 ranks on the gloo backend.

One spawn per world size runs every case (both losses, both strategies, both gradient
scalings, bad setups) and writes its findings to a JSON file per rank; the test asserts
on them. Every process group is torn down with a barrier before destroy_process_group
(without it gloo ranks sometimes abort at exit), and every process is joined with a
timeout and killed if it overruns.
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import SIZES, assert_rank_errors, spawn

D = 8


def _global_data(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    return a.to(dtype), b.to(dtype)


def _reference(name, a, b, scale, bias):
    from flashcontrast import reference

    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=a.dtype, requires_grad=True)
    bi = None if bias is None else torch.tensor(bias, dtype=a.dtype, requires_grad=True)
    fn = reference.clip_loss if name == "clip" else reference.siglip_loss
    loss = fn(a, b, s, bi)
    loss.backward()
    return loss.detach(), a.grad, b.grad, s.grad, (None if bi is None else bi.grad)


def _run_case(rank, world, name, strategy, scaling, dtype, bias, seed):
    import flashcontrast.distributed as fd

    sizes = SIZES[world]
    n = sum(sizes)
    off = sum(sizes[:rank])
    a_all, b_all = _global_data(n, dtype, seed)
    scale = 7.5
    ref = _reference(name, a_all.double(), b_all.double(), scale, bias)
    a = a_all[off : off + sizes[rank]].clone().requires_grad_(True)
    b = b_all[off : off + sizes[rank]].clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    bi = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    fd.reset_comm_bytes()
    fn = fd.clip_loss if name == "clip" else fd.siglip_loss
    loss = fn(a, b, s, bi, strategy=strategy, grad_scaling=scaling)
    loss.backward()
    factor = world if scaling == "ddp" else 1

    def err(x, y):
        return (x.double() - y.double()).abs().max().item()

    sl = slice(off, off + sizes[rank])
    out = {
        "loss": err(loss, ref[0]),
        "da": err(a.grad, factor * ref[1][sl]),
        "db": err(b.grad, factor * ref[2][sl]),
        "dscale": err(s.grad, ref[3]),
        "bytes": fd.comm_bytes(),
        "dtypes_ok": a.grad.dtype == dtype and b.grad.dtype == dtype,
    }
    if bias is not None:
        out["dbias"] = err(bi.grad, ref[4])
    return out


def _expect_error(rank, world, bad_rank, kind):
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    d = D + 1 if (kind == "dim" and rank == bad_rank) else D
    dtype = torch.float64 if (kind == "dtype" and rank == bad_rank) else torch.float32
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    if kind == "local" and rank == bad_rank:
        b = torch.randn(n + 1, d)  # a local check fails on this rank only
    try:
        fd.clip_loss(a, b, 2.0, strategy="ring")
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def expected_bytes(name, strategy, world, n, d, e=4, f=4):
    """The module docstring's formula: bytes sent per rank, forward + backward, for equal
    shards of n rows (all-reduces counted as 2 (W - 1)/W of their size, truncated)."""
    w = world

    def ar(m):
        return int(2 * (w - 1) / w * m)

    meta = (w - 1) * (7 + 2) * 8  # setup: 7 + F int64, F = 2 (bias, groups given)
    grads = ar(f) + ar(2 * f)  # upstream-gradient mean, (d scale, d bias)
    nde, ndf = (w - 1) * n * d * e, (w - 1) * n * d * f
    if name == "clip" and strategy == "gather":
        fwd = nde + ar(w * n * f) + ar((w * n + 2) * f)
        bwd = ndf
    elif name == "clip":
        fwd = nde + (w - 1) * n * f + ar(f)
        bwd = nde + (w - 1) * n * f + ndf
    elif strategy == "gather":
        fwd, bwd = nde + ar(f), ndf
    else:
        fwd, bwd = nde + ar(f), nde + ndf
    return meta + fwd + bwd + grads


def _measure(rank, world, n, d):
    """Bytes sent by this rank for one forward + backward, equal shards, float32."""
    import flashcontrast.distributed as fd

    out = {}
    for name in ("clip", "siglip"):
        for strategy in ("gather", "ring"):
            a = torch.randn(n, d, requires_grad=True)
            b = torch.randn(n, d, requires_grad=True)
            fn = fd.clip_loss if name == "clip" else fd.siglip_loss
            fd.reset_comm_bytes()
            fn(a, b, 10.0, -1.0, strategy=strategy).backward()
            out[f"{name}/{strategy}"] = fd.comm_bytes()
    return out


def _body(rank, world):
    """Every case on this rank: both losses, strategies and scalings, bad setups, bytes."""
    cases = {}
    seed = 0
    for name in ("clip", "siglip"):
        for strategy in ("gather", "ring"):
            for bias in (None, -1.5) if name == "clip" else (-10.0, None):
                seed += 1
                key = f"{name}/{strategy}/ddp/float64/bias={bias}"
                cases[key] = _run_case(
                    rank, world, name, strategy, "ddp", torch.float64, bias, seed
                )
            key = f"{name}/{strategy}/sum/float64"
            cases[key] = _run_case(rank, world, name, strategy, "sum", torch.float64, 0.5, 9)
            key = f"{name}/{strategy}/ddp/float32"
            cases[key] = _run_case(rank, world, name, strategy, "ddp", torch.float32, 1.0, 11)
    errors = {}
    if world > 1:
        for kind in ("dim", "dtype", "local"):
            errors[kind] = _expect_error(rank, world, world - 1, kind)
    return {
        "cases": cases,
        "errors": errors,
        "bytes": _measure(rank, world, 256 if world == 4 else 16, 512),
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_matches_single_process(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    for r, res in enumerate(results):
        for key, case in res["cases"].items():
            tol = 1e-10 if "float64" in key else 2e-5
            for q in ("loss", "da", "db", "dscale", "dbias"):
                if q in case:
                    assert case[q] < tol, f"rank {r} {key}: {q} off by {case[q]:.3g}"
            assert case["dtypes_ok"], f"rank {r} {key}: gradient dtype differs from the input"
    n = 256 if world == 4 else 16
    for r, res in enumerate(results):
        for key, got in res["bytes"].items():
            name, strategy = key.split("/")
            assert got == expected_bytes(name, strategy, world, n, 512), (r, key, got)
    if world == 4:
        print("bytes per rank per step (W=4, n=256, D=512, float32):", results[0]["bytes"])
    if world == 1:
        return
    assert_rank_errors(results, "dim", "same feature dimension D")
    assert_rank_errors(results, "dtype", "same dtype")
    # the failing rank raises its own error, the others that it failed
    assert_rank_errors(results, "local", "same shape", failing_rank=world - 1)
