// GRAM (shared/objectives.md section 4) on the tile engine (tiles.cuh), in the rectangular
// form of backends/__init__.py: n anchor rows against m sample columns, row i's own column
// at row_offset + i (the diagonal L_ii and the [i == j] below mean that column; none where
// it is outside [0, m)); statistics partial over this call's rows / columns.
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
//          exclusive per-program partials of a 3 (H n + G m) workspace, diag L_ii, merged by
//          gram_combine_kernel.
// backward grid (column blocks, SPLIT) (backward_split, as pair.cu's). With N = total and
//          c = grad / (2N), dL = c Dh, Dh_ij = P_row + P_col - 2 (1 - eps) [i == j] - 2 eps / N,
//          and
//          W_ij = Dh_ij (-s) / (2 V_ij) above the floor, else 0:
//            a_i      += sum_j W_ij det_h_j                       (row pass, atomics)
//            col_tt_j += c sum_i W_ij |t_i|^2, col_uu_j += c sum_i W_ij u u^T  (atomics)
//            for r: Q^r_ij = W_ij (adj_h_j u_ij)_r, normalized per tile, then per D chunk
//              dA_ws[rb]       += Q^r @ O^r_cb      (fp32 atomics)
//              dO_ws[r][cb]    += Q^r^T @ T_rb      (fp32 atomics)
//            dscale partials sum Dh (-V).
//          finalize: d_anchor = c (2 a_i t_i - 2 dA_ws), d_others_u = -2 c dO_ws (out dtype).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "flashcontrast/cuda_check.h"
#include "flashcontrast/gram.h"
#include "flashcontrast/tiles.cuh"
#include "common.cuh"

namespace flashcontrast {
namespace gram_impl {

using namespace tiles;
using namespace common;

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
  int64_t n, m, d;  // anchor rows, sample columns, features
  int64_t row_offset;
  int k;
  int64_t ts0, ts1, os0, os1, os2;
  const float* scale;
  const float* det_h;
  const float* adj_h;
  const float* floor_h;
};

// The regions of the dynamic shared memory both kernels use (Layout's a, b, u, small).
template <typename T>
struct Smem {
  T* As;
  T* Bs;
  float* Us;
  float* small;
  __device__ Smem(unsigned char* base, const Layout<T>& lay)
      : As(reinterpret_cast<T*>(base + lay.a)),
        Bs(reinterpret_cast<T*>(base + lay.b)),
        Us(reinterpret_cast<float*>(base + lay.u)),
        small(reinterpret_cast<float*>(base + lay.small)) {}
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
      load_tile<T, kBN, kBK>(Bs, L::kLdK, o, p.os1, p.os2, col0, p.m, k0, p.d);
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
  const int64_t m = p.m;
  const int k = p.k;
  for (int idx = threadIdx.x; idx < kBN * k * k; idx += kThreads) {
    const int c = idx / (k * k), q = idx % (k * k);
    adj[c * kKK + q] = col0 + c < m ? p.adj_h[(col0 + c) * k * k + q] : 0.0f;
  }
  for (int c = threadIdx.x; c < kBN; c += kThreads) {
    dh[c] = col0 + c < m ? p.det_h[col0 + c] : 0.0f;
    fl[c] = col0 + c < m ? p.floor_h[col0 + c] : 0.0f;
  }
}

// ----------------------------------------------------------------------------- forward

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_fwd_kernel(GramParams<T> p, float* __restrict__ ws_m, float* __restrict__ ws_l,
                    float* __restrict__ ws_s, float* __restrict__ diag) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = Layout<T>;
  const Smem<T> sm(smem, L(p.k, false));
  T* const As = sm.As;
  T* const Bs = sm.Bs;
  float* const Us = sm.Us;
  float* tt = sm.small;
  float* dh = tt + kBM;
  float* adj = dh + kBN;
  float* fl = adj + kBN * kKK;
  float* part = fl + kBN;  // 3 * kThreads: column partials (m, l, s)

