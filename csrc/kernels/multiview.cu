// MV-InfoNCE / MV-DHEL negatives (shared/objectives.md section 3) on the tile engine:
// row logsumexps of the self-similarity S = s U U^T over one segment (the whole (V N) stack,
// or each view's (N, N) block), the diagonal and same-group pairs excluded.
//
// Rows are addressed through per-tile offset tables in shared memory (row r of the stack
// at (r / n) stride_v + (r % n) stride_n), so u is read in place with any strides.
// GEMM count: forward 1 (X = U_rb U_cb^T); backward 2 (recompute X, T @ U_cb): the allowed
// set is symmetric, so with T_rc = g_r P_rc + g_c P_cr and P_cr = exp(S_rc - lse_c) each
// tile needs only its row and column LSEs and du_r = s sum_c T_rc u_c needs no transposed
// product (the column side is the row side of another program).
// fp32 accumulation; bf16/fp16: tensor cores (WMMA) with T normalized per tile before
// rounding (tile_norm; |T| <= 2 max|g| is far outside [-2, 2] in general); fp32: SIMT.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "flashcontrast/cuda_check.h"
#include "flashcontrast/multiview.h"
#include "flashcontrast/tiles.cuh"

namespace flashcontrast {
namespace multiview_impl {

using namespace tiles;

constexpr int kBM = 64;  // rows per tile (and columns: kBM == kBN, square segments)
constexpr int kBN = 64;
constexpr int kBK = 32;

template <typename T>
struct Smem {
  static constexpr bool kWmma = kUsesWmma<T>;
  static constexpr int kLdK = kWmma ? kBK + 8 : kBK + 1;
  static constexpr int kLdX = kWmma ? kBN + 4 : kBN + 1;
  static constexpr int kLdP = kWmma ? kBN + 8 : kLdX;
  static constexpr int kA = 0;
  static constexpr int kB = kA + align128(kBM * kLdK * int(sizeof(T)));
  static constexpr int kX = kB + align128(kBN * kLdK * int(sizeof(T)));
  static constexpr int kP = kWmma ? kX + align128(kBM * kLdX * 4) : kX;
  // Per-row / per-column tables: int64 offsets and group ids, then int sample ids, then
  // fp32 LSEs and upstream gradients, then block-reduction scratch.
  static constexpr int kTab = kP + (kWmma ? align128(kBM * kLdP * int(sizeof(T)))
                                          : align128(kBM * kLdX * 4));
  static constexpr int kOffR = kTab;
  static constexpr int kOffC = kOffR + kBM * 8;
  static constexpr int kGidR = kOffC + kBN * 8;
  static constexpr int kGidC = kGidR + kBM * 8;
  static constexpr int kSampR = kGidC + kBN * 8;
  static constexpr int kSampC = kSampR + kBM * 4;
  static constexpr int kLseR = kSampC + kBN * 4;
  static constexpr int kLseC = kLseR + kBM * 4;
  static constexpr int kGR = kLseC + kBN * 4;
  static constexpr int kGC = kGR + kBM * 4;
  static constexpr int kRed = kGC + kBN * 4;
  static constexpr int kBytes = kRed + 32 * 4;
  static_assert(kBytes <= 48 * 1024, "static shared memory above 48 KiB");
};

// Problem description on the device side.
template <typename T>
struct Params {
  const T* u;
  int64_t n, d;                        // samples per view, features
  int64_t stride_v, stride_n, stride_d;
  int64_t seg_len;                     // rows per segment: v n (whole stack) or n (per view)
  const float* scale;
  const int64_t* groups;               // (n,) or nullptr
};

// Tables for the 64 rows starting at local row `start` of segment `seg`: element offset
// (-1 outside the segment), sample id (-1 outside) and group id (0 without groups).
// No barrier: the caller synchronizes before anyone reads them.
template <typename T>
__device__ __forceinline__ void load_row_tables(const Params<T>& p, int seg, int64_t start,
                                                int64_t* off, int* samp, int64_t* gid) {
  for (int t = threadIdx.x; t < kBM; t += kThreads) {
    const int64_t local = start + t;
    if (local < p.seg_len) {
      const int64_t r = int64_t(seg) * p.seg_len + local;  // row of the (v n) stack
      const int64_t view = r / p.n, sample = r - view * p.n;
      off[t] = view * p.stride_v + sample * p.stride_n;
      samp[t] = int(sample);
      gid[t] = p.groups != nullptr ? p.groups[sample] : int64_t(0);
    } else {
      off[t] = -1;
      samp[t] = -1;
      gid[t] = 0;
    }
  }
}

// smem (64 x kBK, ld) = the D chunk [k0, k0 + kBK) of the rows in `off`, zero outside.
// Consecutive threads walk D when stride_d == 1 (or rows are not unit-stride), else rows.
template <typename T>
__device__ __forceinline__ void load_rows(T* smem, int ld, const Params<T>& p, const int64_t* off,
                                          int64_t k0) {
  const bool rows_fast = p.stride_d != 1 && p.stride_n == 1;
  const T zero = from_float<T>(0.0f);
  for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
    const int r = rows_fast ? idx % kBM : idx / kBK;
    const int c = rows_fast ? idx / kBM : idx % kBK;
    const int64_t o = off[r], k = k0 + c;
    smem[r * ld + c] = (o >= 0 && k < p.d) ? p.u[o + k * p.stride_d] : zero;
  }
}

// X = U[rows] @ U[cols]^T into Xs (fp32); barriers before (tables published, previous
// readers of As/Bs done) and after.
template <typename T>
__device__ __forceinline__ void tile_logits(const Params<T>& p, const int64_t* off_r,
                                            const int64_t* off_c, T* As, T* Bs, float* Xs) {
  using L = Smem<T>;
  TileAcc<T, kBM, kBN> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < p.d; k0 += kBK) {
    __syncthreads();
    load_rows<T>(As, L::kLdK, p, off_r, k0);
    load_rows<T>(Bs, L::kLdK, p, off_c, k0);
    __syncthreads();
    acc.template mma<kBK, true, false>(As, L::kLdK, Bs, L::kLdK);
  }
  acc.store(Xs, L::kLdX);
  __syncthreads();
}

