// GRAM (shared/objectives.md section 4) on the tile engine (tiles.cuh).
//
// Tiles of 64 anchor rows x 32 sample columns, D in chunks of 32, 128 threads. Per tile the
// K = M - 1 dot-product tiles U_r = T_rb O^r_cb^T (one TileAcc, K D-sweeps over the same
// anchor rows) go to shared memory as fp32, then the quadratic-form epilogue
//   det_ij = det_h_j |t_i|^2 - u_ij^T adj_h_j u_ij,  L = -s V,
//   V_ij = sqrt(det_ij) where det_ij > |t_i|^2 floor_h_j (the degeneracy floor), else
//          sqrt(det_ij * 0) = 0 (NaN for a NaN det: NaN inputs reach the loss)
// with det_h / adj_h / floor_h per column (loaded once per column block) and |t_i|^2 summed from the
// anchor chunks of the first sweep. K is a runtime loop (1..5); loops over r run to
// kGramMaxK with a guard so small per-element arrays stay in registers. Shared memory grows
// with K (dynamic, up to ~80 KB at K = 5: opted in above 48 KB; fits sm_80..sm_120).
//
// forward  grid (G, H) (forward_plan, as pair.cu's): rows (LSE and sum) in registers, columns in
//          exclusive per-program partials of a 3 (G + H) n workspace, diag L_ii, merged by
//          gram_combine_kernel.
// backward grid (column blocks, SPLIT) (backward_split, as pair.cu's). With c = grad / (2n),
//          dL = c Dh, Dh_ij = P_row + P_col - 2 (1 - eps) [i == j] - 2 eps / n, and
//          W_ij = Dh_ij (-s) / (2 V_ij) above the floor, else 0:
//            a_i      += sum_j W_ij det_h_j                       (row pass, atomics)
//            col_tt_j += c sum_i W_ij |t_i|^2, col_uu_j += c sum_i W_ij u u^T  (atomics)
//            for r: Q^r_ij = W_ij (adj_h_j u_ij)_r, normalized per tile, then per D chunk
//              dA_ws[rb]       += Q^r @ O^r_cb      (fp32 atomics)
//              dO_ws[r][cb]    += Q^r^T @ T_rb      (fp32 atomics)
//            dscale partials sum Dh (-V).
//          finalize: d_anchor = c (2 a_i t_i - 2 dA_ws), d_others_u = -2 c dO_ws.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "flashcontrast/cuda_check.h"
#include "flashcontrast/gram.h"
#include "flashcontrast/tiles.cuh"

