"""Backends: the kernels behind each objective.

The contract (shared/DESIGN.md, "The backend contract"): a backend module supplies, per
objective, a forward that returns O(N) statistics and a backward that recomputes tiles
from them. Input checks, the reduction to a loss and the autograd wiring live once, above
the backends (objectives/<name>.py); a backend adds kernels, not semantics.

CLIP InfoNCE, for every backend module ``blockwise.clip`` / ``triton.clip`` / ``cuda``::

    clip_forward(a, b, scale, bias) -> (row_lse, col_lse, diag)
        a, b:   (N, D) features, same dtype (float32, float16 or bfloat16), same device,
                any strides.
        scale:  0-d float32 tensor on the same device (the multiplier s, already exp'd).
        bias:   0-d float32 tensor or None.
        S_ij  = scale * <a_i, b_j> + bias, accumulated in float32.
        row_lse: (N,) float32, LSE_j S_ij;  col_lse: (N,) float32, LSE_i S_ij;
        diag:    (N,) float32, S_ii.

    clip_backward(a, b, scale, bias, row_lse, col_lse, grad) -> (da, db, dscale, dbias)
        grad:   0-d float32 tensor, dL/dL_clip of L = 1/2 [mean(row_lse - diag)
                                                          + mean(col_lse - diag)].
        dS_ij = grad / (2N) * (exp(S_ij - row_lse_i) + exp(S_ij - col_lse_j) - 2 [i == j])
        da = scale * dS @ b   (N, D) in a.dtype;  db = scale * dS^T @ a   (N, D) in b.dtype
        dscale = sum_ij dS_ij <a_i, b_j>   0-d float32
        dbias  = sum_ij dS_ij              0-d float32 (0 up to rounding; returned anyway)
"""
