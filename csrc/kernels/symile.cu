// Symile "n_squared" (docs/objectives.md section 5) on the tile engine (tiles.cuh): 64 x 64
// tiles, D in chunks of 32, 128 threads, fp32 accumulation (WMMA for fp16/bf16, SIMT FFMA
// for fp32). Symile "n" runs on the pair engine (pair.cu).
//
// symile_n2 (M = 3, "n_squared"): rows x (n, D) against the m^2 pairs (j, k) of y, z (m, D)
//   (m = n in one process). X^(j)_ik = sum_d (x_id y_jd) z_kd, one 64 x 64 tile per
//   (row block rb of x, j, column block kb of z); the operand producer load_tile_hadamard
//   forms the A chunk x_rb * y_j in shared memory, the rest is the tile engine's product
//   against z_kb.
//   forward  grid (row blocks of x, H): program (rb, h) sweeps j = h, h+H, ... < m and every
//            kb, online row LSE over all (j, k), partial (max, sum) to ws[h], merged by
//            rows_combine_kernel.
//   backward grid (column blocks of z, S): program (kb, sp) sweeps j = sp, sp+S, ... < m and
//            every rb.
//            C_ik = g_i exp(s X_ik - lse_i). Per D chunk, E = C @ z_kb and F = C^T @ (x * y_j):
//              dx_i += y_j * E_i          (since dx_i = s sum_jk c_ijk y_j * z_k)
//              dy_j += sum_i x_i * E_i    (dy_j = s sum_ik c_ijk x_i * z_k; CTA column sum)
//              dz_k += F_k                (dz_k = s sum_ij c_ijk x_i * y_j)
//            all fp32 atomics into (n, d) / (m, d) workspaces (order varies run to run);
//            dscale partials sum C * X. 3 tile products per (rb, j, kb): n m^2 D work,
//            O((n + m) D) memory.
// 16-bit products use per-tile normalized coefficients (tiles::tile_norm).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "flashcontrast/cuda_check.h"
#include "flashcontrast/symile.h"
#include "flashcontrast/tiles.cuh"
#include "common.cuh"

namespace flashcontrast {
namespace symile_impl {

using namespace tiles;
using namespace common;

constexpr int kBM = kTileM;
constexpr int kBN = kTileN;
constexpr int kBK = kTileK;

// The tile engine's layout (TileSmem: A/B chunks (T), X (fp32), P (T; in place over X for
// fp32)), then 3 * 64 + 64 floats of small scratch (Views::extra).
constexpr int kSmallBytes = 4 * 64 * 4;
template <typename T>
using Smem = TileSmem<T, kSmallBytes>;
template <typename T>
using Views = TileViews<T, kSmallBytes>;

// The A chunk: x * y_j, rows of x times the row y_j (element e at v[e * v_stride]).
template <typename T>
struct AOperand {
  const T* a;
  int64_t s0, s1;
  const T* v;
  int64_t v_stride;
};

template <typename T>
__device__ __forceinline__ void load_a(const AOperand<T>& op, T* As, int64_t row0, int64_t n,
                                       int64_t k0, int64_t d) {
  load_tile_hadamard<T, kBM, kBK>(As, Smem<T>::kLdK, op.a, op.s0, op.s1, row0, n, k0, d, op.v,
                                  op.v_stride);
}

// X = A_op[row0:+64] @ B[col0:+64]^T into Xs, A_op having n rows and B m; barriers at both
// ends (as tiles.cuh's tile_logits).
template <typename T>
__device__ __forceinline__ void tile_product(const AOperand<T>& op, const T* b, int64_t b_s0,
                                             int64_t b_s1, int64_t n, int64_t m, int64_t d,
                                             int64_t row0, int64_t col0, T* As, T* Bs,
                                             float* Xs) {
  using L = Smem<T>;
  TileAcc<T, kBM, kBN> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < d; k0 += kBK) {
    __syncthreads();
    load_a<T>(op, As, row0, n, k0, d);
    load_tile<T, kBN, kBK>(Bs, L::kLdK, b, b_s0, b_s1, col0, m, k0, d);
    __syncthreads();
    acc.template mma<kBK, true, false>(As, L::kLdK, Bs, L::kLdK);
  }
  acc.store(Xs, L::kLdX);
  __syncthreads();
}

// Row pass over the tile in Xs: (max, sum exp) of logit(i, c) over c < ncols, merged into
// (m, l). Two threads per row (rr = tid / 2); the pair's result is in both threads.
template <typename T, typename F>
__device__ __forceinline__ void row_pass(const float* Xs, int ncols, float& m, float& l,
                                         F&& logit) {
  const int rr = threadIdx.x / 2, rh = threadIdx.x % 2;
  float tm = -INFINITY;
  for (int c = rh; c < ncols; c += 2) tm = fmaxf(tm, logit(rr, c, Xs[rr * Smem<T>::kLdX + c]));
  tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
  const float tmu = finite_or_zero(tm);
  float tl = 0.0f;
  for (int c = rh; c < ncols; c += 2) tl += expf(logit(rr, c, Xs[rr * Smem<T>::kLdX + c]) - tmu);
  tl += __shfl_xor_sync(0xffffffffu, tl, 1);
  lse_merge(m, l, tm, tl);
}

// row_lse[i] = LSE over the H partials ws[h][i].
__global__ void rows_combine_kernel(const float* __restrict__ ws_m,
                                    const float* __restrict__ ws_l, int64_t n, int H,
                                    float* __restrict__ row_lse) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float m = -INFINITY, l = 0.0f;
  for (int h = 0; h < H; ++h) lse_merge(m, l, ws_m[int64_t(h) * n + i], ws_l[int64_t(h) * n + i]);
  row_lse[i] = m + logf(l);
}

