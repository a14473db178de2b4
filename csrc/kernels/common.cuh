// Small kernels and host checks that the pair engine (pair_impl.cuh), GRAM (gram.cu) and
// Symile n_squared (symile.cu) share: the per-program partial sums and the workspace
// finalize of their backwards, the 1-D grid of those, the null-pointer, row-count, stride
// and workspace-size checks. Everything
// here has internal linkage (an unnamed namespace): each translation unit that includes
// this file has its own copy, as with pair_impl.cuh. A kernel file, not a header of
// include/, so that the CUDA emulator's rewrites (tests/cuda_emulator) reach its shared
// arrays.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "flashcontrast/tiles.cuh"

namespace flashcontrast {
namespace {
namespace common {

using namespace tiles;

// *out = sum of `count` partials (and *out2 = sum of the next `count` when out2 is set):
// one CTA of kThreads, fixed order, so deterministic run to run.
__global__ void __launch_bounds__(kThreads)
    sum_kernel(const float* __restrict__ partials, int count, float* __restrict__ out,
               float* __restrict__ out2) {
  __shared__ float red[kThreads / 32];
  float a = 0.0f, b = 0.0f;
  for (int i = threadIdx.x; i < count; i += kThreads) {
    a += partials[i];
    if (out2 != nullptr) b += partials[count + i];
  }
  a = block_sum(a, red);
  if (threadIdx.x == 0) *out = a;
  if (out2 != nullptr) {
    b = block_sum(b, red);
    if (threadIdx.x == 0) *out2 = b;
  }
}

// out[i] = Tout(scale * sum_{k < slices} ws[k * count + i]) for i < count: fp32 workspace
// slices (count elements each) summed, scaled by the device scalar and converted to the
// output dtype. Grid-stride: any 1-D grid (grid_1d).
template <typename Tout>
__global__ void finalize_kernel(const float* __restrict__ ws, int slices, int64_t count,
                                const float* __restrict__ scale, Tout* __restrict__ out) {
  const float s = *scale;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    float acc = 0.0f;
    for (int k = 0; k < slices; ++k) acc += ws[int64_t(k) * count + i];
    out[i] = from_float<Tout>(s * acc);
  }
}

// Blocks of 256 threads for a grid-stride kernel over `elems` elements: one per 256, at
// least 1, at most 8192.
inline unsigned grid_1d(int64_t elems) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(blocks_of(elems, 256), 8192)));
}

// std::invalid_argument "<field> is null" for a null pointer.
inline void require(const void* ptr, const char* field) {
  if (ptr == nullptr) throw std::invalid_argument(std::string(field) + " is null");
}

// require() for each (pointer, field) of the list, in order: the first null one is named.
inline void require_all(std::initializer_list<std::pair<const void*, const char*>> fields) {
  for (const auto& f : fields) require(f.first, f.second);
}

// std::invalid_argument "<prefix><name> must be >= 0, got <stride>" for the first negative
// element stride of the (stride, name) list; prefix names the struct ("GramParams.").
inline void check_strides(const char* prefix,
                          std::initializer_list<std::pair<int64_t, const char*>> strides) {
  for (const auto& s : strides) {
    if (s.first < 0) {
      throw std::invalid_argument(std::string(prefix) + s.second + " must be >= 0, got " +
                                  std::to_string(s.first));
    }
  }
}

// std::invalid_argument "<field> must be >= 1" / "must be < 2^31 - 64" for a row count
// (the 64-row blocks of a grid dimension are counted in int).
inline void require_count(int64_t v, const char* field) {
  if (v < 1) {
    throw std::invalid_argument(std::string(field) + " must be >= 1, got " + std::to_string(v));
  }
  if (v > (int64_t(1) << 31) - kTileM) {
    throw std::invalid_argument(std::string(field) + " must be < 2^31 - 64, got " +
                                std::to_string(v));
  }
}

// std::invalid_argument unless the caller's workspace (have floats) holds `need`.
inline void check_workspace(int64_t have, int64_t need) {
  if (have < need) {
    throw std::invalid_argument("workspace has " + std::to_string(have) + " floats, needs " +
                                std::to_string(need));
  }
}

}  // namespace common
}  // namespace
}  // namespace flashcontrast
