// GRAM (shared/objectives.md section 4): host launch declarations. Torch- and CUDA-free,
// conventions as pair.h.
#pragma once

#include <cstdint>

#include "flashcontrast/dtype.h"

namespace flashcontrast {

constexpr int kGramMaxK = 5;  // others per sample (M - 1), 1..5

// Python: flashcontrast._C.GramParams (named fields; errors name them, "GramParams.k ...").
// anchor t (n, d); others (k, n, d): element (r, j, e) at others[r * s0 + j * s1 + e * s2];
// det_h (n,) and adj_h (n, k, k) fp32 contiguous (per-column constants of objectives.md);
// floor_h (n,) fp32: the degeneracy floor, det_ij <= |t_i|^2 floor_h_j is a zero volume.
struct GramInputs {
  const void* anchor = nullptr;
  const void* others = nullptr;
  int64_t n = 0, d = 0, k = 0;
  int64_t anchor_stride0 = 0, anchor_stride1 = 0;
  int64_t others_stride0 = 0, others_stride1 = 0, others_stride2 = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;
  const float* det_h = nullptr;
  const float* adj_h = nullptr;
  const float* floor_h = nullptr;
};

// 3 * (G + H) * n, G = min(ceil(n/64), 2 SMs), H = min(ceil(n/32), max(1, 2 SMs / G)).
int64_t gram_forward_workspace_elems(const GramInputs& in, int device);  // sizes only
// det_ij = det_h_j |t_i|^2 - u_ij^T adj_h_j u_ij, L_ij = -scale sqrt(det_ij) where
// det_ij > |t_i|^2 floor_h_j, else -scale sqrt(det_ij * 0) (0, NaN for NaN); writes (n,) fp32
// row_lse, col_lse, diag (L_ii), row_sum, col_sum.
void gram_forward(const GramInputs& in, float* row_lse, float* col_lse, float* diag,
                  float* row_sum, float* col_sum, float* workspace, int64_t workspace_elems,
                  void* stream);
// (1 + k) * n * d + n + ceil(n/32) * SPLIT, SPLIT = max(1, min(ceil(n/64), ceil(2 SMs /
// ceil(n/32)))).
int64_t gram_backward_workspace_elems(const GramInputs& in, int device);  // sizes only
// Per backends/__init__.py: d_anchor (n, d) and d_others_u (k, n, d), contiguous, input
// dtype; dscale fp32 scalar; col_tt (n,) and col_uu (n, k, k) fp32. grad: fp32 scalar.
void gram_backward(const GramInputs& in, const float* row_lse, const float* col_lse,
                   const float* grad, float label_smoothing, void* d_anchor, void* d_others_u,
                   float* dscale, float* col_tt, float* col_uu, float* workspace,
                   int64_t workspace_elems, void* stream);

}  // namespace flashcontrast
