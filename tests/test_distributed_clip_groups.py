"""flashcontrast.distributed.clip_loss with ``groups=`` over real processes (gloo, W = 1..4).

One spawn per world size runs every case on uneven shards (tests/dist_harness.SIZES):
group patterns x strategies x gradient scalings x with/without logit_bias, float64, an
upstream gradient != 1, each against the single-process
``flashcontrast.clip_loss(..., groups=global_ids)`` of the concatenated batch; then the
bad setups (groups on some ranks only, a wrong length or dtype on one rank), which must
raise on every rank; then the bytes sent, against the formula of the
flashcontrast.distributed.clip module docstring.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from dist_harness import SIZES, assert_rank_errors, spawn

D = 6
SCALE = 7.5
GRAD_OUT = 0.7  # the upstream gradient, the same on every rank
PATTERNS = ("spanning", "distinct", "one_group")


def _ids(pattern: str, n: int) -> torch.Tensor:
    """Global ids (N,): "spanning": period k over the whole batch, so groups repeat across
    rank boundaries (negative ids too); "distinct": all different, int32 (same as no
    groups); "one_group": every sample in one group (each row keeps only its positive)."""
    if pattern == "spanning":
        k = max(2, (n + 1) // 3)
        return torch.arange(n) % k - 2
    if pattern == "distinct":
        return (torch.arange(n) * 10).to(torch.int32)
    return torch.full((n,), 3, dtype=torch.int64)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized global features A, B (N, D), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    return a, b


def _single(a, b, bias: Optional[float], ids: Optional[torch.Tensor]) -> tuple:
    """Loss and (dA, dB, d scale, d bias) of the single-process loss on the global batch,
    for the upstream gradient GRAD_OUT."""
    import flashcontrast

    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bi = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = flashcontrast.clip_loss(a, b, s, bi, groups=ids, backend="reference")
    loss.backward(torch.tensor(GRAD_OUT, dtype=torch.float64))
    return loss.detach(), a.grad, b.grad, s.grad, None if bi is None else bi.grad


def _run_case(rank, world, pattern, strategy, scaling, bias, seed) -> dict:
    """Max abs errors of this rank's loss and gradients against the single process."""
    import flashcontrast.distributed as fd

    sizes = SIZES[world]
    n, off = sum(sizes), sum(sizes[:rank])
    sl = slice(off, off + sizes[rank])
    a_all, b_all = _data(n, seed)
    ids = _ids(pattern, n)
    # "distinct" is checked against the ungrouped loss: all ids distinct == no groups
    ref = _single(a_all, b_all, bias, None if pattern == "distinct" else ids)
    a = a_all[sl].clone().requires_grad_(True)
    b = b_all[sl].clone().requires_grad_(True)
    s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bi = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = fd.clip_loss(
        a, b, s, bi, groups=ids[sl].clone(), strategy=strategy, grad_scaling=scaling
    )
    loss.backward(torch.tensor(GRAD_OUT, dtype=torch.float64))
    factor = world if scaling == "ddp" else 1

    def err(x, y) -> float:
        return (x - y).abs().max().item()

    out = {
        "loss": err(loss, ref[0]),
        "da": err(a.grad, factor * ref[1][sl]),
        "db": err(b.grad, factor * ref[2][sl]),
        "dscale": err(s.grad, ref[3]),
    }
    if bias is not None:
        out["dbias"] = err(bi.grad, ref[4])
    if pattern == "one_group":  # only positives: L = 0 and no gradient anywhere
        out["zero"] = max(loss.abs().item(), a.grad.abs().max().item(), s.grad.abs().item())
    return out


