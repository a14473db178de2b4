"""Bytes sent per rank by the multi-view, GRAM and Symile losses of flashcontrast.distributed.

One forward + backward of ``multiview_infonce_loss`` and ``multiview_dhel_loss`` (both
strategies, with and without ``groups``), ``gram_loss`` (both strategies) and
``symile_loss`` ("gather", permutations drawn by rank 0 and broadcast, or given; and
``negative_sampling="n_squared"``, "gather") is
measured with ``comm_bytes()`` on W = 1..4 real gloo ranks (one spawn per world size,
equal shards, float32) and compared with the formulas of the ``flashcontrast.distributed``
module docstring ("Bytes sent per rank"), written out below. At W = 4 the shards are
n = 256 rows of D = 512 features (V = 4 views, M = 4 modalities for GRAM, M = 3 for
Symile) and the figures are printed (``pytest -s``).
"""

from __future__ import annotations

import pytest
import torch

from dist_harness import spawn

D = 512
VIEWS, GRAM_M, SYMILE_M = 4, 4, 3
E = F = 4  # float32 features and statistics


def _rows(world: int) -> int:
    """Rows per rank: the reported size at W = 4, small elsewhere."""
    return 256 if world == 4 else 8


def _ar(w: int, numel: int, size: int = F) -> int:
    """An all-reduce of ``numel`` elements, as the counter books it (truncated per call,
    the same float expression)."""
    return int(2 * (w - 1) / w * numel * size)


def _meta(w: int, fields: int) -> int:
    """The metadata all-gather of setup_checked: 7 + F int64 per rank."""
    return (w - 1) * 8 * (7 + fields)


def multiview_bytes(w: int, n: int, d: int, v: int, strategy: str, groups: bool) -> int:
    """MV-InfoNCE / MV-DHEL, the docstring's formula (F = 2 metadata fields)."""
    feats, grads = (w - 1) * n * v * d * E, (w - 1) * n * v * d * F
    ids = (w - 1) * n * 8 if groups else 0
    if strategy == "gather":
        fwd, bwd = feats + ids + _ar(w, 1), grads + 2 * _ar(w, 1)
    else:
        fwd, bwd = feats + ids + _ar(w, 1), feats + ids + grads + 2 * _ar(w, 1)
    return _meta(w, 2) + fwd + bwd


def gram_bytes(w: int, n: int, d: int, k: int, strategy: str) -> int:
    """GRAM with K = M - 1 others, the docstring's formula (F = 2 metadata fields)."""
    feats, grads, total = (w - 1) * n * k * d * E, (w - 1) * n * k * d * F, w * n
    if strategy == "gather":
        fwd = feats + _ar(w, total) + _ar(w, total + 3)
        bwd = grads + 2 * _ar(w, 1)
    else:
        fwd = feats + (w - 1) * n * F + _ar(w, 4)
        bwd = feats + (w - 1) * n * F + grads + 2 * _ar(w, 1)
    return _meta(w, 2) + fwd + bwd


#: Symile's metadata fields: M, permutations given, their N, their checksum, and
#: negative_sampling (the fifth since "n_squared" runs over a process group too: the ranks
#: must agree on it), so its all-gather is (W - 1) 8 (7 + 5) bytes.
SYMILE_FIELDS = 5


def symile_gather_bytes(w: int, n: int, d: int, m: int, drawn: bool) -> int:
    """Symile "gather", the docstring's formula (F = 5 metadata fields); the broadcast
    permutations (M, M-1, N) int64 are counted once on every rank, when W > 1. The same
    for "n_squared" (never drawn: no permutations): the (N, M, D) representations are
    all-gathered (forward) and their gradients reduce-scattered (backward) as for "n", the
    loss and d scale are one-element all-reduces, the upstream gradient's mean another."""
    perms = m * (m - 1) * w * n * 8 if drawn and w > 1 else 0
    fwd = (w - 1) * n * m * d * E + _ar(w, 1)
    bwd = (w - 1) * n * m * d * F + 2 * _ar(w, 1)
    return _meta(w, SYMILE_FIELDS) + perms + fwd + bwd


def _unit(*shape: int, requires_grad: bool = True) -> torch.Tensor:
    x = torch.nn.functional.normalize(torch.randn(*shape), dim=-1)
    return x.requires_grad_(requires_grad)


def _measured(loss_fn, *args, **kwargs) -> int:
    """Bytes this rank sends for ``loss_fn(*args, **kwargs)`` and its backward."""
    import flashcontrast.distributed as fd

    fd.reset_comm_bytes()
    loss_fn(*args, **kwargs).backward()
    return fd.comm_bytes()


def _body(rank: int, world: int) -> dict:
    """Every measured case on this rank (the inputs' values do not change the bytes)."""
    import flashcontrast.distributed as fd

    torch.manual_seed(rank)
    n = _rows(world)
    ids = torch.arange(rank * n, (rank + 1) * n) // 2  # global ids: pairs share a group
    out = {}
    for name, fn in (
        ("mv_infonce", fd.multiview_infonce_loss),
        ("mv_dhel", fd.multiview_dhel_loss),
    ):
        for strategy in ("gather", "ring"):
            for groups in (None, ids):
                views = _unit(VIEWS, n, D)
                key = f"{name}/{strategy}/groups={groups is not None}"
                out[key] = _measured(fn, views, 5.0, groups=groups, strategy=strategy)
    for strategy in ("gather", "ring"):
        anchor, others = _unit(n, D), [_unit(n, D) for _ in range(GRAM_M - 1)]
        out[f"gram/{strategy}"] = _measured(fd.gram_loss, anchor, others, 10.0, strategy=strategy)
    reps = [_unit(n, D) for _ in range(SYMILE_M)]
    out["symile/gather/drawn"] = _measured(fd.symile_loss, reps, 5.0)
    perms = torch.stack(
        [torch.stack([torch.arange(world * n).roll(a + k + 1) for k in range(SYMILE_M - 1)])
         for a in range(SYMILE_M)]
    )  # fmt: skip
    out["symile/gather/given"] = _measured(fd.symile_loss, reps, 5.0, permutations=perms)
    small = [_unit(8, 16) for _ in range(SYMILE_M)]  # n_squared: N^2 pairs per row
    out["symile_n2/gather/8/16"] = _measured(
        fd.symile_loss, small, 5.0, negative_sampling="n_squared"
    )
    return out


def _expected(key: str, world: int) -> int:
    n = _rows(world)
    name, strategy, *rest = key.split("/")
    if name.startswith("mv_"):
        return multiview_bytes(world, n, D, VIEWS, strategy, rest == ["groups=True"])
    if name == "gram":
        return gram_bytes(world, n, D, GRAM_M - 1, strategy)
    if name == "symile_n2":
        return symile_gather_bytes(world, int(rest[0]), int(rest[1]), SYMILE_M, False)
    return symile_gather_bytes(world, n, D, SYMILE_M, rest == ["drawn"])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bytes_match_the_docstring_formulas(world, tmp_path):
    results = spawn(world, tmp_path, _body)
    for r, res in enumerate(results):
        for key, got in res.items():
            want = _expected(key, world)
            assert got == want, f"rank {r} {key}: measured {got} bytes, formula {want}"
    if world == 4:
        width = max(map(len, results[0]))
        lines = [f"  {key:<{width}}  {got:>12,}" for key, got in results[0].items()]
        print(
            f"\nbytes sent per rank, one forward + backward (W=4, n={_rows(4)}, D={D}, "
            f"float32, V={VIEWS}, GRAM M={GRAM_M}, Symile M={SYMILE_M}):\n" + "\n".join(lines)
        )