  const int g = blockIdx.x, h = blockIdx.y, G = gridDim.x, H = gridDim.y;
  const int64_t n = p.n, m = p.m;
  const int num_rb = int((n + kBM - 1) / kBM), num_cb = int((m + kBN - 1) / kBN);
  const float scale = *p.scale;
  const int tid = threadIdx.x;
  const int rr = tid / 2, rh = tid % 2;
  constexpr int kParts = kThreads / kBN;  // threads per column
  constexpr int kRowsPer = kBM / kParts;
  const int cc = tid % kBN, cp = tid / kBN;
  const int64_t col_part = int64_t(H) * n + int64_t(g) * m;  // after the H row partials
  float* col_m = ws_m + col_part;
  float* col_l = ws_l + col_part;
  float* col_s = ws_s + col_part;

  for (int rb = g; rb < num_rb; rb += G) {
    const int64_t row0 = int64_t(rb) * kBM;
    const int nrows = int(std::min<int64_t>(kBM, n - row0));
    float run_m = -INFINITY, run_l = 0.0f, run_s = 0.0f;
    for (int cb = h; cb < num_cb; cb += H) {
      const int64_t col0 = int64_t(cb) * kBN;
      const int ncols = int(std::min<int64_t>(kBN, m - col0));
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
        const int64_t i = j - p.row_offset;  // the row whose own column is j
        if (i >= row0 && i < row0 + nrows) diag[i] = Us[(i - row0) * L::kLdU + cc];
      }
    }
    if (rh == 0 && row0 + rr < n) {
      ws_m[int64_t(h) * n + row0 + rr] = run_m;
      ws_l[int64_t(h) * n + row0 + rr] = run_l;
      ws_s[int64_t(h) * n + row0 + rr] = run_s;
    }
  }
}

// Rows from the H partials of n at [0, H n), columns from the G partials of m after them;
// diag_i = 0 for the rows whose own column row_offset + i is outside [0, m) (no tile wrote it).
__global__ void gram_combine_kernel(const float* __restrict__ ws_m,
                                    const float* __restrict__ ws_l,
                                    const float* __restrict__ ws_s, int64_t n, int64_t m,
                                    int64_t row_offset, int H, int G,
                                    float* __restrict__ row_lse, float* __restrict__ col_lse,
                                    float* __restrict__ row_sum, float* __restrict__ col_sum,
                                    float* __restrict__ diag) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool cols = blockIdx.y == 1;
  const int64_t len = cols ? m : n;
  if (i >= len) return;
  const int parts = cols ? G : H;
  const int64_t base = cols ? int64_t(H) * n : 0;
  float mx = -INFINITY, l = 0.0f, s = 0.0f;
  for (int q = 0; q < parts; ++q) {
    const int64_t at = base + int64_t(q) * len + i;
    lse_merge(mx, l, ws_m[at], ws_l[at]);
    s += ws_s[at];
  }
  (cols ? col_lse : row_lse)[i] = mx + logf(l);
  (cols ? col_sum : row_sum)[i] = s;
  if (!cols && (i + row_offset < 0 || i + row_offset >= m)) diag[i] = 0.0f;
}