namespace flashcontrast {
namespace gram_impl {

using namespace tiles;

constexpr int kBM = 64;  // anchor rows per tile
constexpr int kBN = 32;  // samples (columns) per tile
constexpr int kBK = 32;  // D chunk
constexpr int kMaxK = kGramMaxK;
constexpr int kKK = kMaxK * kMaxK;


// Dynamic shared-memory layout for K others. Offsets in bytes.
template <typename T>
struct Layout {
  static constexpr bool kWmma = kUsesWmma<T>;
  static constexpr int kLdK = kWmma ? kBK + 8 : kBK + 1;  // A / B chunks (T)
  static constexpr int kLdU = kWmma ? kBN + 4 : kBN + 1;  // U, W tiles (fp32)
  static constexpr int kLdP = kWmma ? kBN + 8 : kBN + 1;  // Q tile (T)
  static constexpr int kLdS = kBK + 4;                    // staging for for_each (fp32)
  static constexpr int kUTile = align128(kBM * kLdU * 4);
  static constexpr int kSmallFloats = 4 * kBM + kBN * (3 + kKK) + 4 * kThreads + 32;
  int a, b, u, w, p, stage, small, bytes;
  __host__ __device__ explicit Layout(int k, bool backward) {
    a = 0;
    b = a + align128(kBM * kLdK * int(sizeof(T)));
    u = b + align128(kBN * kLdK * int(sizeof(T)));
    w = u + k * kUTile;
    p = w + (backward ? kUTile : 0);
    stage = p + (backward ? align128(kBM * kLdP * int(sizeof(T))) : 0);
    small = stage + (backward && kWmma ? align128(kBM * kLdS * 4) : 0);
    bytes = small + kSmallFloats * 4;
  }
};

template <typename T>
struct GramParams {
  const T* t;
  const T* o;
  int64_t n, d;
  int k;
  int64_t ts0, ts1, os0, os1, os2;
  const float* scale;
  const float* det_h;
  const float* adj_h;
  const float* floor_h;
};

// U_r (r < K) = T[row0:+64] @ O^r[col0:+32]^T into Us (fp32, ld kLdU) and tt[i] = |t_i|^2.
// Barriers at both ends.
template <typename T>
__device__ void gram_tiles(const GramParams<T>& p, int64_t row0, int64_t col0, T* As, T* Bs,
                           float* Us, float* tt) {
  using L = Layout<T>;
  const int rr = threadIdx.x / 2, rh = threadIdx.x % 2;
  float sq = 0.0f;
  for (int r = 0; r < p.k; ++r) {
    const T* o = p.o + r * p.os0;
    TileAcc<T, kBM, kBN> acc;
    acc.zero();
    for (int64_t k0 = 0; k0 < p.d; k0 += kBK) {
      __syncthreads();
      load_tile<T, kBM, kBK>(As, L::kLdK, p.t, p.ts0, p.ts1, row0, p.n, k0, p.d);
      load_tile<T, kBN, kBK>(Bs, L::kLdK, o, p.os1, p.os2, col0, p.n, k0, p.d);
      __syncthreads();
      if (r == 0) {
        for (int c = rh * (kBK / 2); c < (rh + 1) * (kBK / 2); ++c) {
          const float v = to_float(As[rr * L::kLdK + c]);
          sq = fmaf(v, v, sq);
        }
      }
      acc.template mma<kBK, true, false>(As, L::kLdK, Bs, L::kLdK);
    }
    acc.store(Us + r * (L::kUTile / 4), L::kLdU);
  }
  sq += __shfl_xor_sync(0xffffffffu, sq, 1);
  if (rh == 0) tt[rr] = sq;
  __syncthreads();
}

// det_ij from the U tiles at (i, j); u[] receives u_ij.
template <typename T>
__device__ __forceinline__ float det_at(const float* Us, int k, int i, int j, const float* tt,
                                        const float* dh, const float* adj, float (&u)[kMaxK]) {
  using L = Layout<T>;
#pragma unroll
  for (int r = 0; r < kMaxK; ++r) u[r] = r < k ? Us[r * (L::kUTile / 4) + i * L::kLdU + j] : 0.0f;
  float q = 0.0f;
#pragma unroll
  for (int r = 0; r < kMaxK; ++r)
#pragma unroll
    for (int s = 0; s < kMaxK; ++s)
      if (r < k && s < k) q = fmaf(u[r] * adj[j * kKK + r * k + s], u[s], q);
  return dh[j] * tt[i] - q;
}

// (keep, V) for det and the floor thr = |t_i|^2 floor_h_j: keep = det > thr, V = sqrt(det)
// there, else sqrt(det * 0): 0, or NaN for a NaN or infinite det (fmaxf would drop NaN).
__device__ __forceinline__ float volume_at(float det, float thr, bool& keep) {
  keep = det > thr;
  return sqrtf(keep ? det : det * 0.0f);
}

template <typename T>
__device__ __forceinline__ void load_column_constants(const GramParams<T>& p, int64_t col0,
                                                      float* dh, float* adj, float* fl) {
  const int64_t n = p.n;
  const int k = p.k;
  for (int idx = threadIdx.x; idx < kBN * k * k; idx += kThreads) {
    const int c = idx / (k * k), q = idx % (k * k);
    adj[c * kKK + q] = col0 + c < n ? p.adj_h[(col0 + c) * k * k + q] : 0.0f;
  }
  for (int c = threadIdx.x; c < kBN; c += kThreads) {
    dh[c] = col0 + c < n ? p.det_h[col0 + c] : 0.0f;
    fl[c] = col0 + c < n ? p.floor_h[col0 + c] : 0.0f;
  }
}

// ----------------------------------------------------------------------------- forward

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_fwd_kernel(GramParams<T> p, float* __restrict__ ws_m, float* __restrict__ ws_l,
                    float* __restrict__ ws_s, float* __restrict__ diag) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<T> lay(p.k, false);
  using L = Layout<T>;
  T* As = reinterpret_cast<T*>(smem + lay.a);
  T* Bs = reinterpret_cast<T*>(smem + lay.b);
  float* Us = reinterpret_cast<float*>(smem + lay.u);
  float* tt = reinterpret_cast<float*>(smem + lay.small);
  float* dh = tt + kBM;
  float* adj = dh + kBN;
  float* fl = adj + kBN * kKK;
  float* part = fl + kBN;  // 3 * kThreads: column partials (m, l, s)

