"""flashcontrast.distributed.supcon_loss (the row-only sweep plus all-reduced per-label
sums) over a process group: W = 1 to 4 gloo ranks, uneven shards and an empty one, one and
two views, labels repeating across ranks and labels=None (SimCLR), both gradient scalings,
a learnable temperature, on the torch engine in float64 and (W = 2) on the Triton kernels
in float32; each rank's loss and gradients against the single-process
flashcontrast.supcon_loss of the concatenated batch (feature gradients W x for "ddp"); the
"ring" strategy, V differing between ranks and labels given on some ranks only raising on
every rank."""

from __future__ import annotations

import functools

import pytest
import torch

from dist_harness import assert_case_errors, assert_rank_errors, caught_errors, shard_slice, spawn

D = 8
SIZES = {1: [6], 2: [0, 9], 3: [4, 1, 6], 4: [3, 0, 4, 5]}
BASE_TEMPERATURE = 0.1
# (views V, labels, grad_scaling): labels "repeat" = global index // 3 (classes span ranks)
CASES = (
    (2, "repeat", "ddp"),
    (1, "repeat", "sum"),
    (2, "none", "sum"),
    (1, "none", "ddp"),
)


def _data(n: int, v: int):
    """Global (V, N, D) unit features in float64 and the labels (N,) global index // 3."""
    g = torch.Generator().manual_seed(10 * n + v)
    x = torch.randn(v, n, D, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1), torch.arange(n) // 3


def _loss_and_grads(module, x, labels, dtype, **kw):
    """The loss of ``module`` (flashcontrast or flashcontrast.distributed) and the
    gradients of 0.7 x it for the features and the temperature."""
    x = x.to(dtype).requires_grad_()
    tau = torch.tensor(0.2, dtype=dtype, requires_grad=True)
    loss = module.supcon_loss(x, labels, tau, BASE_TEMPERATURE, **kw)
    return loss.detach(), *torch.autograd.grad(loss * 0.7, [x, tau])


# the bad calls (every rank raises) and what each rank's message must say
BAD_CALLS = {
    "ring": "ring",
    "views": "same number of views V",
    "labels": "labels must be given on every rank or on none",
    "shape": "must have shape (N,)",
}


def _errors(rank: int, world: int) -> dict:
    """Each bad call's error, "Type: message" (None if it did not raise)."""
    import flashcontrast.distributed as fd

    n = SIZES[world][rank]
    x, labels = _data(n, 2)
    last = rank == world - 1
    return caught_errors(
        {
            "ring": lambda: fd.supcon_loss(x, labels, strategy="ring"),
            "views": lambda: fd.supcon_loss(x[:1] if last else x, labels),
            "labels": lambda: fd.supcon_loss(x, None if last else labels),
            "shape": lambda: fd.supcon_loss(x, torch.zeros(n + 1, dtype=torch.int64)),
        }
    )


def _body(rank: int, world: int, backend: str, dtype: torch.dtype) -> dict:
    """Per case: this rank's loss and gradient errors against the single-process loss of
    the global batch (float64, torch backend)."""
    import flashcontrast
    import flashcontrast.distributed as fd

    mine = shard_slice(SIZES[world], rank)
    out = {}
    for case in CASES:
        v, kind, scaling = case
        x_all, y_all = _data(sum(SIZES[world]), v)
        y_all = y_all if kind == "repeat" else None
        want = _loss_and_grads(flashcontrast, x_all, y_all, torch.float64, backend="torch")
        y = None if y_all is None else y_all[mine]
        kw = dict(grad_scaling=scaling, backend=backend)
        got = _loss_and_grads(fd, x_all[:, mine], y, dtype, **kw)
        factor = world if scaling == "ddp" else 1
        dx = (got[1] - factor * want[1][:, mine]).abs()
        out["/".join(map(str, case))] = {
            "loss": (got[0] - want[0]).abs().item(),
            "dx": dx.max().item() if dx.numel() else 0.0,
            "dtau": (got[2] - want[2]).abs().item(),
        }
    return {"cases": out, "errors": _errors(rank, world) if world > 1 else {}}


# backend -> (feature dtype, tolerance): Triton has no float64 tiles (the interpreter runs
# its float32 kernels), so it is compared in float32 against the float64 single process
ENGINES = {"torch": (torch.float64, 1e-12), "triton": (torch.float32, 1e-5)}


@pytest.mark.parametrize(
    ("world", "backend"), [(1, "torch"), (2, "torch"), (3, "torch"), (4, "torch"), (2, "triton")]
)
def test_matches_single_process(world, backend, tmp_path):
    dtype, tol = ENGINES[backend]
    results = spawn(world, tmp_path, functools.partial(_body, backend=backend, dtype=dtype))
    assert_case_errors(results, CASES, tol)
    if world > 1:
        for kind, message in BAD_CALLS.items():
            assert_rank_errors(results, kind, message)