// ----------------------------------------------------------------------------- backward

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_bwd_kernel(GramParams<T> p, const float* __restrict__ row_lse,
                    const float* __restrict__ col_lse, const float* __restrict__ grad, float eps,
                    int64_t total, float* __restrict__ da_ws, float* __restrict__ do_ws,
                    float* __restrict__ a_ws, float* __restrict__ col_tt,
                    float* __restrict__ col_uu, float* __restrict__ partials) {
  extern __shared__ __align__(128) unsigned char smem[];
  using L = Layout<T>;
  const L lay(p.k, true);
  const Smem<T> sm(smem, lay);
  T* const As = sm.As;
  T* const Bs = sm.Bs;
  float* const Us = sm.Us;
  float* Ws = reinterpret_cast<float*>(smem + lay.w);
  T* Ps = reinterpret_cast<T*>(smem + lay.p);
  float* stage = reinterpret_cast<float*>(smem + lay.stage);  // WMMA only
  float* tt = sm.small;
  float* lse_r = tt + kBM;
  float* dh = lse_r + kBM;
  float* lse_c = dh + kBN;
  float* adj = lse_c + kBN;
  float* fl = adj + kBN * kKK;
  float* red = fl + kBN;

  const int cb = blockIdx.x, sp = blockIdx.y, split = gridDim.y;
  const int64_t n = p.n, m = p.m, d = p.d;
  const int k = p.k;
  const int num_rb = int((n + kBM - 1) / kBM);
  const int count = (num_rb - sp + split - 1) / split;
  const float scale = *p.scale;
  const float c = *grad * (0.5f / float(total));
  const float off = 2.0f * eps / float(total), on = 2.0f * (1.0f - eps);
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(cb) * kBN;
  const int ncols = int(std::min<int64_t>(kBN, m - col0));
  float ds_acc = 0.0f;

  load_column_constants(p, col0, dh, adj, fl);
  if (tid < kBN) lse_c[tid] = col0 + tid < m ? col_lse[col0 + tid] : 0.0f;

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
      if (gi < n && gj < m) {
        float u[kMaxK];
        const float det = det_at<T>(Us, k, i, j, tt, dh, adj, u);
        bool keep;
        const float v = volume_at(det, tt[i] * fl[j], keep);
        const float lg = -scale * v;
        const float dl = expf(lg - lse_r[i]) + expf(lg - lse_c[j]) - (gj == gi + p.row_offset ? on : 0.0f) - off;
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
      float* do_r = do_ws + int64_t(r) * m * d;
      for (int64_t k0 = 0; k0 < d; k0 += kBK) {
        __syncthreads();  // Ps complete; previous chunk's readers of As / Bs done
        load_tile<T, kBM, kBK>(As, L::kLdK, p.t, p.ts0, p.ts1, row0, n, k0, d);
        load_tile<T, kBN, kBK>(Bs, L::kLdK, o, p.os1, p.os2, col0, m, k0, d);
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
          if (col0 + j < m && k0 + cc < d) atomicAdd(do_r + (col0 + j) * d + k0 + cc, mult * v);
        });
      }
      __syncthreads();  // before Ps is rewritten for the next r
    }
  }
  const float ds = block_sum(ds_acc, red);
  if (tid == 0) partials[blockIdx.x * split + sp] = c * ds;
}

// d_anchor = c (2 a_i t_i - 2 dA_ws) (n * d); d_others_u = -2 c dO_ws (k slices of m * d);
// both in the output dtype O (T, or float for partial sums).
template <typename T, typename O>
__global__ void gram_finalize_kernel(GramParams<T> p, const float* __restrict__ grad,
                                     int64_t total, const float* __restrict__ da_ws,
                                     const float* __restrict__ do_ws,
                                     const float* __restrict__ a_ws, O* __restrict__ d_anchor,
                                     O* __restrict__ d_others) {
  const float c = *grad * (0.5f / float(total));
  const int64_t nd = p.n * p.d, elems = nd + p.k * p.m * p.d;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < elems; idx += stride) {
    if (idx < nd) {
      const int64_t i = idx / p.d, e = idx % p.d;
      const float t = to_float(p.t[i * p.ts0 + e * p.ts1]);
      d_anchor[idx] = from_float<O>(c * (2.0f * a_ws[i] * t - 2.0f * da_ws[idx]));
    } else {
      d_others[idx - nd] = from_float<O>(-2.0f * c * do_ws[idx - nd]);
    }
  }
}

// ----------------------------------------------------------------------------- launchers


struct Plan {
  int g, h;
};

int64_t cols_of(const GramInputs& in) { return in.m < 0 ? in.n : in.m; }

// G programs over the n rows' 64-row blocks, H over the m columns' 32-column blocks.
Plan forward_plan(int64_t n, int64_t m, int sms) {
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t g = std::min(blocks_of(n, kBM), target);
  const int64_t h = std::min(blocks_of(m, kBN), std::max<int64_t>(1, target / g));
  return {int(g), int(h)};
}

int backward_split(int64_t n, int64_t m, int sms) {
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t want = blocks_of(target, blocks_of(m, kBN));
  return int(std::max<int64_t>(1, std::min(blocks_of(n, kBM), want)));
}