  const int g = blockIdx.x, h = blockIdx.y, G = gridDim.x, H = gridDim.y;
  const int64_t n = p.n;
  const int num_rb = int((n + kBM - 1) / kBM), num_cb = int((n + kBN - 1) / kBN);
  const float scale = *p.scale;
  const int tid = threadIdx.x;
  const int rr = tid / 2, rh = tid % 2;
  constexpr int kParts = kThreads / kBN;  // threads per column
  constexpr int kRowsPer = kBM / kParts;
  const int cc = tid % kBN, cp = tid / kBN;
  float* col_m = ws_m + int64_t(H + g) * n;
  float* col_l = ws_l + int64_t(H + g) * n;
  float* col_s = ws_s + int64_t(H + g) * n;

  for (int rb = g; rb < num_rb; rb += G) {
    const int64_t row0 = int64_t(rb) * kBM;
    const int nrows = int(std::min<int64_t>(kBM, n - row0));
    float run_m = -INFINITY, run_l = 0.0f, run_s = 0.0f;
    for (int cb = h; cb < num_cb; cb += H) {
      const int64_t col0 = int64_t(cb) * kBN;
      const int ncols = int(std::min<int64_t>(kBN, n - col0));
      __syncthreads();  // previous tile's readers of dh / adj / part / Us done
      load_column_constants(p, col0, dh, adj, fl);
      gram_tiles<T>(p, row0, col0, As, Bs, Us, tt);
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {  // logits in place over U_0
        const int i = idx / kBN, j = idx % kBN;
        float u[kMaxK];
        const float det = det_at<T>(Us, p.k, i, j, tt, dh, adj, u);
        bool keep;
        Us[i * L::kLdU + j] = -scale * volume_at(det, tt[i] * fl[j], keep);
      }
      __syncthreads();

      // Rows: two threads per row, 16 columns each.
      float tm = -INFINITY, ts = 0.0f;
      for (int c = rh; c < ncols; c += 2) {
        const float v = Us[rr * L::kLdU + c];
        tm = fmaxf(tm, v);
        ts += v;
      }
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
      ts += __shfl_xor_sync(0xffffffffu, ts, 1);
      const float tmu = finite_or_zero(tm);
      float tl = 0.0f;
      for (int c = rh; c < ncols; c += 2) tl += expf(Us[rr * L::kLdU + c] - tmu);
      tl += __shfl_xor_sync(0xffffffffu, tl, 1);
      lse_merge(run_m, run_l, tm, tl);
      run_s += ts;

      // Columns: kParts threads per column, kRowsPer rows each, merged through `part`.
      float cm = -INFINITY, cl = 0.0f, cs = 0.0f;
      const int r0 = cp * kRowsPer, r1 = std::min(nrows, r0 + kRowsPer);
      for (int r = r0; r < r1; ++r) {
        const float v = Us[r * L::kLdU + cc];
        cm = fmaxf(cm, v);
        cs += v;
      }
      const float cmu = finite_or_zero(cm);
      for (int r = r0; r < r1; ++r) cl += expf(Us[r * L::kLdU + cc] - cmu);
      part[tid] = cm;
      part[kThreads + tid] = cl;
      part[2 * kThreads + tid] = cs;
      __syncthreads();
      if (cp == 0 && cc < ncols) {
        for (int q = 1; q < kParts; ++q) {
          lse_merge(cm, cl, part[q * kBN + cc], part[kThreads + q * kBN + cc]);
          cs += part[2 * kThreads + q * kBN + cc];
        }
        const int64_t j = col0 + cc;
        if (rb != g) {  // not this program's first visit of column j
          lse_merge(cm, cl, col_m[j], col_l[j]);
          cs += col_s[j];
        }
        col_m[j] = cm;
        col_l[j] = cl;
        col_s[j] = cs;
        if (j >= row0 && j < row0 + nrows) diag[j] = Us[(j - row0) * L::kLdU + cc];
      }
    }
    if (rh == 0 && row0 + rr < n) {
      ws_m[int64_t(h) * n + row0 + rr] = run_m;
      ws_l[int64_t(h) * n + row0 + rr] = run_l;
      ws_s[int64_t(h) * n + row0 + rr] = run_s;
    }
  }
}

// Rows from partials [0, H), columns from [H, H + G).
__global__ void gram_combine_kernel(const float* __restrict__ ws_m,
                                    const float* __restrict__ ws_l,
                                    const float* __restrict__ ws_s, int64_t n, int H, int G,
                                    float* __restrict__ row_lse, float* __restrict__ col_lse,
                                    float* __restrict__ row_sum, float* __restrict__ col_sum) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bool cols = blockIdx.y == 1;
  const int k0 = cols ? H : 0, k1 = cols ? H + G : H;
  float m = -INFINITY, l = 0.0f, s = 0.0f;
  for (int k = k0; k < k1; ++k) {
    lse_merge(m, l, ws_m[int64_t(k) * n + i], ws_l[int64_t(k) * n + i]);
    s += ws_s[int64_t(k) * n + i];
  }
  (cols ? col_lse : row_lse)[i] = m + logf(l);
  (cols ? col_sum : row_sum)[i] = s;
}

