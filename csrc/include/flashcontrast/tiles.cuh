// The tile engine: device-side building blocks shared by every objective's kernels.
//
//   Operands<T>       A (n_a, d) and B (n_b, d) with element strides, scale/bias pointers.
//   load_tile         global (any strides) -> shared memory tile, zero outside the matrix.
//   TileAcc<T, M, N>  an M x N fp32 accumulator owned by a CTA of kThreads threads:
//                       mma<K, A_ROW, B_ROW>(a, lda, b, ldb)  C += A (M x K) @ B (K x N),
//                       operands in shared memory, either layout;
//                       store(c, ldc)                          C -> shared memory (fp32);
//                       for_each(stage, f)                     f(row, col, value) once per
//                                                              element, e.g. atomics/RMW.
//                     T = __half / __nv_bfloat16: tensor cores via nvcuda::wmma 16x16x16,
//                     fp32 accumulators, 4 warps as 2 x 2. T = float: SIMT FFMA register
//                     tiles (IEEE fp32 products, no TF32: TF32 would change numerics).
//   LSE helpers       online (max, sum) merging, safe against -inf maxima.
//   TileSmem<T, X>    the shared-memory layout every 64 x 64 sweep uses (A / B chunks, the
//                     fp32 X tile, the T coefficient tile P), then X bytes of its own;
//                     TileViews<T, X> their typed pointers.
//   tile_logits       X = A_rb B_cb^T over the D chunks into shared memory (fp32).
//   Host side         dispatch_dtype (DType -> T), sweep_grid / sweep_split (the plan).
//
// Requires sm_80+ (bf16 WMMA); every default build target is sm_80 or newer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "flashcontrast/dtype.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "flashcontrast kernels need sm_80 or newer (bf16 tensor cores)"
#endif

namespace flashcontrast {
namespace tiles {

constexpr int kThreads = 128;  // every tile-engine CTA: 4 warps
constexpr int kTileM = 64;     // rows of A per tile
constexpr int kTileN = 64;     // rows of B (columns of S) per tile
constexpr int kTileK = 32;     // D chunk

constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// ----------------------------------------------------------------------------- operands

template <typename T>
struct Operands {
  const T* a;  // (n_a, d): element (i, k) at a[i * a_stride0 + k * a_stride1]
  const T* b;  // (n_b, d)
  int64_t n_a, n_b, d;
  int64_t a_stride0, a_stride1, b_stride0, b_stride1;
  const float* scale;  // device scalar
  const float* bias;   // device scalar or nullptr
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
constexpr bool kUsesWmma = !std::is_same<T, float>::value;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Copies the ROWS x COLS tile at (row0, col0) of a strided matrix with `rows` x `cols`
// elements into smem (row-major, leading dimension ld), zero outside the matrix, so that
// padded rows/columns and the tail of D contribute nothing to products. Consecutive
// threads walk the unit-stride axis of the source (coalesced for row- or column-major).
// No barrier: the caller synchronizes.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* smem, int ld, const T* g, int64_t stride0,
                                          int64_t stride1, int64_t row0, int64_t rows,
                                          int64_t col0, int64_t cols) {
  const bool rows_fast = stride0 == 1 && stride1 != 1;
  const T zero = from_float<T>(0.0f);
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int r = rows_fast ? idx % ROWS : idx / COLS;
    const int c = rows_fast ? idx / ROWS : idx % COLS;
    const int64_t gr = row0 + r, gc = col0 + c;
    smem[r * ld + c] = (gr < rows && gc < cols) ? g[gr * stride0 + gc * stride1] : zero;
  }
}

// Operand producer: as load_tile, times a per-column vector, smem[r][c] = g(r, c) * v(c)
// (the product formed in fp32, rounded once to T). v(c) = v[(col0 + c) * v_stride], zero
// outside. Symile "n_squared" builds its A tile x_rb * y_j this way.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile_hadamard(T* smem, int ld, const T* g, int64_t stride0,
                                                   int64_t stride1, int64_t row0, int64_t rows,
                                                   int64_t col0, int64_t cols, const T* v,
                                                   int64_t v_stride) {
  const bool rows_fast = stride0 == 1 && stride1 != 1;
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int r = rows_fast ? idx % ROWS : idx / COLS;
    const int c = rows_fast ? idx / ROWS : idx % COLS;
    const int64_t gr = row0 + r, gc = col0 + c;
    const float x = (gr < rows && gc < cols)
                        ? to_float(g[gr * stride0 + gc * stride1]) * to_float(v[gc * v_stride])
                        : 0.0f;
    smem[r * ld + c] = from_float<T>(x);
  }
}

