"""The uniformity sweep's features: squared distances as dot products of augmented rows.

    -t ||x_i - y_j||^2 = 2t <x_i, y_j> - t |x_i|^2 - t |y_j|^2 = <a(x)_i, b(y)_j>,
    a(x)_i = (sqrt(2t) x_i, -t |x_i|^2, 1),   b(y)_j = (sqrt(2t) y_j, 1, -t |y_j|^2),

exactly, so a log-mean-exp of -t ||x_i - y_j||^2 is one row sweep of a(x) against b(y)
(``uniformity.py``). a and b are (N, D + 2) in the accumulation dtype (float32; float64 for
float64 features): the norms' column carries ~|x|^2 t and would lose its low bits in 16
bits. The ops that run the sweep build them in their forward and again in their backward
from the features as given, so no float32 copy of 16-bit features lives between the two;
the gradients map back by the chain rule:

    d x_i = sqrt(2t) da_i[:D] - 2t da_i[D] x_i,     d y_j = sqrt(2t) db_j[:D] - 2t db_j[D+1] y_j.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validation import accumulation_dtype

__all__ = ["columns", "columns_grad", "grads", "operands", "rows", "rows_grad"]


def _parts(z: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(sqrt(2t) z, -t |z|^2 (N, 1), ones (N, 1)) in the accumulation dtype."""
    za = z.to(accumulation_dtype(z.dtype))
    sq = -t * (za * za).sum(dim=1, keepdim=True)
    return math.sqrt(2.0 * t) * za, sq, torch.ones_like(sq)


def rows(x: Tensor, t: float) -> Tensor:
    """a(x) (N, D + 2): (sqrt(2t) x_i, -t |x_i|^2, 1)."""
    main, sq, one = _parts(x, t)
    return torch.cat([main, sq, one], dim=1)


def columns(y: Tensor, t: float) -> Tensor:
    """b(y) (M, D + 2): (sqrt(2t) y_j, 1, -t |y_j|^2)."""
    main, sq, one = _parts(y, t)
    return torch.cat([main, one, sq], dim=1)


def _grad(z: Tensor, t: float, dz: Tensor, norm_column: int) -> Tensor:
    d = z.shape[1]
    za = z.to(dz.dtype)
    return math.sqrt(2.0 * t) * dz[:, :d] - (2.0 * t) * dz[:, norm_column, None] * za


def rows_grad(x: Tensor, t: float, da: Tensor) -> Tensor:
    """d x (N, D) in da's dtype from d a(x) (N, D + 2)."""
    return _grad(x, t, da, x.shape[1])


def columns_grad(y: Tensor, t: float, db: Tensor) -> Tensor:
    """d y (M, D) in db's dtype from d b(y) (M, D + 2)."""
    return _grad(y, t, db, y.shape[1] + 1)


def operands(x: Tensor, y: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """A sweep's rows and columns: (a(x), b(y)) for the uniformity sweep (t > 0), else the
    features themselves (t = 0)."""
    return (rows(x, t), columns(y, t)) if t > 0 else (x, y)


def grads(x: Tensor, y: Tensor, t: float, da: Tensor, db: Tensor) -> tuple[Tensor, Tensor]:
    """(d x, d y) from the sweep's (d a, d b) (:func:`operands`' inverse direction): the
    chain rule for t > 0, the gradients themselves for t = 0."""
    return (rows_grad(x, t, da), columns_grad(y, t, db)) if t > 0 else (da, db)