// ----------------------------------------------------------------------------- backward

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_bwd_kernel(GramParams<T> p, const float* __restrict__ row_lse,
                    const float* __restrict__ col_lse, const float* __restrict__ grad, float eps,
                    float* __restrict__ da_ws, float* __restrict__ do_ws,
                    float* __restrict__ a_ws, float* __restrict__ col_tt,
                    float* __restrict__ col_uu, float* __restrict__ partials) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<T> lay(p.k, true);
  using L = Layout<T>;
  T* As = reinterpret_cast<T*>(smem + lay.a);
  T* Bs = reinterpret_cast<T*>(smem + lay.b);
  float* Us = reinterpret_cast<float*>(smem + lay.u);
  float* Ws = reinterpret_cast<float*>(smem + lay.w);
  T* Ps = reinterpret_cast<T*>(smem + lay.p);
  float* stage = reinterpret_cast<float*>(smem + lay.stage);  // WMMA only
  float* tt = reinterpret_cast<float*>(smem + lay.small);
  float* lse_r = tt + kBM;
  float* dh = lse_r + kBM;
  float* lse_c = dh + kBN;
  float* adj = lse_c + kBN;
  float* fl = adj + kBN * kKK;
  float* red = fl + kBN;

  const int cb = blockIdx.x, sp = blockIdx.y, split = gridDim.y;
  const int64_t n = p.n, d = p.d;
  const int k = p.k;
  const int num_rb = int((n + kBM - 1) / kBM);
  const int count = (num_rb - sp + split - 1) / split;
  const float scale = *p.scale;
  const float c = *grad * (0.5f / float(n));
  const float off = 2.0f * eps / float(n), on = 2.0f * (1.0f - eps);
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(cb) * kBN;
  const int ncols = int(std::min<int64_t>(kBN, n - col0));
  float ds_acc = 0.0f;

  load_column_constants(p, col0, dh, adj, fl);
  if (tid < kBN) lse_c[tid] = col0 + tid < n ? col_lse[col0 + tid] : 0.0f;

  for (int t = 0; t < count; ++t) {
    const int rb = sp + ((t + cb) % count) * split;
    const int64_t row0 = int64_t(rb) * kBM;
    const int nrows = int(std::min<int64_t>(kBM, n - row0));
    if (tid < kBM) lse_r[tid] = row0 + tid < n ? row_lse[row0 + tid] : 0.0f;
    gram_tiles<T>(p, row0, col0, As, Bs, Us, tt);  // barriers publish lse_r and constants

    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {  // W tile (fp32)
      const int i = idx / kBN, j = idx % kBN;
      const int64_t gi = row0 + i, gj = col0 + j;
      float w = 0.0f;
      if (gi < n && gj < n) {
        float u[kMaxK];
        const float det = det_at<T>(Us, k, i, j, tt, dh, adj, u);
        bool keep;
        const float v = volume_at(det, tt[i] * fl[j], keep);
        const float lg = -scale * v;
        const float dl = expf(lg - lse_r[i]) + expf(lg - lse_c[j]) - (gi == gj ? on : 0.0f) - off;
        ds_acc = fmaf(dl, -v, ds_acc);
        if (keep) w = dl * (-scale) / (2.0f * v);
      }
      Ws[i * L::kLdU + j] = w;
    }
    __syncthreads();

    // Row pass: a_i += sum_j W_ij det_h_j (two threads per row).
    {
      const int rr = tid / 2, rh = tid % 2;
      float a = 0.0f;
      for (int j = rh; j < ncols; j += 2) a = fmaf(Ws[rr * L::kLdU + j], dh[j], a);
      a += __shfl_xor_sync(0xffffffffu, a, 1);
      if (rh == 0 && rr < nrows) atomicAdd(a_ws + row0 + rr, a);
    }
    // Column pass: col_tt_j, col_uu_j (r <= s, mirrored), kThreads / kBN threads per column.
    {
      constexpr int kParts = kThreads / kBN, kRowsPer = kBM / kParts;
      const int cc = tid % kBN, cp = tid / kBN;
      const int r0 = cp * kRowsPer, r1 = std::min(nrows, r0 + kRowsPer);
      if (cc < ncols) {
        const int64_t gj = col0 + cc;
        float s_tt = 0.0f;
        for (int i = r0; i < r1; ++i) s_tt = fmaf(Ws[i * L::kLdU + cc], tt[i], s_tt);
        atomicAdd(col_tt + gj, c * s_tt);
        for (int r = 0; r < k; ++r) {
          for (int s = r; s < k; ++s) {
            const float* ur = Us + r * (L::kUTile / 4);
            const float* us = Us + s * (L::kUTile / 4);
            float acc = 0.0f;
            for (int i = r0; i < r1; ++i) {
              acc = fmaf(Ws[i * L::kLdU + cc] * ur[i * L::kLdU + cc], us[i * L::kLdU + cc], acc);
            }
            atomicAdd(col_uu + gj * k * k + r * k + s, c * acc);
            if (s != r) atomicAdd(col_uu + gj * k * k + s * k + r, c * acc);
          }
        }
      }
    }

    for (int r = 0; r < k; ++r) {
      // Q^r = W (adj u)_r: max first, then the normalized T tile.
      float amax = 0.0f;
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, j = idx % kBN;
        float q = 0.0f;
        for (int s = 0; s < k; ++s)
          q = fmaf(adj[j * kKK + r * k + s], Us[s * (L::kUTile / 4) + i * L::kLdU + j], q);
        amax = fmaxf(amax, fabsf(Ws[i * L::kLdU + j] * q));
      }
      float inv;
      const float mult = tile_norm(block_max_all(amax, red), inv);
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, j = idx % kBN;
        float q = 0.0f;
        for (int s = 0; s < k; ++s)
          q = fmaf(adj[j * kKK + r * k + s], Us[s * (L::kUTile / 4) + i * L::kLdU + j], q);
        Ps[i * L::kLdP + j] = from_float<T>(Ws[i * L::kLdU + j] * q * inv);
      }
      const T* o = p.o + r * p.os0;
      float* do_r = do_ws + int64_t(r) * n * d;
      for (int64_t k0 = 0; k0 < d; k0 += kBK) {
        __syncthreads();  // Ps complete; previous chunk's readers of As / Bs done
        load_tile<T, kBM, kBK>(As, L::kLdK, p.t, p.ts0, p.ts1, row0, n, k0, d);
        load_tile<T, kBN, kBK>(Bs, L::kLdK, o, p.os1, p.os2, col0, n, k0, d);
        __syncthreads();
        TileAcc<T, kBM, kBK> acc_a;  // Q (64 x 32) @ O chunk (32 x BK)
        acc_a.zero();
        acc_a.template mma<kBN, true, true>(Ps, L::kLdP, Bs, L::kLdK);
        TileAcc<T, kBN, kBK> acc_b;  // Q^T (32 x 64) @ T chunk (64 x BK)
        acc_b.zero();
        acc_b.template mma<kBM, false, true>(Ps, L::kLdP, As, L::kLdK);
        acc_a.for_each(stage, L::kLdS, [&](int i, int cc, float v) {
          if (row0 + i < n && k0 + cc < d) atomicAdd(da_ws + (row0 + i) * d + k0 + cc, mult * v);
        });
        acc_b.for_each(stage, L::kLdS, [&](int j, int cc, float v) {
          if (col0 + j < n && k0 + cc < d) atomicAdd(do_r + (col0 + j) * d + k0 + cc, mult * v);
        });
      }
      __syncthreads();  // before Ps is rewritten for the next r
    }
  }
  const float total = block_sum(ds_acc, red);
  if (tid == 0) partials[blockIdx.x * split + sp] = c * total;
}

