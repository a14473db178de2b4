// The pair engine (python/flashcontrast/backends/pair.py is the contract): host launch
// declarations. Torch- and CUDA-free, so bindings.cpp (plain C++) includes it. Pointers are
// device pointers, strides in elements, `stream` a cudaStream_t (nullptr: legacy default).
// Every function validates every field first (std::invalid_argument naming it, e.g.
// "PairParams.a is null") and throws flashcontrast::CudaError for CUDA failures. None
// synchronizes with the host.
//
// One sweep: rows a (n, d) against columns b (m, d), S_ij = scale <a_i, b_j> + bias in fp32,
// global row row_offset + i, global column col_offset + j, sample(k) = k mod period
// (period 0: k). Entry sets per tile from these integers and the group ids:
//   excluded  exclude_self and global row == global column: in no statistic;
//   masked    row_groups[i] == col_groups[j] and sample(i) != sample(j): in no statistic;
//   positive  positives and sample(i) == sample(j), not excluded; every other allowed
//             entry is a negative; positives are in the full statistics too.
#pragma once

#include <cstdint>
#include <string>

#include "flashcontrast/dtype.h"

namespace flashcontrast {

enum class Epilogue { kSoftmax, kRows, kSigmoid };

// "softmax" | "rows" | "sigmoid"; else invalid_argument naming `field`.
Epilogue parse_epilogue(const std::string& name, const char* field = "epilogue");
const char* epilogue_name(Epilogue e);

// The inputs and static options of one sweep.
struct PairParams {
  const void* a = nullptr;  // (n, d): element (i, k) at a[i * a_stride0 + k * a_stride1]
  const void* b = nullptr;  // (m, d); may be a (a self-similarity)
  int64_t n = 0, m = 0, d = 0;
  int64_t a_stride0 = 0, a_stride1 = 0, b_stride0 = 0, b_stride1 = 0;
  DType dtype = DType::kFloat32;  // of a and b
  const float* scale = nullptr;   // device scalar, required
  const float* bias = nullptr;    // device scalar or nullptr
  Epilogue epilogue = Epilogue::kSoftmax;
  bool positives = true;
  bool exclude_self = false;
  int64_t period = 0;
  int64_t row_offset = 0, col_offset = 0;
  const int64_t* row_groups = nullptr;  // (n,) and (m,) int64 ids, both or neither
  const int64_t* col_groups = nullptr;
  // (n,) fp32: row i's positive logit instead of S ("rows" epilogue with positives only).
  const float* positive_logits = nullptr;
  // (n, m) fp32, contiguous: X = a b^T as a GEMM wrote it (the panel path,
  // backends/cuda_panel.py): the kernels read X instead of multiplying a and b (which are
  // then only checked, never read).
  const float* x = nullptr;
};

// The statistics, fp32 (max, sum exp(S - max)) pairs; -inf / 0 for an empty set. The
// forward writes those its epilogue has and requires the others to be null: rows (n,)
// always but "sigmoid", pos_* (n,) with positives, col_* (m,) with "softmax", cpos_* (m,)
// with "softmax" and positives (column pairs PARTIAL over this sweep's rows), total (0-d)
// with "sigmoid". The backward reads the merged ones its coefficients need.
struct PairStats {
  float* row_max = nullptr;
  float* row_sum = nullptr;
  float* pos_max = nullptr;
  float* pos_sum = nullptr;
  float* col_max = nullptr;
  float* col_sum = nullptr;
  float* cpos_max = nullptr;
  float* cpos_sum = nullptr;
  float* total = nullptr;
};

// The backward's coefficients, fp32: rows / pos_rows (n,), cols / pos_cols (m,) (nullptr:
// 0; "softmax" / "rows"; cols and pos_cols "softmax" only, pos_* with positives only);
// total (device scalar) with "sigmoid", required there.
struct PairCoefs {
  const float* rows = nullptr;
  const float* pos_rows = nullptr;
  const float* cols = nullptr;
  const float* pos_cols = nullptr;
  const float* total = nullptr;
};

// The backward's outputs: da (n, d) and db (m, d) contiguous in out_dtype (the inputs'
// dtype or float32), dscale and dbias fp32 device scalars, dpos (n,) fp32 exactly when
// PairParams.positive_logits is set.
struct PairGrads {
  void* da = nullptr;
  void* db = nullptr;
  float* dscale = nullptr;
  float* dbias = nullptr;
  float* dpos = nullptr;
  DType out_dtype = DType::kFloat32;
  // The panel path: (n, m) contiguous in the inputs' dtype, dS / ds_unit written there
  // (0 off the allowed entries) instead of da and db, which are then not written (may be
  // null); ds_unit a device scalar (nullptr: 1), fp16's max |coefficient|.
  void* ds = nullptr;
  const float* ds_unit = nullptr;
};

// fp32 elements of the forward workspace on `device` (its SM count sets the grid): with
// the (G, H) grid of tiles.cuh's sweep_grid over ceil(n/64) x ceil(m/64) tiles,
// 2 R H n + 2 C G m for "softmax" / "rows" (R = 1 + positives pairs per row, C the same per
// column for "softmax", 0 for "rows"), G H for "sigmoid".
int64_t pair_forward_workspace_elems(const PairParams& p, int device);

void pair_forward(const PairParams& p, const PairStats& stats, float* workspace,
                  int64_t workspace_elems, void* stream);

// fp32 elements of the backward workspace on `device`: n d + SPLIT m d + 2 ceil(m/64) SPLIT
// with SPLIT from tiles.cuh's sweep_split (at most 4, or ceil(4 n / m) for narrow b); with
// PairParams.x (the panel path, which then needs PairGrads.ds) 2 ceil(m/64) SPLIT only.
int64_t pair_backward_workspace_elems(const PairParams& p, int device);

// dS_ij = gr_i P_ij - gpr_i Q_ij + gc_j Pc_ij - gpc_j Qc_ij (softmax / rows), or
// g (sigmoid(S_ij) - [ij positive]) (sigmoid), on the allowed entries; P = exp((S - max) -
// log sum) from the merged pairs (0 for an empty set), Q over the positives, Pc / Qc the
// column ones. da = scale dS b, db = scale dS^T a, dscale = sum dS <a_i, b_j>, dbias =
// sum dS; with positive_logits, dpos_i = sum_j over row i's positives of dS_ij, which then
// add nothing to da, db, dscale, dbias. The workspace is zeroed on the stream.
void pair_backward(const PairParams& p, const PairStats& stats, const PairCoefs& coefs,
                   const PairGrads& grads, float* workspace, int64_t workspace_elems,
                   void* stream);

}  // namespace flashcontrast
