"""The Triton backend's Symile "n_squared" kernels (flashcontrast/backends/triton/symile.py)
on rectangular inputs: rows x (n, D) against the m^2 pairs of y, z (m, D), n != m, as the
"torch" backend's (backends/blockwise/symile.py) take them.

Rule (tests/verification.py): error(Triton) <= 2 * error(torch backend in float32 on the
same rounded inputs) + atol, errors against the torch backend in float64 (x, y, z upcast),
as tests/test_symile.py checks the triton backend against the reference.

Interpreter note: the Triton interpreter upcasts bf16 tiles to fp32 before tl.dot, so bf16
runs here check the kernels' logic, not bf16 tensor-core products.
"""

from __future__ import annotations

import pytest
import torch

from flashcontrast.backends.blockwise import symile as torch_symile
from verification import TRITON_SKIP, assert_by_rule

pytestmark = pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))

if TRITON_SKIP is None:
    from flashcontrast.backends.triton import symile as triton_symile
    from flashcontrast.backends.triton._plan import override_tiles
else:  # keeps collection working; every test is skipped
    triton_symile = override_tiles = None

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
NAMES = ("row_lse", "dx", "dy", "dz", "dscale")


def _inputs(n: int, m: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Unit rows x (n, D), y, z (m, D) in dtype, a non-trivial grad_rows (n,) fp32 and a
    scale sqrt(D)-sized (sum_d x y z of unit vectors is ~ 1/D) so logits are O(10)."""
    g = torch.Generator().manual_seed(seed)
    x, y, z = (
        torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1).to(dtype)
        for rows in (n, m, m)
    )
    grad_rows = torch.randn(n, generator=g) / max(n, 1) + 0.3
    return x, y, z, torch.tensor(10.0 * d**0.5), grad_rows


def _run(module, x, y, z, scale, grad_rows, dt=None):
    """[row_lse, dx, dy, dz, dscale] of ``module``'s symile_n2 (inputs upcast to dt)."""
    if dt is not None:
        x, y, z, scale, grad_rows = (t.to(dt) for t in (x, y, z, scale, grad_rows))
    lse = module.symile_n2_forward(x, y, z, scale)
    return [lse, *module.symile_n2_backward(x, y, z, scale, lse, grad_rows)]


def _check(n: int, m: int, d: int, dtype: torch.dtype) -> None:
    x, y, z, scale, grad_rows = _inputs(n, m, d, dtype)
    ours = _run(triton_symile, x, y, z, scale, grad_rows)
    assert [tuple(t.shape) for t in ours] == [(n,), (n, d), (m, d), (m, d), ()]
    assert all(t.dtype == torch.float32 for t in ours[:4])  # fp32 for every input dtype
    same = _run(torch_symile, x, y, z, scale, grad_rows, torch.float32)
    exact = _run(torch_symile, x, y, z, scale, grad_rows, torch.float64)
    assert_by_rule(NAMES, ours, same, exact, dtype)


@pytest.mark.parametrize(("n", "m"), [(5, 9), (9, 5), (1, 7), (7, 1), (13, 13)])
@pytest.mark.parametrize("d", [8, 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_symile_n2_rectangular(n, m, d, dtype):
    _check(n, m, d, dtype)


@pytest.mark.parametrize(("n", "m"), [(18, 35), (35, 18)])
def test_symile_n2_rectangular_several_blocks(n, m):
    """16-row tiles: several row blocks of x and column blocks of z, both with a ragged
    last block."""
    with override_tiles(block_m=16, block_n=16):
        _check(n, m, 20, torch.float32)


def test_symile_n2_no_rows():
    """n = 0: no row LSEs, dx empty, and dy, dz, dscale exactly 0 (no candidate is weighed)."""
    x, y, z, scale, grad_rows = _inputs(0, 6, 8, torch.float32)
    lse, dx, dy, dz, dscale = _run(triton_symile, x, y, z, scale, grad_rows)
    assert lse.shape == (0,) and dx.shape == (0, 8)
    assert dy.shape == dz.shape == (6, 8)
    assert torch.equal(dy, torch.zeros_like(dy)) and torch.equal(dz, torch.zeros_like(dz))
    assert dscale.item() == 0.0


def test_symile_n2_rejects_mismatched_shapes():
    x, y, z, scale, _ = _inputs(4, 5, 8, torch.float32)
    with pytest.raises(ValueError, match=r"x \(n, D\) and y, z \(m, D\)"):
        triton_symile.symile_n2_forward(x, y, z[:4], scale)
    with pytest.raises(ValueError, match=r"x \(n, D\) and y, z \(m, D\)"):
        triton_symile.symile_n2_forward(x[:, :6], y, z, scale)