def _expect_error(rank, world, kind, strategy) -> Optional[str]:
    """The message this rank raises for a bad groups setup on the last rank, or None."""
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    a, b = torch.randn(n, D), torch.randn(n, D)
    ids: Optional[torch.Tensor] = torch.arange(n)
    if rank == world - 1:
        if kind == "some":
            ids = None  # groups on every rank but the last
        elif kind == "length":
            ids = torch.arange(n + 1)
        else:
            ids = torch.arange(n, dtype=torch.float32)
    try:
        fd.clip_loss(a, b, 2.0, groups=ids, strategy=strategy)
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def expected_bytes(strategy: str, world: int, n: int, d: int, grouped: bool) -> int:
    """distributed/clip.py's formula: bytes sent per rank, forward + backward, float32
    (e = f = 4), equal shards of n rows (all-reduces 2 (W-1)/W of their size, truncated)."""
    w, e, f = world, 4, 4

    def ar(m: int) -> int:
        return int(2 * (w - 1) / w * m)

    meta = (w - 1) * (7 + 2) * 8  # setup: 7 + F int64, F = 2 (bias, groups given)
    grads = ar(f) + ar(2 * f)  # upstream-gradient mean, (d scale, d bias)
    nde, ndf, ids = (w - 1) * n * d * e, (w - 1) * n * d * f, (w - 1) * n * 8
    if strategy == "gather":
        fwd = nde + ar(w * n * f) + ar((w * n + 2) * f) + (ids if grouped else 0)
        bwd = ndf
    else:
        fwd = nde + (w - 1) * n * f + ar(f) + (ids if grouped else 0)
        bwd = nde + (w - 1) * n * f + (ids if grouped else 0) + ndf
    return meta + fwd + bwd + grads


def _measure(rank, world, sizes, d) -> dict:
    """Bytes this rank sends for one forward + backward (float32), with and without ids."""
    import flashcontrast.distributed as fd

    n = sizes[rank]
    out = {}
    for strategy in ("gather", "ring"):
        for grouped in (False, True):
            a = torch.randn(n, d, requires_grad=True)
            b = torch.randn(n, d, requires_grad=True)
            ids = torch.arange(n) // 2 if grouped else None
            fd.reset_comm_bytes()
            fd.clip_loss(a, b, 10.0, -1.0, groups=ids, strategy=strategy).backward()
            out[f"{strategy}/{grouped}"] = fd.comm_bytes()
    return out


def _body(rank: int, world: int) -> dict:
    cases, seed = {}, 0
    for pattern in PATTERNS:
        for strategy in ("gather", "ring"):
            for scaling in ("ddp", "sum"):
                for bias in (None, -1.5):
                    seed += 1
                    key = f"{pattern}/{strategy}/{scaling}/bias={bias}"
                    cases[key] = _run_case(rank, world, pattern, strategy, scaling, bias, seed)
    errors = {}
    if world > 1:
        for kind, strategy in (("some", "ring"), ("length", "gather"), ("dtype", "ring")):
            errors[kind] = _expect_error(rank, world, kind, strategy)
    return {
        "cases": cases,
        "errors": errors,
        "equal": _measure(rank, world, [8] * world, 16),
        "uneven": _measure(rank, world, SIZES[world], 16),
    }


def _ring_ids_bytes(rank: int, sizes: list) -> int:
    """Bytes of ids rank r sends in one ring pass: the shards of r, r-1, ..., r-W+2."""
    w = len(sizes)
    return sum(8 * sizes[(rank - k) % w] for k in range(w - 1))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_clip_groups(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    for r, res in enumerate(results):
        for key, case in res["cases"].items():
            for q, v in case.items():
                assert v < 1e-10, f"rank {r} {key}: {q} off by {v:.3g}"
        for strategy in ("gather", "ring"):
            for grouped in (False, True):
                got = res["equal"][f"{strategy}/{grouped}"]
                assert got == expected_bytes(strategy, world, 8, 16, grouped), (r, strategy)
            # uneven shards: the ids' extra bytes (gather pads them to n_max rows)
            sizes = SIZES[world]
            extra = res["uneven"][f"{strategy}/True"] - res["uneven"][f"{strategy}/False"]
            if strategy == "gather":
                assert extra == (world - 1) * max(sizes) * 8, (r, extra)
            else:
                assert extra == 2 * _ring_ids_bytes(r, sizes), (r, extra)
    if world == 1:
        return
    for msg in assert_rank_errors(results, "some", "groups must be given on every rank or on none"):
        assert f"given on ranks {list(range(world - 1))}" in msg, msg
    assert_rank_errors(results, "length", "groups must have shape", failing_rank=world - 1)
    assert_rank_errors(results, "dtype", "int32 or int64", failing_rank=world - 1)