// ----------------------------------------------------------------------------- symile_n2

// x (n, d); y, z (m, d).
template <typename T>
struct TripleParams {
  const T *x, *y, *z;
  int64_t n, m, d;
  int64_t xs0, xs1, ys0, ys1, zs0, zs1;
  const float* scale;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    symile_n2_fwd_kernel(TripleParams<T> p, float* __restrict__ ws_m, float* __restrict__ ws_l) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const Views<T> sm(smem);
  const int rb = blockIdx.x, h = blockIdx.y, H = gridDim.y;
  const int64_t n = p.n, m = p.m, row0 = int64_t(rb) * kBM;
  const int num_kb = int((m + kBN - 1) / kBN);
  const float scale = *p.scale;
  float run_m = -INFINITY, run_l = 0.0f;
  for (int64_t j = h; j < m; j += H) {
    const AOperand<T> op{p.x, p.xs0, p.xs1, p.y + j * p.ys0, p.ys1};
    for (int kb = 0; kb < num_kb; ++kb) {
      const int64_t col0 = int64_t(kb) * kBN;
      tile_product<T>(op, p.z, p.zs0, p.zs1, n, m, p.d, row0, col0, sm.As, sm.Bs, sm.Xs);
      const int ncols = int(std::min<int64_t>(kBN, m - col0));
      row_pass<T>(sm.Xs, ncols, run_m, run_l, [&](int, int, float x) { return scale * x; });
    }
  }
  const int64_t gi = row0 + threadIdx.x / 2;
  if (threadIdx.x % 2 == 0 && gi < n) {
    ws_m[int64_t(h) * n + gi] = run_m;
    ws_l[int64_t(h) * n + gi] = run_l;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    symile_n2_bwd_kernel(TripleParams<T> p, const float* __restrict__ row_lse,
                         const float* __restrict__ grad_rows, float* __restrict__ dx_ws,
                         float* __restrict__ dy_ws, float* __restrict__ dz_ws,
                         float* __restrict__ partials) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const Views<T> sm(smem);
  float* lse_r = reinterpret_cast<float*>(sm.extra);
  float* g_r = lse_r + kBM;
  float* dy_red = g_r + kBM;  // kBK floats
  float* red = dy_red + kBK;

  const int kb = blockIdx.x, sp = blockIdx.y, S = gridDim.y;
  const int64_t n = p.n, m = p.m, d = p.d;
  const int num_rb = int((n + kBM - 1) / kBM);
  const float scale = *p.scale;
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(kb) * kBN;
  float ds_acc = 0.0f;

  for (int64_t j = sp; j < m; j += S) {
    const T* yj = p.y + j * p.ys0;
    const AOperand<T> op{p.x, p.xs0, p.xs1, yj, p.ys1};
    for (int rb = 0; rb < num_rb; ++rb) {
      const int64_t row0 = int64_t(rb) * kBM;
      if (tid < kBM) {
        const bool ok = row0 + tid < n;
        lse_r[tid] = ok ? row_lse[row0 + tid] : 0.0f;
        g_r[tid] = ok ? grad_rows[row0 + tid] : 0.0f;
      }
      tile_product<T>(op, p.z, p.zs0, p.zs1, n, m, d, row0, col0, sm.As, sm.Bs, sm.Xs);

      float amax = 0.0f;
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, k = idx % kBN;
        const float x = sm.Xs[i * L::kLdX + k];
        float c = 0.0f;
        if (row0 + i < n && col0 + k < m) {
          c = g_r[i] * expf(scale * x - lse_r[i]);
          ds_acc = fmaf(c, x, ds_acc);
          amax = fmaxf(amax, fabsf(c));
        }
        sm.Xs[i * L::kLdX + k] = c;
      }
      float inv;
      const float mult = tile_norm(block_max_all(amax, red), inv);
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, k = idx % kBN;
        sm.Ps[i * L::kLdP + k] = from_float<T>(sm.Xs[i * L::kLdX + k] * inv);
      }

      for (int64_t k0 = 0; k0 < d; k0 += kBK) {
        __syncthreads();  // P complete; previous chunk's readers of As/Bs/dy_red done
        load_a<T>(op, sm.As, row0, n, k0, d);
        load_tile<T, kBN, kBK>(sm.Bs, L::kLdK, p.z, p.zs0, p.zs1, col0, m, k0, d);
        if (tid < kBK) dy_red[tid] = 0.0f;
        __syncthreads();
        TileAcc<T, kBM, kBK> acc_e;  // E = P @ z chunk
        acc_e.zero();
        acc_e.template mma<kBN, true, true>(sm.Ps, L::kLdP, sm.Bs, L::kLdK);
        TileAcc<T, kBN, kBK> acc_f;  // F = P^T @ (x * y_j) chunk
        acc_f.zero();
        acc_f.template mma<kBM, false, true>(sm.Ps, L::kLdP, sm.As, L::kLdK);
        acc_e.for_each(sm.Xs, L::kLdX, [&](int i, int c, float v) {
          const int64_t gi = row0 + i, gc = k0 + c;
          if (gi < n && gc < d) {
            atomicAdd(dx_ws + gi * d + gc, mult * v * to_float(yj[gc * p.ys1]));
            atomicAdd(dy_red + c, v * to_float(p.x[gi * p.xs0 + gc * p.xs1]));
          }
        });
        acc_f.for_each(sm.Xs, L::kLdX, [&](int k, int c, float v) {
          if (col0 + k < m && k0 + c < d) atomicAdd(dz_ws + (col0 + k) * d + k0 + c, mult * v);
        });
        __syncthreads();  // dy_red complete (SIMT for_each has no barrier)
        if (tid < kBK && k0 + tid < d) atomicAdd(dy_ws + j * d + k0 + tid, mult * dy_red[tid]);
      }
      __syncthreads();  // before the next tile overwrites lse_r / g_r / Ps
    }
  }
  const float total = block_sum(ds_acc, red);
  if (tid == 0) partials[blockIdx.x * S + sp] = total;
}

