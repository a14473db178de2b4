"""Backends: the kernels behind each objective.

The contract (shared/DESIGN.md, "The backend contract"): a backend module supplies, per
objective, a forward that returns O(N) statistics and a backward that recomputes tiles
from them. Input checks, the reduction to a loss and the autograd wiring live once, above
the backends (objectives/<name>.py); a backend adds kernels, not semantics.

CLIP InfoNCE, for every backend module ``blockwise.clip`` / ``triton.clip`` / ``cuda``::

    clip_forward(a, b, scale, bias, groups=None) -> (row_lse, col_lse, diag)
        a, b:   (N, D) features, same dtype (float32, float16 or bfloat16), same device,
                any strides.
        scale:  0-d float32 tensor on the same device (the multiplier s, already exp'd).
        bias:   0-d float32 tensor or None.
        S_ij  = scale * <a_i, b_j> + bias, accumulated in float32.
        row_lse: (N,) float32, LSE_j S_ij;  col_lse: (N,) float32, LSE_i S_ij;
        diag:    (N,) float32, S_ii.
        groups: None, or (N,) int32/int64 group ids on the same device. With groups,
                S_ij := -inf wherever i != j and groups_i == groups_j (those pairs are not
                negatives: they leave both LSEs); the diagonal always stays. The mask is
                applied per tile from the (N,) ids, never as an N x N tensor. None gives
                the ungrouped results bit for bit. The "cuda" backend raises
                NotImplementedError for groups that are not None.

    clip_backward(a, b, scale, bias, row_lse, col_lse, grad, groups=None)
        -> (da, db, dscale, dbias)
        grad:   0-d float32 tensor, dL/dL_clip of L = 1/2 [mean(row_lse - diag)
                                                          + mean(col_lse - diag)].
        dS_ij = grad / (2N) * (exp(S_ij - row_lse_i) + exp(S_ij - col_lse_j) - 2 [i == j])
                (with groups, S masked as in the forward: dS_ij = 0 on excluded pairs)
        da = scale * dS @ b   (N, D) in a.dtype;  db = scale * dS^T @ a   (N, D) in b.dtype
        dscale = sum_ij dS_ij <a_i, b_j>   0-d float32
        dbias  = sum_ij dS_ij              0-d float32 (0 up to rounding; returned anyway)

Row-only InfoNCE with a diagonal override (Symile "n", objectives.md section 5), module
``<backend>/symile.py`` (``cuda.py`` for "cuda")::

    rowce_forward(a, w, scale, diag_logit) -> row_lse
        a, w: (N, D) same dtype/device, any strides; scale: 0-d fp32; diag_logit: (N,) fp32.
        logits_ij = scale * <a_i, w_j> for j != i, logits_ii = diag_logit_i.
        row_lse: (N,) fp32, LSE_j logits_ij.
    rowce_backward(a, w, scale, diag_logit, row_lse, grad_rows) -> (da, dw, dscale, ddiag)
        For the loss sum_i grad_rows_i * row_lse_i (grad_rows: (N,) fp32; the -diag term of
        the cross entropy is differentiated above the backend), P = softmax_j(logits):
        da_i = scale sum_{j != i} grad_rows_i P_ij w_j
        dw_j = scale sum_{i != j} grad_rows_i P_ij a_i
        dscale = sum_{i != j} grad_rows_i P_ij <a_i, w_j>;  ddiag_i = grad_rows_i P_ii
        da, dw in the input dtype; dscale 0-d fp32; ddiag (N,) fp32.

Symile "n_squared" for M = 3 (anchor x, others y, z), module ``<backend>/symile.py``::

    symile_n2_forward(x, y, z, scale) -> row_lse
        x, y, z: (N, D); row_lse_i = LSE_{j,k} scale * sum_d x_id y_jd z_kd over all N^2
        pairs (j, k), generated tile by tile, never stored. (N,) fp32.
    symile_n2_backward(x, y, z, scale, row_lse, grad_rows) -> (dx, dy, dz, dscale)
        Gradients of sum_i grad_rows_i * row_lse_i (the positive term is differentiated
        above the backend), with P_ijk = exp(logit_ijk - row_lse_i), c_ijk = grad_rows_i P_ijk:
        dx_i = scale sum_jk c_ijk y_j * z_k;  dy_j = scale sum_ik c_ijk x_i * z_k;
        dz_k = scale sum_ij c_ijk x_i * y_j;  dscale = sum_ijk c_ijk <x_i, y_j * z_k>.
        dx, dy, dz in the accumulation dtype, not the inputs': near convergence they nearly
        cancel against the positive term's gradient, and the objective adds that in fp32
        before the one rounding (tests/test_half_precision_gradients.py).

Symile "n_squared" for M > 3, "torch" backend only (``blockwise/symile.py``)::

    symile_nk_forward(anchor, others, scale) -> row_lse
        others: (K, N, D), K = M - 1 >= 2; row_lse_i = LSE over all N^K tuples
        (j_1..j_K) of scale * MIP(anchor_i, o^1_j1, ..., o^K_jK).
    symile_nk_backward(anchor, others, scale, row_lse, grad_rows)
        -> (d_anchor, d_others (K, N, D), dscale), as symile_n2_backward.

For Symile, "fp32" statistics mean the accumulation dtype: the "torch" backend keeps them
in float64 for float64 inputs (as for CLIP); the Triton kernels take no float64.

GRAM (objectives.md section 4), module ``<backend>/gram.py``. K = M - 1 other modalities
stacked as others (K, N, D); per-column constants, computed above the backend in O(N K^3):
det_h (N,) = det H_j and adj_h (N, K, K) = adj H_j, H_j the K x K Gram matrix of
(o^1_j, ..., o^K_j). u_ij (K,) = (<t_i, o^1_j>, ..., <t_i, o^K_j>)::

    gram_forward(anchor, others, scale, det_h, adj_h, floor_h)
        -> (row_lse, col_lse, diag, row_sum, col_sum)
        det_ij = det_h_j |t_i|^2 - u_ij^T adj_h_j u_ij;  logits L_ij = -scale V_ij with
        V_ij = sqrt(det_ij) where det_ij > |t_i|^2 floor_h_j, else det_ij * 0 (0, or NaN
        for a NaN / inf det: never a max() that drops NaN). floor_h (N,) is the
        degeneracy floor rtol prod_r |o^r_j|^2 (objectives/gram.py). All (N,) fp32: LSE
        over j, LSE over i, L_ii, sum over j, sum over i (the sums serve label smoothing).
    gram_backward(anchor, others, scale, det_h, adj_h, floor_h, row_lse, col_lse, grad,
                  label_smoothing)
        -> (d_anchor, d_others_u, dscale, col_tt, col_uu)
        With eps = label_smoothing and grad the upstream scalar of
        L = 1/2 [CE_rows(L) + CE_cols(L)] (torch's label-smoothed CE),
        dL_ij = grad / (2N) (P_row_ij + P_col_ij - 2 (1 - eps) [i == j] - 2 eps / N),
        w_ij = dL_ij * (-scale) / (2 V_ij) where det_ij > |t_i|^2 floor_h_j, else 0,
        d_anchor_i = sum_j w_ij (2 det_h_j t_i - 2 sum_r (adj_h_j u_ij)_r o^r_j)   (N, D)
        d_others_u[r]_j = -2 sum_i w_ij (adj_h_j u_ij)_r t_i   (K, N, D): through u only
        dscale = sum_ij dL_ij (-V_ij)   0-d fp32
        col_tt_j = sum_i w_ij |t_i|^2 (N,), col_uu_j = sum_i w_ij u_ij u_ij^T (N, K, K):
        the gradients w.r.t. det_h_j and -adj_h_j, chained above the backend through the
        per-column constants to the others.

SigLIP (objectives.md section 2), module ``<backend>/siglip.py``::

    siglip_forward(a, b, scale, bias) -> total
        S_ij = scale * <a_i, b_j> + bias (bias None = 0), z_ij = +1 if i == j else -1.
        total: 0-d, sum_ij softplus(-z_ij S_ij), stable for any scale, accumulation dtype.
        The loss is total / N (reduced above the backend).
    siglip_backward(a, b, scale, bias, grad) -> (da, db, dscale, dbias)
        dS_ij = (grad / N) (sigmoid(S_ij) - [i == j]);  da = scale dS @ b;
        db = scale dS^T @ a;  dscale = sum_ij dS_ij <a_i, b_j>;  dbias = sum_ij dS_ij.

MV-InfoNCE and MV-DHEL (objectives.md section 3), module ``<backend>/multiview.py``: one
primitive, a row logsumexp over a symmetric self-similarity with the diagonal excluded::

    selfsim_rowlse_forward(u, scale, per_view, groups) -> row_lse
        u: (V, N, D), row (l, i) = sample i of view l; logits = scale * <u_li, u_mj>.
        per_view=False (MV-InfoNCE): columns of (l, i) are every (m, j) != (l, i).
        per_view=True  (MV-DHEL): columns are (l, j), j != i.
        groups: None or integer (N,): also exclude columns with j != i and g_j == g_i.
        row_lse: (V, N), -inf for a row with no allowed column.
    selfsim_rowlse_backward(u, scale, per_view, groups, row_lse, grad_rows) -> (du, dscale)
        Gradients of sum_r grad_rows_r row_lse_r; with the allowed set A (symmetric) and
        P_rc = exp(logit_rc - row_lse_r) on A:
        du_r = scale sum_{c in A(r)} (g_r P_rc + g_c P_cr) u_c;  dscale = sum_A g_r P_rc <u_r, u_c>
        du in the accumulation dtype (float32, float64 for float64 u), not u's: the objective
        adds the positives' gradient before rounding once, since near convergence du nearly
        cancels against it (tests/test_half_precision_gradients.py).
"""