int64_t forward_elems(const GramInputs& in, int sms) {
  const int64_t n = in.n, m = cols_of(in);
  const Plan plan = forward_plan(n, m, sms);
  return 3 * (int64_t(plan.h) * n + int64_t(plan.g) * m);
}

// da_ws (n d), do_ws (k m d), a_ws (n), then the dscale partials.
int64_t backward_elems(const GramInputs& in, int sms) {
  const int64_t n = in.n, m = cols_of(in);
  return n * in.d + in.k * m * in.d + n + blocks_of(m, kBN) * backward_split(n, m, sms);
}

// Sizes and strides of GramParams (the Python name of GramInputs), errors naming the field.
void check_sizes(const GramInputs& in) {
  const int64_t k = in.k;
  require_count(in.n, "GramParams.n");
  if (in.d < 1) {
    throw std::invalid_argument("GramParams.d must be >= 1, got " + std::to_string(in.d));
  }
  if (k < 1 || k > kMaxK) {
    throw std::invalid_argument("GramParams.k (others per sample) must be in 1.." +
                                std::to_string(kMaxK) + ", got " + std::to_string(k));
  }
  if (in.m >= 0) require_count(in.m, "GramParams.m");
  check_strides("GramParams.",
                {{in.anchor_stride0, "anchor_stride0"}, {in.anchor_stride1, "anchor_stride1"},
                 {in.others_stride0, "others_stride0"}, {in.others_stride1, "others_stride1"},
                 {in.others_stride2, "others_stride2"}});
}

void check_inputs(const GramInputs& in) {
  check_sizes(in);
  require_all({{in.anchor, "GramParams.anchor"}, {in.others, "GramParams.others"},
               {in.scale, "GramParams.scale"}, {in.det_h, "GramParams.det_h"},
               {in.adj_h, "GramParams.adj_h"}, {in.floor_h, "GramParams.floor_h"}});
}

template <typename T>
GramParams<T> make_params(const GramInputs& in) {
  return GramParams<T>{static_cast<const T*>(in.anchor), static_cast<const T*>(in.others),
                       in.n, cols_of(in), in.d, in.row_offset, int(in.k), in.anchor_stride0,
                       in.anchor_stride1, in.others_stride0, in.others_stride1,
                       in.others_stride2, in.scale, in.det_h, in.adj_h, in.floor_h};
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
  const int64_t n = in.n, m = cols_of(in);
  const int64_t part = int64_t(plan.h) * n + int64_t(plan.g) * m;
  const int bytes = Layout<T>(int(in.k), false).bytes;
  set_smem(gram_fwd_kernel<T>, bytes, device, "gram_fwd_kernel");
  gram_fwd_kernel<T><<<dim3(plan.g, plan.h), kThreads, bytes, st>>>(
      make_params<T>(in), ws, ws + part, ws + 2 * part, diag);
  detail::check_launch("gram_fwd_kernel");
  gram_combine_kernel<<<dim3(unsigned(blocks_of(std::max(n, m), 256)), 2), 256, 0, st>>>(
      ws, ws + part, ws + 2 * part, n, m, in.row_offset, plan.h, plan.g, row_lse, col_lse,
      row_sum, col_sum, diag);
  detail::check_launch("gram_combine_kernel");
}

template <typename T, typename O>
void launch_backward(const GramInputs& in, int split, const float* row_lse,
                     const float* col_lse, const float* grad, float eps, int64_t total,
                     void* d_anchor, void* d_others, float* dscale, float* col_tt,
                     float* col_uu, float* ws, int device, cudaStream_t st) {
  const int64_t n = in.n, m = cols_of(in), k = in.k;
  const int64_t elems = n * in.d + k * m * in.d;
  const int num_cb = int(blocks_of(m, kBN));
  float* da_ws = ws;
  float* do_ws = ws + n * in.d;
  float* a_ws = ws + elems;
  float* partials = a_ws + n;
  FC_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * size_t(elems + n), st));
  FC_CUDA_CHECK(cudaMemsetAsync(col_tt, 0, sizeof(float) * size_t(m), st));
  FC_CUDA_CHECK(cudaMemsetAsync(col_uu, 0, sizeof(float) * size_t(m * k * k), st));
  const int bytes = Layout<T>(int(k), true).bytes;
  set_smem(gram_bwd_kernel<T>, bytes, device, "gram_bwd_kernel");
  const GramParams<T> p = make_params<T>(in);
  gram_bwd_kernel<T><<<dim3(num_cb, split), kThreads, bytes, st>>>(
      p, row_lse, col_lse, grad, eps, total, da_ws, do_ws, a_ws, col_tt, col_uu, partials);
  detail::check_launch("gram_bwd_kernel");
  gram_finalize_kernel<T, O><<<grid_1d(elems), 256, 0, st>>>(p, grad, total, da_ws, do_ws, a_ws,
                                                             static_cast<O*>(d_anchor),
                                                             static_cast<O*>(d_others));
  detail::check_launch("gram_finalize_kernel");
  sum_kernel<<<1, kThreads, 0, st>>>(partials, num_cb * split, dscale, nullptr);
  detail::check_launch("sum_kernel");
}


}  // namespace gram_impl

