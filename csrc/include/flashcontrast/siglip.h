// SigLIP (shared/objectives.md section 2): host launch declarations. Torch- and CUDA-free,
// conventions as clip.h (device pointers, element strides, `stream` a cudaStream_t, no host
// synchronization, std::invalid_argument / flashcontrast::CudaError). in.groups is ignored.
#pragma once

#include <cstdint>

#include "flashcontrast/clip.h"  // DType, PairInputs

namespace flashcontrast {

// G * H, the (G, H) grid of clip_forward (G = min(ceil(n/64), 2 * SMs), H as clip.h).
int64_t siglip_forward_workspace_elems(int64_t n, int64_t d, int device);

// total = sum_ij softplus(-z_ij S_ij), S = scale * A B^T + bias, z_ij = +1 on the diagonal
// and -1 elsewhere: one fp32 device scalar (the loss is total / n, formed above). One
// partial per program, summed by one CTA in a fixed order: deterministic.
void siglip_forward(const PairInputs& in, float* total, float* workspace,
                    int64_t workspace_elems, void* stream);

// (1 + SPLIT) * n * d + 2 * ceil(n/64) * SPLIT, SPLIT as clip_backward_workspace_elems.
int64_t siglip_backward_workspace_elems(int64_t n, int64_t d, int device);

// For L = total / n with upstream scalar `grad` (device fp32), dS = (grad / n)
// (sigmoid(S) - [i == j]): da = scale dS B, db = scale dS^T A, contiguous (n, d) in the
// input dtype; dscale = sum dS (A B^T), dbias = sum dS, fp32 device scalars. The workspace
// is zeroed on the stream.
void siglip_backward(const PairInputs& in, const float* grad, void* da, void* db,
                     float* dscale, float* dbias, float* workspace, int64_t workspace_elems,
                     void* stream);

}  // namespace flashcontrast