// Whether tile entry (i, j) is an allowed (row, column) pair: both inside the segment,
// not the same row of the stack, and not two different samples of one group.
__device__ __forceinline__ bool allowed(const int64_t* off_r, const int64_t* off_c,
                                        const int* samp_r, const int* samp_c,
                                        const int64_t* gid_r, const int64_t* gid_c,
                                        bool has_groups, int64_t row0, int i, int64_t col0,
                                        int j) {
  if (off_r[i] < 0 || off_c[j] < 0) return false;
  if (row0 + i == col0 + j) return false;  // same segment: local equality is identity
  if (has_groups && samp_r[i] != samp_c[j] && gid_r[i] == gid_c[j]) return false;
  return true;
}

// ----------------------------------------------------------------------------- forward
// Grid (row blocks C, H, segments S): program (rb, h, seg) sweeps column blocks
// cb = h, h + H, ... of its segment with an online (max, sumexp) per row (two threads per
// row), and stores its partial to ws[h][r]; selfsim_combine_kernel merges the H partials:
// row_lse = m + log l (-inf for a row with no allowed column). No atomics: deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    selfsim_fwd_kernel(Params<T> p, float* __restrict__ ws_m, float* __restrict__ ws_l,
                       int64_t rows_total) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* As = reinterpret_cast<T*>(smem + L::kA);
  T* Bs = reinterpret_cast<T*>(smem + L::kB);
  float* Xs = reinterpret_cast<float*>(smem + L::kX);
  int64_t* off_r = reinterpret_cast<int64_t*>(smem + L::kOffR);
  int64_t* off_c = reinterpret_cast<int64_t*>(smem + L::kOffC);
  int64_t* gid_r = reinterpret_cast<int64_t*>(smem + L::kGidR);
  int64_t* gid_c = reinterpret_cast<int64_t*>(smem + L::kGidC);
  int* samp_r = reinterpret_cast<int*>(smem + L::kSampR);
  int* samp_c = reinterpret_cast<int*>(smem + L::kSampC);

  const int rb = blockIdx.x, h = blockIdx.y, H = gridDim.y, seg = blockIdx.z;
  const int num_cb = int((p.seg_len + kBN - 1) / kBN);
  const float scale = *p.scale;
  const bool has_groups = p.groups != nullptr;
  const int tid = threadIdx.x;
  const int rr = tid / 2, rh = tid % 2;
  const int64_t row0 = int64_t(rb) * kBM;

  load_row_tables(p, seg, row0, off_r, samp_r, gid_r);
  float run_m = -INFINITY, run_l = 0.0f;
  for (int cb = h; cb < num_cb; cb += H) {
    const int64_t col0 = int64_t(cb) * kBN;
    load_row_tables(p, seg, col0, off_c, samp_c, gid_c);
    tile_logits<T>(p, off_r, off_c, As, Bs, Xs);  // its first barrier publishes the tables

    float tm = -INFINITY;
    for (int c = rh; c < kBN; c += 2) {
      if (allowed(off_r, off_c, samp_r, samp_c, gid_r, gid_c, has_groups, row0, rr, col0, c))
        tm = fmaxf(tm, scale * Xs[rr * L::kLdX + c]);
    }
    tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
    const float tmu = finite_or_zero(tm);
    float tl = 0.0f;
    for (int c = rh; c < kBN; c += 2) {
      if (allowed(off_r, off_c, samp_r, samp_c, gid_r, gid_c, has_groups, row0, rr, col0, c))
        tl += expf(scale * Xs[rr * L::kLdX + c] - tmu);
    }
    tl += __shfl_xor_sync(0xffffffffu, tl, 1);
    lse_merge(run_m, run_l, tm, tl);
    __syncthreads();  // everyone is done with the column tables before the next tile's
  }
  if (rh == 0 && row0 + rr < p.seg_len) {
    const int64_t r = int64_t(seg) * p.seg_len + row0 + rr;
    ws_m[int64_t(h) * rows_total + r] = run_m;
    ws_l[int64_t(h) * rows_total + r] = run_l;
  }
}