using namespace gram_impl;

int64_t gram_forward_workspace_elems(const GramInputs& in, int device) {
  check_sizes(in);
  return forward_elems(in, detail::sm_count(device));
}

void gram_forward(const GramInputs& in, float* row_lse, float* col_lse, float* diag,
                  float* row_sum, float* col_sum, float* workspace, int64_t workspace_elems,
                  void* stream) {
  check_inputs(in);
  require_all({{row_lse, "row_lse"}, {col_lse, "col_lse"}, {diag, "diag"}, {row_sum, "row_sum"},
               {col_sum, "col_sum"}, {workspace, "workspace"}});
  const detail::LaunchScope at(in.anchor, "GramParams.anchor", stream);
  check_workspace(workspace_elems, forward_elems(in, at.sms));
  const Plan plan = forward_plan(in.n, cols_of(in), at.sms);
  dispatch_dtype(in.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_forward<T>(in, plan, row_lse, col_lse, diag, row_sum, col_sum, workspace, at.device,
                      at.stream);
  });
}

int64_t gram_backward_workspace_elems(const GramInputs& in, int device) {
  check_sizes(in);
  return backward_elems(in, detail::sm_count(device));
}

void gram_backward(const GramInputs& in, const float* row_lse, const float* col_lse,
                   const float* grad, float label_smoothing, int64_t total, DType out_dtype,
                   void* d_anchor, void* d_others_u, float* dscale, float* col_tt,
                   float* col_uu, float* workspace, int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require_all({{row_lse, "row_lse"}, {col_lse, "col_lse"}, {grad, "grad"}, {d_anchor, "d_anchor"},
               {d_others_u, "d_others_u"}, {dscale, "dscale"}, {col_tt, "col_tt"},
               {col_uu, "col_uu"}, {workspace, "workspace"}});
  if (!(label_smoothing >= 0.0f && label_smoothing <= 1.0f)) {
    throw std::invalid_argument("label_smoothing must be in [0, 1], got " +
                                std::to_string(label_smoothing));
  }
  if (total < 1) throw std::invalid_argument("total must be >= 1, got " + std::to_string(total));
  if (out_dtype != in.dtype && out_dtype != DType::kFloat32) {
    throw std::invalid_argument(std::string("out_dtype must be the inputs' dtype (") +
                                dtype_name(in.dtype) + ") or float32, got " +
                                dtype_name(out_dtype));
  }
  const detail::LaunchScope at(in.anchor, "GramParams.anchor", stream);
  check_workspace(workspace_elems, backward_elems(in, at.sms));
  const int split = backward_split(in.n, cols_of(in), at.sms);
  dispatch_dtype(in.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto run = [&](auto* out_tag) {
      using O = std::remove_pointer_t<decltype(out_tag)>;
      launch_backward<T, O>(in, split, row_lse, col_lse, grad, label_smoothing, total,
                            d_anchor, d_others_u, dscale, col_tt, col_uu, workspace, at.device,
                            at.stream);
    };
    if (out_dtype == in.dtype) {
      run(static_cast<T*>(nullptr));
    } else {
      run(static_cast<float*>(nullptr));
    }
  });
}

}  // namespace flashcontrast
