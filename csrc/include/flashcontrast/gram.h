// GRAM (shared/objectives.md section 4): host launch declarations. Torch- and CUDA-free,
// conventions as pair.h.
#pragma once

#include <cstdint>

#include "flashcontrast/dtype.h"

namespace flashcontrast {

constexpr int kGramMaxK = 5;  // others per sample (M - 1), 1..5

// Python: flashcontrast._C.GramParams (named fields; errors name them, "GramParams.k ...").
// Rectangular (backends/__init__.py): anchor rows t (n, d) against the m columns of others
// (k, m, d): element (r, j, e) at others[r * s0 + j * s1 + e * s2]; row i's own column is
// row_offset + i (none where that is outside [0, m)). m < 0 (the default): m = n, the
// square call. det_h (m,) and adj_h (m, k, k) fp32 contiguous (per-column constants of
// objectives.md); floor_h (m,) fp32: the degeneracy floor, det_ij <= |t_i|^2 floor_h_j is a
// zero volume.
struct GramInputs {
  const void* anchor = nullptr;
  const void* others = nullptr;
  int64_t n = 0, d = 0, k = 0;
  int64_t m = -1, row_offset = 0;
  int64_t anchor_stride0 = 0, anchor_stride1 = 0;
  int64_t others_stride0 = 0, others_stride1 = 0, others_stride2 = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;
  const float* det_h = nullptr;
  const float* adj_h = nullptr;
  const float* floor_h = nullptr;
};

// 3 * (H n + G m), G = min(ceil(n/64), 2 SMs), H = min(ceil(m/32), max(1, 2 SMs / G)).
int64_t gram_forward_workspace_elems(const GramInputs& in, int device);  // sizes only
// det_ij = det_h_j |t_i|^2 - u_ij^T adj_h_j u_ij, L_ij = -scale sqrt(det_ij) where
// det_ij > |t_i|^2 floor_h_j, else -scale sqrt(det_ij * 0) (0, NaN for NaN); writes fp32
// row_lse (n,), col_lse (m,), diag (n,: L_{i, row_offset + i}, 0 outside the block),
// row_sum (n,), col_sum (m,): row statistics over this call's columns, column ones over
// its rows (partial where the batch is split over calls).
void gram_forward(const GramInputs& in, float* row_lse, float* col_lse, float* diag,
                  float* row_sum, float* col_sum, float* workspace, int64_t workspace_elems,
                  void* stream);
// n d + k m d + n + ceil(m/32) * SPLIT, SPLIT = max(1, min(ceil(n/64), ceil(2 SMs /
// ceil(m/32)))).
int64_t gram_backward_workspace_elems(const GramInputs& in, int device);  // sizes only
// Per backends/__init__.py: d_anchor (n, d) and d_others_u (k, m, d), contiguous, in
// out_dtype (the inputs' dtype or fp32); dscale fp32 scalar; col_tt (m,) and col_uu
// (m, k, k) fp32. row_lse (n,) / col_lse (m,) the merged LSEs; grad: fp32 scalar; total:
// the N of 1/(2N) and eps/N (>= 1).
void gram_backward(const GramInputs& in, const float* row_lse, const float* col_lse,
                   const float* grad, float label_smoothing, int64_t total, DType out_dtype,
                   void* d_anchor, void* d_others_u, float* dscale, float* col_tt,
                   float* col_uu, float* workspace, int64_t workspace_elems, void* stream);

}  // namespace flashcontrast
