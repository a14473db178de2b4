// Symile "n_squared" (docs/objectives.md section 5): host launch declarations. Torch- and
// CUDA-free, conventions as pair.h (device pointers, element strides, `stream` a
// cudaStream_t, no host synchronization, std::invalid_argument / flashcontrast::CudaError).
// Symile "n" runs on the pair engine (pair.h).
#pragma once

#include <cstdint>

#include "flashcontrast/dtype.h"

namespace flashcontrast {

// ---- symile_n2: M = 3 "n_squared", row_lse_i = LSE_{j,k} scale sum_d x_id y_jd z_kd.
// Python: flashcontrast._C.TripleParams (named fields; errors name them, "TripleParams.n ...").
// Rectangular (backends/__init__.py): rows x (n, d) against the m^2 pairs (j, k) of y, z
// (m, d); m < 0 (the default): m = n, the square call. A process group's rank-local part is
// n_r rows against the gathered m = N columns (distributed/symile.py).
struct TripleInputs {
  const void* x = nullptr;
  const void* y = nullptr;
  const void* z = nullptr;
  int64_t n = 0;
  int64_t d = 0;
  int64_t m = -1;
  int64_t x_stride0 = 0, x_stride1 = 0;
  int64_t y_stride0 = 0, y_stride1 = 0;
  int64_t z_stride0 = 0, z_stride1 = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;  // device scalar, required
};

// 2 * H * n, H = min(m, max(1, ceil(4 * SMs / ceil(n/64)))).
int64_t symile_n2_forward_workspace_elems(const TripleInputs& in, int device);  // sizes only
// row_lse (n,) fp32.
void symile_n2_forward(const TripleInputs& in, float* row_lse, float* workspace,
                       int64_t workspace_elems, void* stream);
// (n + 2 m) * d + ceil(m/64) * S, S = min(m, max(1, ceil(4 * SMs / ceil(m/64)))).
int64_t symile_n2_backward_workspace_elems(const TripleInputs& in, int device);  // sizes only
// For sum_i grad_rows_i row_lse_i (row_lse, grad_rows (n,) fp32): dx contiguous (n, d), dy,
// dz contiguous (m, d), all float32 (any input dtype: the objective adds the positive's
// gradient before rounding once), dscale a fp32 scalar.
void symile_n2_backward(const TripleInputs& in, const float* row_lse, const float* grad_rows,
                        void* dx, void* dy, void* dz, float* dscale, float* workspace,
                        int64_t workspace_elems, void* stream);

}  // namespace flashcontrast