// d_anchor = c (2 a_i t_i - 2 dA_ws); d_others_u = -2 c dO_ws (k slices of n * d).
template <typename T>
__global__ void gram_finalize_kernel(GramParams<T> p, const float* __restrict__ grad,
                                     const float* __restrict__ da_ws,
                                     const float* __restrict__ do_ws,
                                     const float* __restrict__ a_ws, T* __restrict__ d_anchor,
                                     T* __restrict__ d_others) {
  const float c = *grad * (0.5f / float(p.n));
  const int64_t nd = p.n * p.d, total = (1 + p.k) * nd;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    if (idx < nd) {
      const int64_t i = idx / p.d, e = idx % p.d;
      const float t = to_float(p.t[i * p.ts0 + e * p.ts1]);
      d_anchor[idx] = from_float<T>(c * (2.0f * a_ws[i] * t - 2.0f * da_ws[idx]));
    } else {
      d_others[idx - nd] = from_float<T>(-2.0f * c * do_ws[idx - nd]);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    gram_sum_kernel(const float* __restrict__ partials, int count, float* __restrict__ out) {
  __shared__ float red[kThreads / 32];
  float v = 0.0f;
  for (int i = threadIdx.x; i < count; i += kThreads) v += partials[i];
  v = block_sum(v, red);
  if (threadIdx.x == 0) *out = v;
}

// ----------------------------------------------------------------------------- launchers


struct Plan {
  int g, h;
};

Plan forward_plan(int64_t n, int sms) {
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t g = std::min(blocks_of(n, kBM), target);
  const int64_t h = std::min(blocks_of(n, kBN), std::max<int64_t>(1, target / g));
  return {int(g), int(h)};
}

int backward_split(int64_t n, int sms) {
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t want = blocks_of(target, blocks_of(n, kBN));
  return int(std::max<int64_t>(1, std::min(blocks_of(n, kBM), want)));
}

void require(const void* ptr, const char* name) {
  if (!ptr) throw std::invalid_argument(std::string(name) + " is null");
}

// Sizes and strides of GramParams (the Python name of GramInputs), errors naming the field.
void check_sizes(const GramInputs& in) {
  const int64_t n = in.n, d = in.d, k = in.k;
  if (n < 1) throw std::invalid_argument("GramParams.n must be >= 1, got " + std::to_string(n));
  if (d < 1) throw std::invalid_argument("GramParams.d must be >= 1, got " + std::to_string(d));
  if (k < 1 || k > kMaxK) {
    throw std::invalid_argument("GramParams.k (others per sample) must be in 1.." +
                                std::to_string(kMaxK) + ", got " + std::to_string(k));
  }
  if (n > (int64_t(1) << 31) - kBM) {
    throw std::invalid_argument("GramParams.n must be < 2^31 - 64, got " + std::to_string(n));
  }
  const std::pair<int64_t, const char*> strides[] = {
      {in.anchor_stride0, "anchor_stride0"}, {in.anchor_stride1, "anchor_stride1"},
      {in.others_stride0, "others_stride0"}, {in.others_stride1, "others_stride1"},
      {in.others_stride2, "others_stride2"}};
  for (const auto& st : strides) {
    if (st.first < 0) {
      throw std::invalid_argument(std::string("GramParams.") + st.second + " must be >= 0, got " +
                                  std::to_string(st.first));
    }
  }
}

void check_inputs(const GramInputs& in) {
  check_sizes(in);
  require(in.anchor, "GramParams.anchor");
  require(in.others, "GramParams.others");
  require(in.scale, "GramParams.scale");
  require(in.det_h, "GramParams.det_h");
  require(in.adj_h, "GramParams.adj_h");
  require(in.floor_h, "GramParams.floor_h");
}

void check_workspace(int64_t have, int64_t need) {
  if (have < need) {
    throw std::invalid_argument("workspace has " + std::to_string(have) + " floats, needs " +
                                std::to_string(need));
  }
}

template <typename T>
GramParams<T> make_params(const GramInputs& in) {
  return GramParams<T>{static_cast<const T*>(in.anchor), static_cast<const T*>(in.others),
                       in.n, in.d, int(in.k), in.anchor_stride0, in.anchor_stride1,
                       in.others_stride0, in.others_stride1, in.others_stride2, in.scale,
                       in.det_h, in.adj_h, in.floor_h};
}

// Opts the kernel in to `bytes` of dynamic shared memory where that exceeds 48 KB.
template <typename K>
void set_smem(K kernel, int bytes, int device, const char* name) {
  if (bytes <= 48 * 1024) return;
  int optin = 0;
  FC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > optin) {
    throw std::invalid_argument(std::string(name) + " needs " + std::to_string(bytes) +
                                " bytes of shared memory, the device allows " +
                                std::to_string(optin) + " (use fewer modalities)");
  }
  detail::cuda_check(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
      (std::string("cudaFuncSetAttribute(") + name + ")").c_str());
}

template <typename T>
void launch_forward(const GramInputs& in, Plan plan, float* row_lse, float* col_lse, float* diag,
                    float* row_sum, float* col_sum, float* ws, int device, cudaStream_t st) {
  const int64_t n = in.n, part = int64_t(plan.g + plan.h) * n;
  const int bytes = Layout<T>(int(in.k), false).bytes;
  set_smem(gram_fwd_kernel<T>, bytes, device, "gram_fwd_kernel");
  gram_fwd_kernel<T><<<dim3(plan.g, plan.h), kThreads, bytes, st>>>(
      make_params<T>(in), ws, ws + part, ws + 2 * part, diag);
  detail::check_launch("gram_fwd_kernel");
  gram_combine_kernel<<<dim3(unsigned(blocks_of(n, 256)), 2), 256, 0, st>>>(
      ws, ws + part, ws + 2 * part, n, plan.h, plan.g, row_lse, col_lse, row_sum, col_sum);
  detail::check_launch("gram_combine_kernel");
}

template <typename T>
void launch_backward(const GramInputs& in, int split, const float* row_lse,
                     const float* col_lse, const float* grad, float eps, void* d_anchor,
                     void* d_others, float* dscale, float* col_tt, float* col_uu, float* ws,
                     int device, cudaStream_t st) {
  const int64_t n = in.n, nd = in.n * in.d, k = in.k;
  const int num_cb = int(blocks_of(n, kBN));
  float* da_ws = ws;
  float* do_ws = ws + nd;
  float* a_ws = ws + (1 + k) * nd;
  float* partials = a_ws + n;
  FC_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * size_t((1 + k) * nd + n), st));
  FC_CUDA_CHECK(cudaMemsetAsync(col_tt, 0, sizeof(float) * size_t(n), st));
  FC_CUDA_CHECK(cudaMemsetAsync(col_uu, 0, sizeof(float) * size_t(n * k * k), st));
  const int bytes = Layout<T>(int(k), true).bytes;
  set_smem(gram_bwd_kernel<T>, bytes, device, "gram_bwd_kernel");
  const GramParams<T> p = make_params<T>(in);
  gram_bwd_kernel<T><<<dim3(num_cb, split), kThreads, bytes, st>>>(
      p, row_lse, col_lse, grad, eps, da_ws, do_ws, a_ws, col_tt, col_uu, partials);
  detail::check_launch("gram_bwd_kernel");
  const unsigned blocks = unsigned(std::min<int64_t>(blocks_of((1 + k) * nd, 256), 8192));
  gram_finalize_kernel<T><<<blocks, 256, 0, st>>>(p, grad, da_ws, do_ws, a_ws,
                                                  static_cast<T*>(d_anchor),
                                                  static_cast<T*>(d_others));
  detail::check_launch("gram_finalize_kernel");
  gram_sum_kernel<<<1, kThreads, 0, st>>>(partials, num_cb * split, dscale);
  detail::check_launch("gram_sum_kernel");
}


}  // namespace gram_impl