__global__ void selfsim_combine_kernel(const float* __restrict__ ws_m,
                                       const float* __restrict__ ws_l, int64_t rows_total, int H,
                                       float* __restrict__ row_lse) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows_total) return;
  float m = -INFINITY, l = 0.0f;
  for (int k = 0; k < H; ++k) lse_merge(m, l, ws_m[int64_t(k) * rows_total + r],
                                        ws_l[int64_t(k) * rows_total + r]);
  row_lse[r] = m + logf(l);  // l == 0 (no allowed column): -inf
}

// ----------------------------------------------------------------------------- backward
// Grid as the forward. Program (rb, h, seg), per column block cb = h (mod H):
//   X = U_rb U_cb^T (recompute); T_rc = g_r e^{S_rc - lse_r} + g_c e^{S_rc - lse_c} on the
//   allowed set, 0 elsewhere (a row or column with lse = -inf has no allowed pair);
//   ds += sum_allowed g_r P_rc X_rc (thread-local, one CTA sum per program);
//   16-bit: T / max|T| rounded to T (tile_norm), the products multiplied back;
//   du_ws[rb] += T @ U_cb per D chunk, fp32 atomics (H programs share a row block).
// Finalize: du = T(s du_ws); dscale = sum of the partials (one CTA, fixed order).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    selfsim_bwd_kernel(Params<T> p, const float* __restrict__ row_lse,
                       const float* __restrict__ grad_rows, float* __restrict__ du_ws,
                       float* __restrict__ partials) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* As = reinterpret_cast<T*>(smem + L::kA);
  T* Bs = reinterpret_cast<T*>(smem + L::kB);
  float* Xs = reinterpret_cast<float*>(smem + L::kX);
  T* Ps = reinterpret_cast<T*>(smem + L::kP);
  int64_t* off_r = reinterpret_cast<int64_t*>(smem + L::kOffR);
  int64_t* off_c = reinterpret_cast<int64_t*>(smem + L::kOffC);
  int64_t* gid_r = reinterpret_cast<int64_t*>(smem + L::kGidR);
  int64_t* gid_c = reinterpret_cast<int64_t*>(smem + L::kGidC);
  int* samp_r = reinterpret_cast<int*>(smem + L::kSampR);
  int* samp_c = reinterpret_cast<int*>(smem + L::kSampC);
  float* lse_r = reinterpret_cast<float*>(smem + L::kLseR);
  float* lse_c = reinterpret_cast<float*>(smem + L::kLseC);
  float* g_r = reinterpret_cast<float*>(smem + L::kGR);
  float* g_c = reinterpret_cast<float*>(smem + L::kGC);
  float* red = reinterpret_cast<float*>(smem + L::kRed);

  const int rb = blockIdx.x, h = blockIdx.y, H = gridDim.y, seg = blockIdx.z;
  const int num_cb = int((p.seg_len + kBN - 1) / kBN);
  const int64_t d = p.d;
  const int64_t base = int64_t(seg) * p.seg_len;  // first stack row of the segment
  const float scale = *p.scale;
  const bool has_groups = p.groups != nullptr;
  const int tid = threadIdx.x;
  const int64_t row0 = int64_t(rb) * kBM;

  load_row_tables(p, seg, row0, off_r, samp_r, gid_r);
  if (tid < kBM) {
    const bool in = row0 + tid < p.seg_len;
    lse_r[tid] = in ? row_lse[base + row0 + tid] : 0.0f;
    g_r[tid] = in ? grad_rows[base + row0 + tid] : 0.0f;
  }
  float ds_acc = 0.0f;

  for (int cb = h; cb < num_cb; cb += H) {
    const int64_t col0 = int64_t(cb) * kBN;
    load_row_tables(p, seg, col0, off_c, samp_c, gid_c);
    if (tid < kBN) {
      const bool in = col0 + tid < p.seg_len;
      lse_c[tid] = in ? row_lse[base + col0 + tid] : 0.0f;
      g_c[tid] = in ? grad_rows[base + col0 + tid] : 0.0f;
    }
    tile_logits<T>(p, off_r, off_c, As, Bs, Xs);  // publishes the tables

    float tmax = 0.0f;
    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int i = idx / kBN, j = idx % kBN;
      const float x = Xs[i * L::kLdX + j];
      float tv = 0.0f;
      if (allowed(off_r, off_c, samp_r, samp_c, gid_r, gid_c, has_groups, row0, i, col0, j)) {
        const float s = scale * x;
        const float lr = lse_r[i], lc = lse_c[j];
        const float pr = lr == -INFINITY ? 0.0f : expf(s - lr);  // P_rc
        const float pc = lc == -INFINITY ? 0.0f : expf(s - lc);  // P_cr (S symmetric)
        const float wr = g_r[i] * pr;
        tv = fmaf(g_c[j], pc, wr);
        ds_acc = fmaf(wr, x, ds_acc);
      }
      Xs[i * L::kLdX + j] = tv;  // in place (same thread, same slot); fp32: this is Ps
      tmax = fmaxf(tmax, fabsf(tv));
    }
    float norm = 1.0f;
    if (kUsesWmma<T>) {
      float inv;
      norm = tile_norm(block_max_all(tmax, red), inv);  // barriers: T complete in Xs
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, j = idx % kBN;
        Ps[i * L::kLdP + j] = from_float<T>(Xs[i * L::kLdX + j] * inv);
      }
    }

    for (int64_t k0 = 0; k0 < d; k0 += kBK) {
      __syncthreads();  // T complete; previous chunk's readers of Bs / staging done
      load_rows<T>(Bs, L::kLdK, p, off_c, k0);
      __syncthreads();
      TileAcc<T, kBM, kBK> acc;  // T (BM x BN) @ U_cb chunk (BN x BK)
      acc.zero();
      acc.template mma<kBN, true, true>(Ps, L::kLdP, Bs, L::kLdK);
      // Staging (WMMA only) through Xs: dead once Ps is built, separate from Ps there.
      acc.for_each(Xs, L::kLdX, [&](int i, int c, float v) {
        if (row0 + i < p.seg_len && k0 + c < d)
          atomicAdd(du_ws + (base + row0 + i) * d + k0 + c, v * norm);
      });
    }
    __syncthreads();  // before the next tile overwrites the column tables, Xs and Ps
  }

  const float ds_total = block_sum(ds_acc, red);
  if (tid == 0) {
    const int pid = (blockIdx.z * gridDim.y + h) * gridDim.x + rb;
    partials[pid] = ds_total;
  }
}

