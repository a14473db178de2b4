"""Valid instances of the typed launcher structs of ``flashcontrast._C`` for the
bad-argument tests (tests/test_cuda_pair.py, tests/test_cuda_symile_gram.py): each test
changes the field it checks. The addresses are dummies (8): the launchers refuse a bad
field before they read memory or call CUDA.
"""

from __future__ import annotations

from types import ModuleType


def pair_params(c: ModuleType, **change):
    """PairParams of a (5, 3) x (6, 3) float32 'rows' block with positives."""
    fields = dict(
        a=8, b=8, n=5, m=6, d=3, a_stride0=3, a_stride1=1, b_stride0=3, b_stride1=1,
        dtype="float32", scale=8, epilogue="rows", positives=True,
    )  # fmt: skip
    fields.update(change)
    return c.PairParams(**fields)


def gram_params(c: ModuleType, **change):
    """GramParams of anchors (5, 3) and others (5, k, 3); k = 6 by default, which the
    launchers refuse (k counts others per sample: 1 to 5)."""
    fields = dict(
        anchor=8, others=8, n=5, d=3, k=6, anchor_stride0=3, anchor_stride1=1,
        others_stride0=15, others_stride1=3, others_stride2=1, dtype="float32", scale=8,
        det_h=8, adj_h=8, floor_h=8,
    )  # fmt: skip
    fields.update(change)
    return c.GramParams(**fields)


def triple_params(c: ModuleType, **change):
    """TripleParams of three (5, 3) float32 modalities (Symile "n_squared")."""
    fields = dict(
        x=8, y=8, z=8, n=5, d=3, x_stride0=3, x_stride1=1, y_stride0=3, y_stride1=1,
        z_stride0=3, z_stride1=1, dtype="float32", scale=8,
    )  # fmt: skip
    fields.update(change)
    return c.TripleParams(**fields)