using namespace gram_impl;

int64_t gram_forward_workspace_elems(const GramInputs& in, int device) {
  check_sizes(in);
  const int64_t n = in.n;
  const Plan plan = forward_plan(n, detail::sm_count(device));
  return 3 * int64_t(plan.g + plan.h) * n;
}

void gram_forward(const GramInputs& in, float* row_lse, float* col_lse, float* diag,
                  float* row_sum, float* col_sum, float* workspace, int64_t workspace_elems,
                  void* stream) {
  check_inputs(in);
  require(row_lse, "row_lse");
  require(col_lse, "col_lse");
  require(diag, "diag");
  require(row_sum, "row_sum");
  require(col_sum, "col_sum");
  require(workspace, "workspace");
  const int device = detail::device_of(in.anchor, "GramParams.anchor");
  detail::DeviceScope scope(device);
  const Plan plan = forward_plan(in.n, detail::sm_count(device));
  check_workspace(workspace_elems, 3 * int64_t(plan.g + plan.h) * in.n);
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch_dtype(in.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_forward<T>(in, plan, row_lse, col_lse, diag, row_sum, col_sum, workspace, device, st);
  });
}

int64_t gram_backward_workspace_elems(const GramInputs& in, int device) {
  check_sizes(in);
  const int64_t n = in.n, d = in.d, k = in.k;
  const int split = backward_split(n, detail::sm_count(device));
  return (1 + k) * n * d + n + blocks_of(n, kBN) * split;
}