// ----------------------------------------------------------------------------- products
// Operand addressing, both paths: A_ROW: A(m, k) = a[m * lda + k], else a[k * lda + m];
// B_ROW: B(k, n) = b[k * ldb + n], else b[n * ldb + k].

// SIMT: thread (tx, ty) = (tid % 16, tid / 16) owns rows ty + 8i and columns tx + 16j.
template <int M, int N>
struct SimtAcc {
  static_assert(M % 8 == 0 && N % 16 == 0, "SIMT tile: M % 8 == 0, N % 16 == 0");
  static constexpr int TM = M / 8, TN = N / 16;
  float c[TM][TN];

  __device__ __forceinline__ static int row(int i) { return threadIdx.x / 16 + 8 * i; }
  __device__ __forceinline__ static int col(int j) { return threadIdx.x % 16 + 16 * j; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) c[i][j] = 0.0f;
  }

  template <int K, bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void mma(const float* a, int lda, const float* b, int ldb) {
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = A_ROW ? a[row(i) * lda + k] : a[k * lda + row(i)];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = B_ROW ? b[k * ldb + col(j)] : b[col(j) * ldb + k];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) c[i][j] = fmaf(av[i], bv[j], c[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* out, int ld) const {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) out[row(i) * ld + col(j)] = c[i][j];
  }

  // Straight from registers: no staging, no barrier.
  template <typename F>
  __device__ __forceinline__ void for_each(float* /*stage*/, int /*ld*/, F&& f) const {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) f(row(i), col(j), c[i][j]);
  }
};

// WMMA: warp w computes the (M/2) x (N/2) block (w / 2, w % 2) as 16 x 16 fragments.
// Shared-memory operands: 32-byte aligned fragment origins, ld a multiple of 8 elements
// (16-bit) and, for store(), of 4 floats.
template <typename T, int M, int N>
struct WmmaAcc {
  static_assert(M % 32 == 0 && N % 32 == 0, "WMMA tile: M, N multiples of 32");
  static constexpr int WM = M / 2, WN = N / 2, FM = WM / 16, FN = WN / 16;
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Frag c[FM][FN];

  __device__ __forceinline__ static int warp_row() { return (threadIdx.x / 32) / 2 * WM; }
  __device__ __forceinline__ static int warp_col() { return (threadIdx.x / 32) % 2 * WN; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(c[i][j], 0.0f);
  }

  template <int K, bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void mma(const T* a, int lda, const T* b, int ldb) {
    namespace w = nvcuda::wmma;
    static_assert(K % 16 == 0, "WMMA: K % 16 == 0");
    using LA = typename std::conditional<A_ROW, w::row_major, w::col_major>::type;
    using LB = typename std::conditional<B_ROW, w::row_major, w::col_major>::type;
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, T, LA> fa[FM];
      w::fragment<w::matrix_b, 16, 16, 16, T, LB> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int r0 = warp_row() + 16 * i;
        w::load_matrix_sync(fa[i], A_ROW ? a + r0 * lda + k0 : a + k0 * lda + r0, lda);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int c0 = warp_col() + 16 * j;
        w::load_matrix_sync(fb[j], B_ROW ? b + k0 * ldb + c0 : b + c0 * ldb + k0, ldb);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) w::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* out, int ld) const {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        nvcuda::wmma::store_matrix_sync(out + (warp_row() + 16 * i) * ld + warp_col() + 16 * j,
                                        c[i][j], ld, nvcuda::wmma::mem_row_major);
  }

  // Fragment element ownership is opaque: round-trip through `stage` (M x ld floats, not
  // otherwise in use). Contains barriers: every thread of the CTA must call it.
  template <typename F>
  __device__ __forceinline__ void for_each(float* stage, int ld, F&& f) const {
    store(stage, ld);
    __syncthreads();
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int r = idx / N, cc = idx % N;
      f(r, cc, stage[r * ld + cc]);
    }
    __syncthreads();
  }
};