// du stays fp32 for every input dtype: the objective adds the positives' gradient to it
// before the one rounding to the input dtype (objectives/multiview.py).
__global__ void selfsim_bwd_finalize_kernel(const float* __restrict__ du_ws, int64_t total,
                                            const float* __restrict__ scale,
                                            float* __restrict__ du) {
  const float s = *scale;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    du[i] = s * du_ws[i];
}

// One CTA, fixed order: deterministic.
__global__ void __launch_bounds__(kThreads)
    selfsim_bwd_scalar_kernel(const float* __restrict__ partials, int programs,
                              float* __restrict__ dscale) {
  __shared__ float red[kThreads / 32];
  float ds = 0.0f;
  for (int i = threadIdx.x; i < programs; i += kThreads) ds += partials[i];
  ds = block_sum(ds, red);
  if (threadIdx.x == 0) *dscale = ds;
}

// ----------------------------------------------------------------------------- launchers

struct Plan {
  int64_t seg_len;
  int blocks;  // row (and column) blocks per segment
  int h;       // column splits
  int segs;
};

Plan make_plan(int64_t v, int64_t n, bool per_view, int sms) {
  Plan plan;
  plan.seg_len = per_view ? n : v * n;
  plan.segs = per_view ? int(v) : 1;
  plan.blocks = int((plan.seg_len + kBM - 1) / kBM);
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t programs = int64_t(plan.blocks) * plan.segs;
  const int64_t want = (target + programs - 1) / programs;
  plan.h = int(std::max<int64_t>(1, std::min<int64_t>(plan.blocks, want)));
  return plan;
}

