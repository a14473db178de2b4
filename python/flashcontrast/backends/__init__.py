"""Backends: the kernels behind each objective.

The contract (docs/design.md, "The backend contract"; the engine: backends/pair.py and
docs/engine.md): a backend module supplies, per objective, a forward that returns O(N)
statistics and a backward that recomputes tiles from them. Input checks, the reduction
to a loss and the autograd wiring live once, above the backends (objectives/<name>.py);
a backend adds kernels, not semantics.

The pair engine, module ``<backend>/pair.py`` (``cuda.py`` for "cuda"; contract:
``backends/pair.py``)::

    pair_forward(a, b, scale, bias, pair, row_offset=0, col_offset=0, row_groups=None,
                 col_groups=None, positive_logits=None) -> Stats
    pair_backward(a, b, scale, bias, pair, stats, coefs, row_offset=0, col_offset=0,
                  row_groups=None, col_groups=None, positive_logits=None,
                  out_dtype=None) -> Grads

    One rectangular sweep of rows a (n, D) against columns b (m, D), S_ij = scale <a_i,
    b_j> + bias, with the entry sets (exclusions, group masks, positives) decided per tile
    from integers and the epilogue ``pair.epilogue`` ("softmax", "rows", "sigmoid")
    choosing the O(n + m) statistics; the backward recomputes the tiles from the merged
    statistics and the loss's coefficients. Every objective but GRAM and Symile
    "n_squared" is an epilogue of it: CLIP ("softmax"), SigLIP ("sigmoid"), InfoNCE,
    MV-InfoNCE, MV-DHEL and Symile "n" ("rows"; Symile's positive through
    ``positive_logits``). The signatures, the sets, the statistics and the gradients are
    specified in ``backends/pair.py``. "torch" and "cuda" also take
    ``max_block_elements`` (the torch backend's block budget; "cuda" ignores it). The
    three backends take these two functions from ``backends/_pair_entry.py`` (the
    signatures written once) and implement only the sweep, over a ``Sweep`` of the
    arguments.

The two objectives with kernels of their own follow.

Symile "n_squared" for M = 3 (anchor x, others y, z), module ``<backend>/symile.py``::

    symile_n2_forward(x, y, z, scale) -> row_lse
        x (n, D), y, z (m, D) (n = m = N in one process; a rank's n_r rows against the
        gathered N columns in ``distributed/symile.py``); row_lse_i = LSE_{j,k} scale *
        sum_d x_id y_jd z_kd over all m^2 pairs (j, k), generated tile by tile, never
        stored. (n,) fp32 (-inf for every row when m = 0).
    symile_n2_backward(x, y, z, scale, row_lse, grad_rows) -> (dx, dy, dz, dscale)
        dx (n, D), dy and dz (m, D).
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
in float64 for float64 inputs (as its pair engine does); the Triton kernels take no
float64.

GRAM (docs/objectives.md section 4), module ``<backend>/gram.py``. K = M - 1 other modalities
stacked as others (K, N, D); per-column constants, computed above the backend in O(N K^3):
det_h (N,) = det H_j and adj_h (N, K, K) = adj H_j, H_j the K x K Gram matrix of
(o^1_j, ..., o^K_j). u_ij (K,) = (<t_i, o^1_j>, ..., <t_i, o^K_j>). A block's inputs
travel as one ``backends.gram.GramBlock(anchor, others, scale, det_h, adj_h, floor_h,
row_offset=0)``::

    gram_forward(block) -> (row_lse, col_lse, diag, row_sum, col_sum)
        Rectangular: anchor rows (n, D) against the columns of others (K, m, D), row i's
        own column at row_offset + i (diag 0 where it is outside the block); the row
        statistics are over this block's columns, the column ones over its rows: partial,
        merged by the caller (logaddexp for the LSEs, + for the sums). The single-process
        call is n = m, row_offset = 0 (every backend: "torch", "triton", "cuda").
        det_ij = det_h_j |t_i|^2 - u_ij^T adj_h_j u_ij;  logits L_ij = -scale V_ij with
        V_ij = sqrt(det_ij) where det_ij > |t_i|^2 floor_h_j, else det_ij * 0 (0, or NaN
        for a NaN / inf det: never a max() that drops NaN). floor_h (N,) is the
        degeneracy floor rtol prod_r |o^r_j|^2 (objectives/gram.py). All (N,) fp32: LSE
        over j, LSE over i, L_ii, sum over j, sum over i (the sums serve label smoothing).
    gram_backward(block, coefs, out_dtype=None)
            -> (d_anchor, d_others_u, dscale, col_tt, col_uu)
        coefs = ``backends.gram.GramCoefs(row_lse, col_lse, grad, label_smoothing,
        total=None)``: row_lse / col_lse the merged (global) ones; total the N of 1/(2N)
        and eps/N (default m); out_dtype of the partial d_anchor / d_others_u (None: the
        inputs').
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
"""
