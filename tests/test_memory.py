"""The torch backend never allocates an N x N logit buffer, measured on the CPU allocator.

The reference is the positive control: the same measurement sees its N x N matrices.
"""

from __future__ import annotations

import torch

import flashcontrast
from flashcontrast.backends import blockwise
from flashcontrast.bench.memory import memory_use


def _fwd_bwd(backend: str, a: torch.Tensor, b: torch.Tensor):
    def run():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s = torch.tensor(20.0, requires_grad=True)
        flashcontrast.clip_loss(x, y, s, backend=backend).backward()

    return run


def test_torch_backend_allocates_no_n_by_n_buffer(monkeypatch):
    n, d, rows = 3000, 16, 64
    nxn = n * n * 4
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", rows * n)
    a, b = torch.randn(n, d), torch.randn(n, d)

    ref = memory_use(_fwd_bwd("reference", a, b), torch.device("cpu"))
    assert ref.largest_allocation >= nxn, "the measurement must see the reference's N x N"

    ours = memory_use(_fwd_bwd("torch", a, b), torch.device("cpu"))
    assert ours.largest_allocation <= rows * n * 4 + 64
    # Two (rows x N) blocks, the gradients and O(N) statistics: far below one N x N.
    assert ours.peak_bytes <= 4 * rows * n * 4 + 4 * n * d * 4 + 64 * n
    assert ours.peak_bytes < nxn / 10


def test_default_block_budget_keeps_peak_below_n_by_n():
    """With the default budget (2^22 elements a block on the CPU) at N = 8192: a few
    16 MiB blocks live at once, where one N x N float32 matrix is 256 MiB."""
    n, d = 8192, 8
    a, b = torch.randn(n, d), torch.randn(n, d)
    ours = memory_use(_fwd_bwd("torch", a, b), torch.device("cpu"))
    assert ours.largest_allocation <= blockwise.MAX_BLOCK_ELEMENTS["cpu"] * 4
    assert ours.peak_bytes < n * n * 4 / 4


def _cwcl_fwd_bwd(backend: str, a, b, u, **kwargs):
    def run():
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        s = torch.tensor(20.0, requires_grad=True)
        flashcontrast.cwcl_loss(x, y, s, weight_features=u, backend=backend, **kwargs).backward()

    return run


def test_cwcl_allocates_no_n_by_n_buffer(monkeypatch):
    """CWCL's soft targets: the paper's weights through (D, Du) products (nothing above
    O(N max(D, Du))), a weight that does not factor through (block, N) tiles; the
    reference's N x N logits and weights are the positive control."""
    n, d, du, rows = 3000, 16, 8, 64
    nxn = n * n * 4
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", rows * n)
    a, b, u = torch.randn(n, d), torch.randn(n, d), torch.randn(n, du)

    ref = memory_use(_cwcl_fwd_bwd("reference", a, b, u), torch.device("cpu"))
    assert ref.largest_allocation >= nxn, "the measurement must see the reference's N x N"

    factored = memory_use(_cwcl_fwd_bwd("torch", a, b, u), torch.device("cpu"))
    assert factored.largest_allocation <= rows * n * 4 + 64
    assert factored.peak_bytes < nxn / 10

    block = 32  # rows of a weight tile
    tiles = memory_use(
        _cwcl_fwd_bwd("torch", a, b, u, weight_fn=lambda c: c.exp(), block_size=block),
        torch.device("cpu"),
    )
    assert tiles.largest_allocation <= rows * n * 4 + 64
    # a handful of (block, N) tiles (cosines, weights, products) and O(N (D + Du))
    assert tiles.peak_bytes <= 8 * block * n * 4 + 8 * n * (d + du) * 4
    assert tiles.peak_bytes < nxn / 10


def test_contrastive_gap_allocates_no_n_by_n_buffer(monkeypatch):
    """L_CUAXU: CLIP's sweep, three uniformity sweeps of (N, D + 2) rows and the O(N D)
    alignment, nothing N x N; the reference's distances and logits are the positive
    control."""
    n, d, rows = 3000, 16, 64
    nxn = n * n * 4
    monkeypatch.setitem(blockwise.MAX_BLOCK_ELEMENTS, "cpu", rows * n)
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=1)

    def run(backend):
        def step():
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            s = torch.tensor(20.0, requires_grad=True)
            loss = flashcontrast.contrastive_gap_loss(x, y, s, variant="cuaxu", backend=backend)
            loss.backward()

        return memory_use(step, torch.device("cpu"))

    assert run("reference").largest_allocation >= nxn, "the measurement must see the N x N"
    ours = run("torch")
    assert ours.largest_allocation <= rows * n * 4 + 64
    # a few (rows x N) blocks and O(N (D + 2)) rows: the six augmented (N, D + 2) float32
    # matrices of the three sweeps, their gradients, the features and theirs
    assert ours.peak_bytes <= 4 * rows * n * 4 + 24 * n * (d + 2) * 4
    assert ours.peak_bytes < nxn / 4
