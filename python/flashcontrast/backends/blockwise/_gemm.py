"""The panel path's GEMMs: 16-bit operands, float32 results, no float32 copy of a feature.

On CUDA, cuBLAS multiplies float16 / bfloat16 operands on the tensor cores with float32
accumulation and can write the float32 result directly (``torch.mm(x, y,
out_dtype=torch.float32)``, ``torch.addmm(c, x, y, out_dtype=torch.float32)``): the logits
of a panel are exact products of the 16-bit inputs summed in float32, and the backward's
dS, rounded once to the inputs' dtype, is multiplied the same way. That is the GEMM rate
of the device for every product of the pair engine on the torch backend and of the
Triton panel path (docs/engine.md section 9).

Elsewhere (the CPU, or a torch without ``out_dtype``) the features are cast once to float32
and every product runs in float32: for 16-bit inputs the operands are the same 16-bit
values (dS still rounded to the inputs' dtype first), so the numerics are the GPU's up to
the order of summation, and the CPU tests check the very algorithm the GPU runs.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["addmm_", "mixed_gemm", "mm", "operands"]

_LOW = (torch.float16, torch.bfloat16)


@functools.cache
def _cuda_out_dtype() -> bool:
    """Whether this torch's CUDA mm / addmm take ``out_dtype`` (checked on the meta device,
    which needs no GPU; the schema is the same for every device)."""
    x = torch.empty((2, 2), dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(x, x, out_dtype=torch.float32)
        c = torch.empty((2, 2), device="meta")
        torch.addmm(c, x, x, out_dtype=torch.float32, out=c)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def mixed_gemm(features: Tensor) -> bool:
    """True when the panel's GEMMs take ``features`` as they are (16-bit on CUDA, with
    float32 results): no cast, no copy. False: cast them once to float32 (or float64)."""
    return features.is_cuda and features.dtype in _LOW and _cuda_out_dtype()


def operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) as the GEMMs take them: as given on the mixed path (:func:`mixed_gemm`), else
    cast once to the accumulation dtype (float32; float64 stays float64)."""
    if mixed_gemm(a) and b.dtype == a.dtype:
        return a, b
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return a.to(acc), b.to(acc)


def mm(x: Tensor, y: Tensor) -> Tensor:
    """x @ y in float32 (x, y of one dtype: 16-bit on the mixed path, else the result's)."""
    if x.dtype in _LOW:
        return torch.mm(x, y, out_dtype=torch.float32)
    return torch.mm(x, y)


_ADDMM_IN_PLACE = [True]  # False once this torch refused addmm's out_dtype with out=c


def addmm_(c: Tensor, x: Tensor, y: Tensor) -> None:
    """c += x @ y with c float32 (x, y as for :func:`mm`), accumulated in float32.

    16-bit operands: one cuBLAS call with beta = 1 into c where this torch takes
    ``out_dtype`` with ``out=c`` (checked on meta tensors only: no GPU here to check the
    CUDA kernel), else, from the first refusal on, the product in float32 added to c (one
    more (rows of c) x D float32 pass: small beside the GEMM)."""
    if x.dtype not in _LOW:
        c.addmm_(x, y)
        return
    if _ADDMM_IN_PLACE[0]:
        try:
            torch.addmm(c, x, y, out_dtype=torch.float32, out=c)
            return
        except (RuntimeError, TypeError):
            _ADDMM_IN_PLACE[0] = False
    c.add_(torch.mm(x, y, out_dtype=torch.float32))
