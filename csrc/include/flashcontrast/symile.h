// Symile (shared/objectives.md section 5): host launch declarations. Torch- and CUDA-free,
// conventions as clip.h (device pointers, element strides, `stream` a cudaStream_t, no host
// synchronization, std::invalid_argument / flashcontrast::CudaError).
#pragma once

#include <cstdint>

#include "flashcontrast/clip.h"  // DType, PairInputs

namespace flashcontrast {

// ---- rowce: row-only InfoNCE with a diagonal override (Symile "n").
// in.a = a, in.b = w (the product rows prod_o x^o_{pi_o(j)}, formed above); in.bias must be
// null. logits_ij = scale <a_i, w_j> (j != i), logits_ii = diag_logit_i ((n,) fp32).

// 2 * H * n, H = min(ceil(n/64), max(1, ceil(4 * SMs / ceil(n/64)))).
int64_t rowce_forward_workspace_elems(int64_t n, int64_t d, int device);
// row_lse (n,) fp32.
void rowce_forward(const PairInputs& in, const float* diag_logit, float* row_lse,
                   float* workspace, int64_t workspace_elems, void* stream);
// (1 + SPLIT) * n * d + ceil(n/64) * SPLIT, SPLIT as clip_backward_workspace_elems.
int64_t rowce_backward_workspace_elems(int64_t n, int64_t d, int device);
// For sum_i grad_rows_i row_lse_i: da, dw contiguous (n, d) in the input dtype, dscale a
// fp32 device scalar, ddiag (n,) fp32. grad_rows (n,) fp32.
void rowce_backward(const PairInputs& in, const float* diag_logit, const float* row_lse,
                    const float* grad_rows, void* da, void* dw, float* dscale, float* ddiag,
                    float* workspace, int64_t workspace_elems, void* stream);

// ---- symile_n2: M = 3 "n_squared", row_lse_i = LSE_{j,k} scale sum_d x_id y_jd z_kd.
// Python: flashcontrast._C.TripleParams (named fields; errors name them, "TripleParams.n ...").
struct TripleInputs {
  const void* x = nullptr;
  const void* y = nullptr;
  const void* z = nullptr;
  int64_t n = 0;
  int64_t d = 0;
  int64_t x_stride0 = 0, x_stride1 = 0;
  int64_t y_stride0 = 0, y_stride1 = 0;
  int64_t z_stride0 = 0, z_stride1 = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;  // device scalar, required
};

// 2 * H * n, H = min(n, max(1, ceil(4 * SMs / ceil(n/64)))).
int64_t symile_n2_forward_workspace_elems(const TripleInputs& in, int device);  // sizes only
void symile_n2_forward(const TripleInputs& in, float* row_lse, float* workspace,
                       int64_t workspace_elems, void* stream);
// 3 * n * d + ceil(n/64) * S, S = min(n, max(1, ceil(4 * SMs / ceil(n/64)))).
int64_t symile_n2_backward_workspace_elems(const TripleInputs& in, int device);  // sizes only
// For sum_i grad_rows_i row_lse_i: dx, dy, dz contiguous (n, d) float32 (any input dtype:
// the objective adds the positive's gradient before rounding once), dscale a fp32 scalar.
void symile_n2_backward(const TripleInputs& in, const float* row_lse, const float* grad_rows,
                        void* dx, void* dy, void* dz, float* dscale, float* workspace,
                        int64_t workspace_elems, void* stream);

}  // namespace flashcontrast