template <typename T, int M, int N>
using TileAcc =
    typename std::conditional<kUsesWmma<T>, WmmaAcc<T, M, N>, SimtAcc<M, N>>::type;

// ----------------------------------------------------------------------------- reductions

// An online logsumexp state: value = m + log(l). Empty: (-inf, 0).
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.0f : m; }

// (m, l) <- (m, l) (+) (m2, l2), exact for empty states on either side (no inf - inf).
__device__ __forceinline__ void lse_merge(float& m, float& l, float m2, float l2) {
  const float mn = fmaxf(m, m2);
  const float mu = finite_or_zero(mn);
  l = l * expf(m - mu) + l2 * expf(m2 - mu);
  m = mn;
}

// Sum over the CTA; the result is valid in thread 0. `scratch`: kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // scratch may be in use by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// Max over the CTA, returned to every thread. `scratch`: kThreads / 32 floats. Barriers.
__device__ __forceinline__ float block_max_all(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// Stable elementwise functions (the pair engine's "sigmoid" epilogue, SigLIP): finite and
// exact to a few ulps for any t.
// softplus(t) = log(1 + e^t) = max(t, 0) + log1p(e^-|t|).
__device__ __forceinline__ float softplus_stable(float t) {
  return fmaxf(t, 0.0f) + log1pf(expf(-fabsf(t)));
}
// sigmoid(t) = 1 / (1 + e^-t), never forming e^{+|t|}.
__device__ __forceinline__ float sigmoid_stable(float t) {
  const float e = expf(-fabsf(t));
  return t >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// Coefficient tiles for the 16-bit products are normalized per tile: the CTA rounds
// c / cmax (|.| <= 1) to T and multiplies the fp32 products back by cmax, so that small
// softmax weights (1/N, 1/N^2) and large upstream gradients keep fp16's mantissa instead of
// falling into its subnormals. Returns the factor to multiply by; inv is its reciprocal.
__device__ __forceinline__ float tile_norm(float cmax, float& inv) {
  const bool ok = cmax > 1e-30f && cmax < 1e30f;
  inv = ok ? 1.0f / cmax : 1.0f;
  return ok ? cmax : 1.0f;
}

// ----------------------------------------------------------------------------- layout

// Shared memory of a 64 x 64 sweep, then kExtra bytes at kExtraOff (128-aligned) for the
// kernel's own tables. 16-bit types pad rows to keep WMMA's alignment (ld % 8 == 0
// elements, fp32 ld % 4 == 0); fp32 pads by one word against bank conflicts. P (the
// backward's coefficient tile) is a separate T tile for WMMA and overwrites X in place
// for fp32, where X is then dead and the SIMT for_each needs no staging.
template <typename T, int kExtra = 0>
struct TileSmem {
  static constexpr bool kWmma = kUsesWmma<T>;
  static constexpr int kLdK = kWmma ? kTileK + 8 : kTileK + 1;  // A / B chunks, T
  static constexpr int kLdX = kWmma ? kTileN + 4 : kTileN + 1;  // X tile, fp32
  static constexpr int kLdP = kWmma ? kTileN + 8 : kLdX;        // P tile, T
  static constexpr int kA = 0;
  static constexpr int kB = kA + align128(kTileM * kLdK * int(sizeof(T)));
  static constexpr int kX = kB + align128(kTileN * kLdK * int(sizeof(T)));
  static constexpr int kP = kWmma ? kX + align128(kTileM * kLdX * 4) : kX;
  static constexpr int kExtraOff = kP + (kWmma ? align128(kTileM * kLdP * int(sizeof(T)))
                                               : align128(kTileM * kLdX * 4));
  static constexpr int kBytes = kExtraOff + align128(kExtra);
  static_assert(kBytes <= 48 * 1024, "static shared memory above 48 KiB");
};

// Typed pointers to the regions of the TileSmem<T, kExtra> block at `smem` (the kernel's
// kBytes, 128-aligned).
template <typename T, int kExtra = 0>
struct TileViews {
  using L = TileSmem<T, kExtra>;
  T* As;                 // A chunk, kTileM x kLdK
  T* Bs;                 // B chunk, kTileN x kLdK
  float* Xs;             // X tile (fp32), kTileM x kLdX
  T* Ps;                 // P tile, kTileM x kLdP: Xs itself for fp32
  unsigned char* extra;  // the kernel's kExtra bytes

  __device__ __forceinline__ explicit TileViews(unsigned char* smem)
      : As(reinterpret_cast<T*>(smem + L::kA)),
        Bs(reinterpret_cast<T*>(smem + L::kB)),
        Xs(reinterpret_cast<float*>(smem + L::kX)),
        Ps(reinterpret_cast<T*>(smem + L::kP)),
        extra(smem + L::kExtraOff) {}
};

// X = A[row0 : row0+64] @ B[col0 : col0+64]^T into Xs (fp32, ld TileSmem<T>::kLdX); ends
// with a barrier. Starts with one too, so the caller may still be reading As/Bs/Xs of the
// previous tile, and whatever the caller wrote to shared memory before it is published.
// The accumulation order depends on the tile and D only: a backward that recomputes the
// tile gets the forward's X bit for bit.
template <typename T>
__device__ __forceinline__ void tile_logits(const Operands<T>& p, int64_t row0, int64_t col0,
                                            T* As, T* Bs, float* Xs) {
  using L = TileSmem<T>;
  TileAcc<T, kTileM, kTileN> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < p.d; k0 += kTileK) {
    __syncthreads();
    load_tile<T, kTileM, kTileK>(As, L::kLdK, p.a, p.a_stride0, p.a_stride1, row0, p.n_a, k0,
                                 p.d);
    load_tile<T, kTileN, kTileK>(Bs, L::kLdK, p.b, p.b_stride0, p.b_stride1, col0, p.n_b, k0,
                                 p.d);
    __syncthreads();
    acc.template mma<kTileK, true, false>(As, L::kLdK, Bs, L::kLdK);
  }
  acc.store(Xs, L::kLdX);
  __syncthreads();
}

// ----------------------------------------------------------------------------- host side

// f(static_cast<T*>(nullptr)) for the T of `dtype`: launchers are written once, as a
// generic lambda over the tag's pointee type.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(static_cast<float*>(nullptr));
    case DType::kFloat16:
      return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
  }
}