// ----------------------------------------------------------------------------- launchers

// Programs sharing the rows of one row block: enough for ~4 CTAs per SM in all.
int64_t sweep_split(int64_t n_blocks, int64_t cap, int sms) {
  const int64_t target = 4 * int64_t(std::max(sms, 1));
  return std::max<int64_t>(1, std::min(cap, blocks_of(target, n_blocks)));
}

// m of the call: TripleParams.m, or n where it is negative (the square call).
int64_t cols_of(const TripleInputs& in) { return in.m < 0 ? in.n : in.m; }

void check_triple_sizes(const TripleInputs& in) {
  require_count(in.n, "TripleParams.n");
  if (in.d < 1) {
    throw std::invalid_argument("TripleParams.d must be >= 1, got " + std::to_string(in.d));
  }
  if (in.m >= 0) require_count(in.m, "TripleParams.m");
  check_strides("TripleParams.", {{in.x_stride0, "x_stride0"}, {in.x_stride1, "x_stride1"},
                                   {in.y_stride0, "y_stride0"}, {in.y_stride1, "y_stride1"},
                                   {in.z_stride0, "z_stride0"}, {in.z_stride1, "z_stride1"}});
}

void check_triple(const TripleInputs& in) {
  check_triple_sizes(in);
  require_all({{in.x, "TripleParams.x"}, {in.y, "TripleParams.y"}, {in.z, "TripleParams.z"},
               {in.scale, "TripleParams.scale"}});
}

template <typename T>
TripleParams<T> triple_params(const TripleInputs& in) {
  return TripleParams<T>{static_cast<const T*>(in.x), static_cast<const T*>(in.y),
                         static_cast<const T*>(in.z), in.n, cols_of(in), in.d, in.x_stride0,
                         in.x_stride1, in.y_stride0, in.y_stride1, in.z_stride0, in.z_stride1,
                         in.scale};
}