void check_sizes(int64_t v, int64_t n, int64_t d) {
  if (v < 1) throw std::invalid_argument("v must be >= 1, got " + std::to_string(v));
  if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
  if (d < 1) throw std::invalid_argument("d must be >= 1, got " + std::to_string(d));
  if (v > 65535) throw std::invalid_argument("v must be <= 65535, got " + std::to_string(v));
  if (n > (int64_t(1) << 31) / v - kBM) throw std::invalid_argument("v * n is too large");
}

void check_inputs(const SelfSimInputs& in) {
  check_sizes(in.v, in.n, in.d);
  if (!in.u) throw std::invalid_argument("u_ptr is null");
  if (!in.scale) throw std::invalid_argument("scale_ptr is null");
}

void require(const void* ptr, const char* name) {
  if (!ptr) throw std::invalid_argument(std::string(name) + " is null");
}

void require_workspace(int64_t have, int64_t need) {
  if (have < need) {
    throw std::invalid_argument("workspace has " + std::to_string(have) + " floats, needs " +
                                std::to_string(need));
  }
}

int64_t forward_elems(const Plan& plan, int64_t v, int64_t n) {
  return 2 * int64_t(plan.h) * v * n;
}

int64_t backward_elems(const Plan& plan, int64_t v, int64_t n, int64_t d) {
  return v * n * d + int64_t(plan.blocks) * plan.h * plan.segs;
}

template <typename T>
Params<T> make_params(const SelfSimInputs& in, const Plan& plan) {
  return Params<T>{static_cast<const T*>(in.u), in.n, in.d, in.stride_v, in.stride_n,
                   in.stride_d, plan.seg_len, in.scale, in.groups};
}

