// CLIP InfoNCE (shared/objectives.md section 1): host launch declarations. Torch-free and
// CUDA-header-free, so bindings.cpp (a plain C++ file) can include it. Pointers are device
// pointers; strides are in elements; `stream` is a cudaStream_t (nullptr: legacy default).
// Every function throws std::invalid_argument for bad arguments (checked before any CUDA
// call) and flashcontrast::CudaError for CUDA failures. None synchronizes with the host.
#pragma once

#include <cstdint>
#include <string>

#include "flashcontrast/dtype.h"  // DType, parse_dtype

namespace flashcontrast {

// A (n, d) and B (n, d) of one dtype with element strides, and S = scale * A B^T + bias.
struct PairInputs {
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t n = 0;
  int64_t d = 0;
  int64_t a_stride0 = 0, a_stride1 = 0;  // element (i, k) of A at a[i * a_stride0 + k * a_stride1]
  int64_t b_stride0 = 0, b_stride1 = 0;
  DType dtype = DType::kFloat32;
  const float* scale = nullptr;  // device scalar, required
  const float* bias = nullptr;   // device scalar, or nullptr for no bias
  // (n,) device int64 group ids, or nullptr for none. CLIP only (other objectives ignore
  // it): S_ij = -inf wherever i != j and groups[i] == groups[j] (not negatives; they leave
  // both LSEs and dS_ij = 0); the diagonal always stays.
  const int64_t* groups = nullptr;
};

// fp32 elements of the forward workspace on `device` (its SM count sets the grid):
//   2 * (G + H) * n, with G = min(ceil(n/64), 2 * SMs), H = min(ceil(n/64), max(1, 2 * SMs / G)).
int64_t clip_forward_workspace_elems(int64_t n, int64_t d, int device);

// row_lse[i] = LSE_j S_ij, col_lse[j] = LSE_i S_ij, diag[i] = S_ii: (n,) fp32 each
// (S group-masked when in.groups is set; without groups the results are bit for bit those
// of the ungrouped kernels, which take the same code path with the mask test skipped).
// Workspace contents on entry are ignored.
void clip_forward(const PairInputs& in, float* row_lse, float* col_lse, float* diag,
                  float* workspace, int64_t workspace_elems, void* stream);

// fp32 elements of the backward workspace on `device`:
//   (1 + SPLIT) * n * d + 2 * ceil(n/64) * SPLIT,
// with SPLIT = max(1, min(ceil(n/64), ceil(2 * SMs / ceil(n/64)), 4)).
int64_t clip_backward_workspace_elems(int64_t n, int64_t d, int device);

// With dS = grad / (2n) * (exp(S - row_lse_i) + exp(S - col_lse_j) - 2 [i == j]) (0 on
// group-masked pairs when in.groups is set):
// da = scale * dS B and db = scale * dS^T A, written contiguous (n, d) in the input dtype;
// dscale = sum dS * (A B^T) and dbias = sum dS, fp32 device scalars. `grad` is a device
// fp32 scalar. Workspace contents on entry are ignored (it is zeroed on the stream).
void clip_backward(const PairInputs& in, const float* row_lse, const float* col_lse,
                   const float* grad, void* da, void* db, float* dscale, float* dbias,
                   float* workspace, int64_t workspace_elems, void* stream);

}  // namespace flashcontrast