__host__ __device__ constexpr int64_t blocks_of(int64_t count, int64_t block) {
  return (count + block - 1) / block;
}

// The forward's (G, H) grid: program (g, h) owns row blocks g, g + G, ... and column blocks
// h, h + H, ...; about 2 CTAs per SM: G = min(row blocks, 2 SMs), H = min(column blocks,
// max(1, 2 SMs / G)). Every g has a row block and every h a column block.
struct SweepGrid {
  int g, h;
};

inline SweepGrid sweep_grid(int64_t row_blocks, int64_t col_blocks, int sms) {
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t g = std::max<int64_t>(1, std::min(row_blocks, target));
  const int64_t h = std::max<int64_t>(1, std::min(col_blocks, std::max<int64_t>(1, target / g)));
  return {int(g), int(h)};
}

// The backward's row split: grid (column blocks, SPLIT), program (cb, sp) visits the row
// blocks rb = sp (mod SPLIT); SPLIT = max(1, min(row blocks, ceil(2 SMs / column blocks),
// max_split)), so that narrow sweeps (few column blocks) still fill the machine.
inline int sweep_split(int64_t row_blocks, int64_t col_blocks, int sms, int64_t max_split) {
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t want = blocks_of(target, std::max<int64_t>(col_blocks, 1));
  return int(std::max<int64_t>(1, std::min({row_blocks, want, max_split})));
}

}  // namespace tiles
}  // namespace flashcontrast
