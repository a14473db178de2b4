// MV-InfoNCE / MV-DHEL negatives (shared/objectives.md section 3): the self-similarity row
// logsumexp with the diagonal (and, optionally, same-group columns) excluded. Host launch
// declarations; torch- and CUDA-free, conventions as clip.h (device pointers, element
// strides, `stream` a cudaStream_t, no host synchronization, std::invalid_argument /
// flashcontrast::CudaError).
#pragma once

#include <cstdint>

#include "flashcontrast/clip.h"  // DType

namespace flashcontrast {

// u (v, n, d): row (l, i) = sample i of view l at u[l * stride_v + i * stride_n], element k
// at + k * stride_d. Logits scale * <u_li, u_mj> in fp32. Segments: per_view = false, one
// segment of all v n rows (columns of (l, i): every (m, j) != (l, i)); per_view = true, v
// segments of n rows (columns of (l, i): (l, j), j != i). groups: (n,) int64 device ids or
// nullptr; with ids, columns with j != i and groups[j] == groups[i] are also excluded.
struct SelfSimInputs {
  const void* u = nullptr;
  int64_t v = 0, n = 0, d = 0;
  int64_t stride_v = 0, stride_n = 0, stride_d = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;  // device scalar, required
  bool per_view = false;
  const int64_t* groups = nullptr;
};

// 2 * H * v * n, H = min(C, max(1, ceil(2 * SMs / (C * S)))), C = ceil(L / 64) row (and
// column) blocks per segment of L rows, S segments.
int64_t selfsim_forward_workspace_elems(int64_t v, int64_t n, int64_t d, bool per_view,
                                        int device);
// row_lse (v, n) contiguous fp32; -inf for a row with no allowed column.
void selfsim_rowlse_forward(const SelfSimInputs& in, float* row_lse, float* workspace,
                            int64_t workspace_elems, void* stream);

// v * n * d + C * H * S (H, C, S as above).
int64_t selfsim_backward_workspace_elems(int64_t v, int64_t n, int64_t d, bool per_view,
                                         int device);
// Gradients of sum_r grad_rows_r row_lse_r (row_lse, grad_rows: (v, n) contiguous fp32):
// du (v, n, d) contiguous float32 (any input dtype), dscale a fp32 device scalar. With the
// allowed set A (symmetric) and P_rc = exp(logit_rc - row_lse_r):
// du_r = scale sum_{c in A(r)} (g_r P_rc + g_c P_cr) u_c, dscale = sum_A g_r P_rc <u_r, u_c>.
// The workspace is zeroed on the stream.
void selfsim_rowlse_backward(const SelfSimInputs& in, const float* row_lse,
                             const float* grad_rows, float* du, float* dscale, float* workspace,
                             int64_t workspace_elems, void* stream);

}  // namespace flashcontrast