void gram_backward(const GramInputs& in, const float* row_lse, const float* col_lse,
                   const float* grad, float label_smoothing, void* d_anchor, void* d_others_u,
                   float* dscale, float* col_tt, float* col_uu, float* workspace,
                   int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require(row_lse, "row_lse");
  require(col_lse, "col_lse");
  require(grad, "grad");
  require(d_anchor, "d_anchor");
  require(d_others_u, "d_others_u");
  require(dscale, "dscale");
  require(col_tt, "col_tt");
  require(col_uu, "col_uu");
  require(workspace, "workspace");
  if (!(label_smoothing >= 0.0f && label_smoothing <= 1.0f)) {
    throw std::invalid_argument("label_smoothing must be in [0, 1], got " +
                                std::to_string(label_smoothing));
  }
  const int device = detail::device_of(in.anchor, "GramParams.anchor");
  detail::DeviceScope scope(device);
  const int split = backward_split(in.n, detail::sm_count(device));
  check_workspace(workspace_elems,
                  (1 + in.k) * in.n * in.d + in.n + blocks_of(in.n, kBN) * split);
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch_dtype(in.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_backward<T>(in, split, row_lse, col_lse, grad, label_smoothing, d_anchor, d_others_u,
                       dscale, col_tt, col_uu, workspace, device, st);
  });
}

}  // namespace flashcontrast