template <typename T>
void n2_fwd(const TripleInputs& in, float* row_lse, float* ws, int H, cudaStream_t st) {
  const int64_t n = in.n;
  const unsigned num_rb = unsigned(blocks_of(n, kBM));
  symile_n2_fwd_kernel<T><<<dim3(num_rb, H), kThreads, 0, st>>>(triple_params<T>(in), ws,
                                                                ws + int64_t(H) * n);
  detail::check_launch("symile_n2_fwd_kernel");
  rows_combine_kernel<<<unsigned(blocks_of(n, 256)), 256, 0, st>>>(ws, ws + int64_t(H) * n, n, H,
                                                                   row_lse);
  detail::check_launch("rows_combine_kernel");
}

// The backward workspace: dx_ws (n d), dy_ws (m d), dz_ws (m d), then the dscale partials.
template <typename T>
void n2_bwd(const TripleInputs& in, int S, const float* row_lse, const float* grad_rows,
            void* dx, void* dy, void* dz, float* dscale, float* ws, cudaStream_t st) {
  const int64_t nd = in.n * in.d, md = cols_of(in) * in.d;
  const int num_kb = int(blocks_of(cols_of(in), kBN));
  float* dy_ws = ws + nd;
  float* dz_ws = dy_ws + md;
  float* partials = dz_ws + md;
  FC_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * size_t(nd + 2 * md), st));
  symile_n2_bwd_kernel<T><<<dim3(num_kb, S), kThreads, 0, st>>>(
      triple_params<T>(in), row_lse, grad_rows, ws, dy_ws, dz_ws, partials);
  detail::check_launch("symile_n2_bwd_kernel");
  const float* parts[3] = {ws, dy_ws, dz_ws};
  const int64_t counts[3] = {nd, md, md};
  void* outs[3] = {dx, dy, dz};
  for (int o = 0; o < 3; ++o) {
    // float32 for every input dtype: the objective adds the positive's gradient first.
    finalize_kernel<float><<<grid_1d(counts[o]), 256, 0, st>>>(parts[o], 1, counts[o], in.scale,
                                                                static_cast<float*>(outs[o]));
    detail::check_launch("finalize_kernel");
  }
  sum_kernel<<<1, kThreads, 0, st>>>(partials, num_kb * S, dscale, nullptr);
  detail::check_launch("sum_kernel");
}

// H of the forward: programs sharing one row block of x, over the m values of j.
int fwd_split(const TripleInputs& in, int sms) {
  return int(sweep_split(blocks_of(in.n, kBM), cols_of(in), sms));
}

// S of the backward: programs sharing one column block of z, over the m values of j.
int bwd_split(const TripleInputs& in, int sms) {
  const int64_t m = cols_of(in);
  return int(sweep_split(blocks_of(m, kBN), m, sms));
}

int64_t fwd_elems(const TripleInputs& in, int H) { return 2 * int64_t(H) * in.n; }

int64_t bwd_elems(const TripleInputs& in, int S) {
  const int64_t m = cols_of(in);
  return (in.n + 2 * m) * in.d + blocks_of(m, kBN) * S;
}

}  // namespace symile_impl

using namespace symile_impl;

int64_t symile_n2_forward_workspace_elems(const TripleInputs& in, int device) {
  check_triple_sizes(in);
  return fwd_elems(in, fwd_split(in, detail::sm_count(device)));
}

void symile_n2_forward(const TripleInputs& in, float* row_lse, float* workspace,
                       int64_t workspace_elems, void* stream) {
  check_triple(in);
  require(row_lse, "row_lse");
  require(workspace, "workspace");
  const detail::LaunchScope at(in.x, "TripleParams.x", stream);
  const int H = fwd_split(in, at.sms);
  check_workspace(workspace_elems, fwd_elems(in, H));
  dispatch_dtype(in.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    n2_fwd<T>(in, row_lse, workspace, H, at.stream);
  });
}

int64_t symile_n2_backward_workspace_elems(const TripleInputs& in, int device) {
  check_triple_sizes(in);
  return bwd_elems(in, bwd_split(in, detail::sm_count(device)));
}

void symile_n2_backward(const TripleInputs& in, const float* row_lse, const float* grad_rows,
                        void* dx, void* dy, void* dz, float* dscale, float* workspace,
                        int64_t workspace_elems, void* stream) {
  check_triple(in);
  require_all({{row_lse, "row_lse"}, {grad_rows, "grad_rows"}, {dx, "dx"}, {dy, "dy"}, {dz, "dz"},
               {dscale, "dscale"}, {workspace, "workspace"}});
  const detail::LaunchScope at(in.x, "TripleParams.x", stream);
  const int S = bwd_split(in, at.sms);
  check_workspace(workspace_elems, bwd_elems(in, S));
  dispatch_dtype(in.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    n2_bwd<T>(in, S, row_lse, grad_rows, dx, dy, dz, dscale, workspace, at.stream);
  });
}

}  // namespace flashcontrast