template <typename T>
void launch_forward(const SelfSimInputs& in, const Plan& plan, float* row_lse, float* ws,
                    cudaStream_t stream) {
  const int64_t rows = in.v * in.n;
  float* ws_m = ws;
  float* ws_l = ws + int64_t(plan.h) * rows;
  selfsim_fwd_kernel<T><<<dim3(plan.blocks, plan.h, plan.segs), kThreads, 0, stream>>>(
      make_params<T>(in, plan), ws_m, ws_l, rows);
  detail::check_launch("selfsim_fwd_kernel");
  selfsim_combine_kernel<<<unsigned((rows + 255) / 256), 256, 0, stream>>>(ws_m, ws_l, rows,
                                                                            plan.h, row_lse);
  detail::check_launch("selfsim_combine_kernel");
}

template <typename T>
void launch_backward(const SelfSimInputs& in, const Plan& plan, const float* row_lse,
                     const float* grad_rows, float* du, float* dscale, float* ws,
                     cudaStream_t stream) {
  const int64_t total = in.v * in.n * in.d;
  const int programs = plan.blocks * plan.h * plan.segs;
  float* du_ws = ws;
  float* partials = ws + total;
  FC_CUDA_CHECK(cudaMemsetAsync(du_ws, 0, sizeof(float) * size_t(total), stream));
  selfsim_bwd_kernel<T><<<dim3(plan.blocks, plan.h, plan.segs), kThreads, 0, stream>>>(
      make_params<T>(in, plan), row_lse, grad_rows, du_ws, partials);
  detail::check_launch("selfsim_bwd_kernel");
  const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 8192));
  selfsim_bwd_finalize_kernel<<<blocks, 256, 0, stream>>>(du_ws, total, in.scale, du);
  detail::check_launch("selfsim_bwd_finalize_kernel");
  selfsim_bwd_scalar_kernel<<<1, kThreads, 0, stream>>>(partials, programs, dscale);
  detail::check_launch("selfsim_bwd_scalar_kernel");
}

}  // namespace multiview_impl

using namespace multiview_impl;

int64_t selfsim_forward_workspace_elems(int64_t v, int64_t n, int64_t d, bool per_view,
                                        int device) {
  check_sizes(v, n, d);
  return forward_elems(make_plan(v, n, per_view, detail::sm_count(device)), v, n);
}

int64_t selfsim_backward_workspace_elems(int64_t v, int64_t n, int64_t d, bool per_view,
                                         int device) {
  check_sizes(v, n, d);
  return backward_elems(make_plan(v, n, per_view, detail::sm_count(device)), v, n, d);
}

void selfsim_rowlse_forward(const SelfSimInputs& in, float* row_lse, float* workspace,
                            int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require(row_lse, "row_lse_ptr");
  require(workspace, "workspace_ptr");
  const int device = detail::device_of(in.u, "u_ptr");
  detail::DeviceScope scope(device);
  const Plan plan = make_plan(in.v, in.n, in.per_view, detail::sm_count(device));
  require_workspace(workspace_elems, forward_elems(plan, in.v, in.n));
  const auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case DType::kFloat32:
      return launch_forward<float>(in, plan, row_lse, workspace, s);
    case DType::kFloat16:
      return launch_forward<__half>(in, plan, row_lse, workspace, s);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(in, plan, row_lse, workspace, s);
  }
}

void selfsim_rowlse_backward(const SelfSimInputs& in, const float* row_lse,
                             const float* grad_rows, float* du, float* dscale, float* workspace,
                             int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require(row_lse, "row_lse_ptr");
  require(grad_rows, "grad_rows_ptr");
  require(du, "du_ptr");
  require(dscale, "dscale_ptr");
  require(workspace, "workspace_ptr");
  const int device = detail::device_of(in.u, "u_ptr");
  detail::DeviceScope scope(device);
  const Plan plan = make_plan(in.v, in.n, in.per_view, detail::sm_count(device));
  require_workspace(workspace_elems, backward_elems(plan, in.v, in.n, in.d));
  const auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case DType::kFloat32:
      return launch_backward<float>(in, plan, row_lse, grad_rows, du, dscale, workspace, s);
    case DType::kFloat16:
      return launch_backward<__half>(in, plan, row_lse, grad_rows, du, dscale, workspace, s);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(in, plan, row_lse, grad_rows, du, dscale,
                                            workspace, s);
  }
}

}  // namespace flashcontrast
