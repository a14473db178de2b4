// CLIP InfoNCE (shared/objectives.md section 1) on the tile engine (tiles.cuh).
//
// S = s * A B^T + b over 64 x 64 tiles (D in chunks of 32), fp32 accumulation.
// GEMM count (one GEMM-equivalent = 2 n^2 d flops): forward 1 (X = A B^T) + backward 3
// (recompute X, P @ B, P^T @ A) = 4, the floor of objectives.md. ds and db are tile-local
// sums over the X the backward recomputes anyway: no extra GEMM. Memory beyond inputs and
// outputs: forward 2 (G + H) n floats; backward (1 + SPLIT) n d + 2 * programs floats.
// bf16/fp16: tensor cores (WMMA); fp32: SIMT FFMA, IEEE products (no TF32).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "flashcontrast/clip.h"
#include "flashcontrast/cuda_check.h"
#include "flashcontrast/tiles.cuh"

namespace flashcontrast {
namespace clip_impl {

using namespace tiles;

constexpr int kBM = kTileM;  // rows of A per tile
constexpr int kBN = kTileN;  // rows of B (columns of S) per tile
constexpr int kBK = kTileK;  // D chunk
constexpr int kMaxSplit = 4;

// Shared-memory layout of both kernels: the tile engine's (TileSmem), then small scratch
// (2 * 64 floats of column partials / tile LSEs + 32 for block sums) and the group ids of
// the tile's 64 rows and 64 columns (int64, used only with groups).
constexpr int kGroupsOff = (2 * 64 + 32) * 4;  // 8-byte aligned
template <typename T>
struct Smem : TileSmem<T, kGroupsOff + (kBM + kBN) * 8> {
  static constexpr int kSmall = TileSmem<T, kGroupsOff + (kBM + kBN) * 8>::kExtraOff;
  static constexpr int kGroups = kSmall + kGroupsOff;
};

// ----------------------------------------------------------------------------- groups
// Optional group ids (n,) int64, nullptr = none: pairs i != j with groups[i] == groups[j]
// are not negatives, S_ij := -inf (forward) and dS_ij := 0 (backward); the diagonal stays.
// Ids of the tile's rows / columns are staged in shared memory (0 outside the matrix:
// padded entries are excluded by bounds anyway). Without groups nothing is loaded and
// the arithmetic is exactly the ungrouped one (the mask test is a uniform branch).

__device__ __forceinline__ void load_group_ids(int64_t* dst, const int64_t* groups, int64_t start,
                                               int64_t n, int count) {
  for (int t = threadIdx.x; t < count; t += kThreads)
    dst[t] = start + t < n ? groups[start + t] : int64_t(0);
}

// True where (row0 + i, col0 + j) is masked out by the groups.
__device__ __forceinline__ bool group_masked(const int64_t* groups, const int64_t* gid_r,
                                             const int64_t* gid_c, int64_t row0, int i,
                                             int64_t col0, int j) {
  return groups != nullptr && row0 + i != col0 + j && gid_r[i] == gid_c[j];
}

// ----------------------------------------------------------------------------- forward
// Grid (G, H): program (g, h) owns row blocks g, g+G, ... and column blocks h, h+H, ...
// For each tile (rb, cb) it owns, with S = s X + b (X = A_rb B_cb^T, 1 GEMM over all tiles):
//   rows    m_i' = max(m_i, max_j S_ij),  l_i' = l_i e^{m_i - m_i'} + sum_j e^{S_ij - m_i'}
//           in registers (two threads per row), stored to ws[h][i] after the row block;
//   columns the same along i, read-modify-written in ws[H + g][j]: entries exclusive to the
//           program (no atomics, deterministic); the first row block writes without reading;
//   diag    S_ii from the tile rb == cb (64 x 64 tiles align the diagonal).
// lse_combine_kernel then merges the H row and G column partials: LSE = m + log l.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    clip_fwd_kernel(Operands<T> p, const int64_t* __restrict__ groups,
                    float* __restrict__ ws_m, float* __restrict__ ws_l,
                    float* __restrict__ diag) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* As = reinterpret_cast<T*>(smem + L::kA);
  T* Bs = reinterpret_cast<T*>(smem + L::kB);
  float* Xs = reinterpret_cast<float*>(smem + L::kX);
  float* part = reinterpret_cast<float*>(smem + L::kSmall);  // [0,64): m, [64,128): l
  int64_t* gid_r = reinterpret_cast<int64_t*>(smem + L::kGroups);
  int64_t* gid_c = gid_r + kBM;

  const int g = blockIdx.x, h = blockIdx.y, G = gridDim.x, H = gridDim.y;
  const int64_t n = p.n_a;
  const int num_rb = int((n + kBM - 1) / kBM), num_cb = int((n + kBN - 1) / kBN);
  const float scale = *p.scale;
  const float bias = p.bias ? *p.bias : 0.0f;
  const int tid = threadIdx.x;
  const int rr = tid / 2, rh = tid % 2;        // row pass: row rr, columns rh + 2c
  const int cc = tid % kBN, ch = tid / kBN;    // column pass: column cc, rows ch*32 + r
  float* col_m = ws_m + int64_t(H + g) * n;
  float* col_l = ws_l + int64_t(H + g) * n;

  for (int rb = g; rb < num_rb; rb += G) {
    const int64_t row0 = int64_t(rb) * kBM;
    float run_m = -INFINITY, run_l = 0.0f;
    for (int cb = h; cb < num_cb; cb += H) {
      const int64_t col0 = int64_t(cb) * kBN;
      // Safe to overwrite: every reader of the previous tile's ids has passed its column
      // pass barrier; tile_logits' barriers publish the new ones.
      if (groups != nullptr) {
        load_group_ids(gid_r, groups, row0, n, kBM);
        load_group_ids(gid_c, groups, col0, n, kBN);
      }
      tile_logits<T>(p, row0, col0, As, Bs, Xs);
      // S of tile entry (r, c), -inf where the groups mask it.
      auto logit = [&](int r, int c) {
        const float s = fmaf(scale, Xs[r * L::kLdX + c], bias);
        return group_masked(groups, gid_r, gid_c, row0, r, col0, c) ? -INFINITY : s;
      };
      const int ncols = int(std::min<int64_t>(kBN, n - col0));
      const int nrows = int(std::min<int64_t>(kBM, n - row0));

      // Rows (padded rows compute finite garbage from zero-filled A and are never stored).
      float tm = -INFINITY;
      for (int c = rh; c < ncols; c += 2) tm = fmaxf(tm, logit(rr, c));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
      const float tmu = finite_or_zero(tm);
      float tl = 0.0f;
      for (int c = rh; c < ncols; c += 2) tl += expf(logit(rr, c) - tmu);
      tl += __shfl_xor_sync(0xffffffffu, tl, 1);
      lse_merge(run_m, run_l, tm, tl);

      // Columns: two half-columns of 32 rows, merged through shared memory.
      float cm = -INFINITY, cl = 0.0f;
      const int r_end = std::min(nrows, ch * 32 + 32);
      for (int r = ch * 32; r < r_end; ++r) cm = fmaxf(cm, logit(r, cc));
      const float cmu = finite_or_zero(cm);
      for (int r = ch * 32; r < r_end; ++r) cl += expf(logit(r, cc) - cmu);
      if (ch == 1) {
        part[cc] = cm;
        part[kBN + cc] = cl;
      }
      __syncthreads();
      if (ch == 0 && cc < ncols) {
        lse_merge(cm, cl, part[cc], part[kBN + cc]);
        const int64_t j = col0 + cc;
        if (rb != g) lse_merge(cm, cl, col_m[j], col_l[j]);  // not this program's first visit
        col_m[j] = cm;
        col_l[j] = cl;
        if (rb == cb) diag[j] = fmaf(scale, Xs[cc * L::kLdX + cc], bias);  // row0 == col0
      }
      // The next tile_logits starts with a barrier before As/Bs/Xs/part are reused.
    }
    if (rh == 0 && row0 + rr < n) {
      ws_m[int64_t(h) * n + row0 + rr] = run_m;
      ws_l[int64_t(h) * n + row0 + rr] = run_l;
    }
  }
}

// row_lse from partials [0, H), col_lse from [H, H + G): LSE_k (m_k + log l_k).
__global__ void lse_combine_kernel(const float* __restrict__ ws_m, const float* __restrict__ ws_l,
                                   int64_t n, int H, int G, float* __restrict__ row_lse,
                                   float* __restrict__ col_lse) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bool cols = blockIdx.y == 1;
  const int k0 = cols ? H : 0, k1 = cols ? H + G : H;
  float m = -INFINITY, l = 0.0f;
  for (int k = k0; k < k1; ++k) lse_merge(m, l, ws_m[int64_t(k) * n + i], ws_l[int64_t(k) * n + i]);
  (cols ? col_lse : row_lse)[i] = m + logf(l);
}

// ----------------------------------------------------------------------------- backward
// Grid (column blocks, SPLIT): program (cb, sp) visits row blocks rb = sp (mod SPLIT),
// staggered by cb so that concurrent programs add into different rows of dA. Per tile:
//   X  = A_rb B_cb^T                                        recompute     (1 GEMM in all)
//   P  = e^{S - row_lse_i} + e^{S - col_lse_j} - 2[i == j]  (0 outside), in [-2, 2]: dS = c P
//        with c = grad / (2n); P is rounded to T for the tensor-core products
//   dA_ws[rb] += P @ B_cb     fp32 atomics, per D chunk                      (1 GEMM)
//   dB_ws[sp][cb] += P^T @ A_rb   plain read-modify-write: rows of cb in slice sp belong
//                                 to this program alone (deterministic)      (1 GEMM)
//   ds += sum P * X,  db += sum P  (thread-local, then one CTA sum per program)
// clip_bwd_finalize_kernel: da = T(c s dA_ws), db = T(c s sum_sp dB_ws[sp]);
// clip_bwd_scalars_kernel: dscale = c sum ds partials, dbias = c sum db partials.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    clip_bwd_kernel(Operands<T> p, const int64_t* __restrict__ groups,
                    const float* __restrict__ row_lse,
                    const float* __restrict__ col_lse, float* __restrict__ da_ws,
                    float* __restrict__ db_ws, float* __restrict__ partials) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* As = reinterpret_cast<T*>(smem + L::kA);
  T* Bs = reinterpret_cast<T*>(smem + L::kB);
  float* Xs = reinterpret_cast<float*>(smem + L::kX);
  T* Ps = reinterpret_cast<T*>(smem + L::kP);
  float* lse_r = reinterpret_cast<float*>(smem + L::kSmall);
  float* lse_c = lse_r + kBM;
  float* red = lse_c + kBN;
  int64_t* gid_r = reinterpret_cast<int64_t*>(smem + L::kGroups);
  int64_t* gid_c = gid_r + kBM;

  const int cb = blockIdx.x, sp = blockIdx.y, split = gridDim.y;
  const int64_t n = p.n_a, d = p.d;
  const int num_rb = int((n + kBM - 1) / kBM);
  const int count = (num_rb - sp + split - 1) / split;  // sp < num_rb by construction
  const float scale = *p.scale;
  const float bias = p.bias ? *p.bias : 0.0f;
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(cb) * kBN;
  float* db_slice = db_ws + int64_t(sp) * n * d;

  if (tid < kBN) lse_c[tid] = col0 + tid < n ? col_lse[col0 + tid] : 0.0f;
  if (groups != nullptr) load_group_ids(gid_c, groups, col0, n, kBN);
  float ds_acc = 0.0f, dbias_acc = 0.0f;

  for (int t = 0; t < count; ++t) {
    const int rb = sp + ((t + cb) % count) * split;
    const int64_t row0 = int64_t(rb) * kBM;
    if (tid < kBM) lse_r[tid] = row0 + tid < n ? row_lse[row0 + tid] : 0.0f;
    if (groups != nullptr) load_group_ids(gid_r, groups, row0, n, kBM);
    tile_logits<T>(p, row0, col0, As, Bs, Xs);  // its barriers also publish lse_r/c, gid_r/c

    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int i = idx / kBN, j = idx % kBN;
      const int64_t gi = row0 + i, gj = col0 + j;
      const float x = Xs[i * L::kLdX + j];
      float pv = 0.0f;
      if (gi < n && gj < n && !group_masked(groups, gid_r, gid_c, row0, i, col0, j)) {
        const float s = fmaf(scale, x, bias);
        pv = expf(s - lse_r[i]) + expf(s - lse_c[j]) - (gi == gj ? 2.0f : 0.0f);
        ds_acc = fmaf(pv, x, ds_acc);
        dbias_acc += pv;
      }
      Ps[i * L::kLdP + j] = from_float<T>(pv);  // fp32: in place over X (same thread, same slot)
    }

    for (int64_t k0 = 0; k0 < d; k0 += kBK) {
      __syncthreads();  // P complete; previous chunk's readers of As/Bs done
      load_tile<T, kBM, kBK>(As, L::kLdK, p.a, p.a_stride0, p.a_stride1, row0, n, k0, d);
      load_tile<T, kBN, kBK>(Bs, L::kLdK, p.b, p.b_stride0, p.b_stride1, col0, n, k0, d);
      __syncthreads();
      TileAcc<T, kBM, kBK> acc_a;  // P (BM x BN) @ B chunk (BN x BK)
      acc_a.zero();
      acc_a.template mma<kBN, true, true>(Ps, L::kLdP, Bs, L::kLdK);
      TileAcc<T, kBN, kBK> acc_b;  // P^T (BN x BM) @ A chunk (BM x BK)
      acc_b.zero();
      acc_b.template mma<kBM, false, true>(Ps, L::kLdP, As, L::kLdK);
      // Staging (WMMA only) goes through Xs: dead once P is built, separate from Ps there.
      acc_a.for_each(Xs, L::kLdX, [&](int i, int c, float v) {
        if (row0 + i < n && k0 + c < d) atomicAdd(da_ws + (row0 + i) * d + k0 + c, v);
      });
      acc_b.for_each(Xs, L::kLdX, [&](int j, int c, float v) {
        if (col0 + j < n && k0 + c < d) db_slice[(col0 + j) * d + k0 + c] += v;
      });
    }
    __syncthreads();  // before the next tile overwrites lse_r
  }

  const int programs = gridDim.x * gridDim.y;
  const int pid = cb * split + sp;
  const float ds_total = block_sum(ds_acc, red);
  if (tid == 0) partials[pid] = ds_total;
  const float db_total = block_sum(dbias_acc, red);
  if (tid == 0) partials[programs + pid] = db_total;
}

template <typename T>
__global__ void clip_bwd_finalize_kernel(const float* __restrict__ da_ws,
                                         const float* __restrict__ db_ws, int split, int64_t nd,
                                         const float* __restrict__ scale,
                                         const float* __restrict__ grad, float inv_2n,
                                         T* __restrict__ da, T* __restrict__ db) {
  const float cs = *grad * inv_2n * *scale;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nd; i += stride) {
    da[i] = from_float<T>(cs * da_ws[i]);
    float acc = 0.0f;
    for (int s = 0; s < split; ++s) acc += db_ws[s * nd + i];
    db[i] = from_float<T>(cs * acc);
  }
}

// One CTA, fixed order: deterministic.
__global__ void __launch_bounds__(kThreads)
    clip_bwd_scalars_kernel(const float* __restrict__ partials, int programs,
                            const float* __restrict__ grad, float inv_2n,
                            float* __restrict__ dscale, float* __restrict__ dbias) {
  __shared__ float red[kThreads / 32];
  float ds = 0.0f, db = 0.0f;
  for (int i = threadIdx.x; i < programs; i += kThreads) {
    ds += partials[i];
    db += partials[programs + i];
  }
  const float c = *grad * inv_2n;
  ds = block_sum(ds, red);
  if (threadIdx.x == 0) *dscale = c * ds;
  db = block_sum(db, red);
  if (threadIdx.x == 0) *dbias = c * db;
}

// ----------------------------------------------------------------------------- launchers

struct ForwardPlan {
  int g, h;
};

ForwardPlan forward_plan(int64_t n, int sms) {
  const int64_t blocks = (n + kBM - 1) / kBM;  // row blocks == column blocks (kBM == kBN)
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t g = std::min(blocks, target);
  const int64_t h = std::min(blocks, std::max<int64_t>(1, target / g));
  return {int(g), int(h)};
}

int backward_split(int64_t n, int sms) {
  const int64_t blocks = (n + kBM - 1) / kBM;
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t want = (target + blocks - 1) / blocks;
  return int(std::max<int64_t>(1, std::min({blocks, want, int64_t(kMaxSplit)})));
}

void check_inputs(const PairInputs& in) {
  if (in.n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(in.n));
  if (in.d < 1) throw std::invalid_argument("d must be >= 1, got " + std::to_string(in.d));
  if (in.n > (int64_t(1) << 31) - kBM) throw std::invalid_argument("n is too large");
  if (!in.a) throw std::invalid_argument("a_ptr is null");
  if (!in.b) throw std::invalid_argument("b_ptr is null");
  if (!in.scale) throw std::invalid_argument("scale_ptr is null");
}

void require(const void* ptr, const char* name) {
  if (!ptr) throw std::invalid_argument(std::string(name) + " is null");
}

template <typename T>
Operands<T> make_params(const PairInputs& in) {
  return Operands<T>{static_cast<const T*>(in.a), static_cast<const T*>(in.b), in.n, in.n,
                       in.d, in.a_stride0, in.a_stride1, in.b_stride0, in.b_stride1,
                       in.scale, in.bias};
}

template <typename T>
void launch_forward(const PairInputs& in, ForwardPlan plan, float* row_lse, float* col_lse,
                    float* diag, float* ws, cudaStream_t stream) {
  const int64_t n = in.n;
  float* ws_m = ws;
  float* ws_l = ws + int64_t(plan.g + plan.h) * n;
  clip_fwd_kernel<T><<<dim3(plan.g, plan.h), kThreads, 0, stream>>>(
      make_params<T>(in), in.groups, ws_m, ws_l, diag);
  detail::check_launch("clip_fwd_kernel");
  const unsigned blocks = unsigned((n + 255) / 256);
  lse_combine_kernel<<<dim3(blocks, 2), 256, 0, stream>>>(ws_m, ws_l, n, plan.h, plan.g,
                                                          row_lse, col_lse);
  detail::check_launch("lse_combine_kernel");
}

template <typename T>
void launch_backward(const PairInputs& in, int split, const float* row_lse,
                     const float* col_lse, const float* grad, void* da, void* db,
                     float* dscale, float* dbias, float* ws, cudaStream_t stream) {
  const int64_t n = in.n, nd = in.n * in.d;
  const int num_cb = int((n + kBN - 1) / kBN);
  const int programs = num_cb * split;
  float* da_ws = ws;
  float* db_ws = ws + nd;
  float* partials = ws + (1 + int64_t(split)) * nd;
  FC_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * (1 + size_t(split)) * size_t(nd), stream));
  clip_bwd_kernel<T><<<dim3(num_cb, split), kThreads, 0, stream>>>(
      make_params<T>(in), in.groups, row_lse, col_lse, da_ws, db_ws, partials);
  detail::check_launch("clip_bwd_kernel");
  const float inv_2n = 0.5f / float(n);
  const unsigned blocks = unsigned(std::min<int64_t>((nd + 255) / 256, 8192));
  clip_bwd_finalize_kernel<T><<<blocks, 256, 0, stream>>>(
      da_ws, db_ws, split, nd, in.scale, grad, inv_2n, static_cast<T*>(da), static_cast<T*>(db));
  detail::check_launch("clip_bwd_finalize_kernel");
  clip_bwd_scalars_kernel<<<1, kThreads, 0, stream>>>(partials, programs, grad, inv_2n, dscale,
                                                       dbias);
  detail::check_launch("clip_bwd_scalars_kernel");
}

}  // namespace clip_impl

// Explicit instantiations: the launchers (and through them the kernels) for every dtype.
#define FC_INSTANTIATE_CLIP(T)                                                              \
  template void clip_impl::launch_forward<T>(const PairInputs&, clip_impl::ForwardPlan,    \
                                             float*, float*, float*, float*, cudaStream_t); \
  template void clip_impl::launch_backward<T>(const PairInputs&, int, const float*,          \
                                              const float*, const float*, void*, void*,      \
                                              float*, float*, float*, cudaStream_t);
FC_INSTANTIATE_CLIP(float)
FC_INSTANTIATE_CLIP(__half)
FC_INSTANTIATE_CLIP(__nv_bfloat16)
#undef FC_INSTANTIATE_CLIP

using namespace clip_impl;

int64_t clip_forward_workspace_elems(int64_t n, int64_t d, int device) {
  if (n < 1 || d < 1) throw std::invalid_argument("n and d must be >= 1");
  const ForwardPlan plan = forward_plan(n, detail::sm_count(device));
  return 2 * int64_t(plan.g + plan.h) * n;
}

int64_t clip_backward_workspace_elems(int64_t n, int64_t d, int device) {
  if (n < 1 || d < 1) throw std::invalid_argument("n and d must be >= 1");
  const int split = backward_split(n, detail::sm_count(device));
  const int64_t num_cb = (n + kBN - 1) / kBN;
  return (1 + int64_t(split)) * n * d + 2 * num_cb * split;
}

void clip_forward(const PairInputs& in, float* row_lse, float* col_lse, float* diag,
                  float* workspace, int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require(row_lse, "row_lse_ptr");
  require(col_lse, "col_lse_ptr");
  require(diag, "diag_ptr");
  require(workspace, "workspace_ptr");
  const int device = detail::device_of(in.a, "a_ptr");
  detail::DeviceScope scope(device);
  const ForwardPlan plan = forward_plan(in.n, detail::sm_count(device));
  const int64_t need = 2 * int64_t(plan.g + plan.h) * in.n;
  if (workspace_elems < need) {
    throw std::invalid_argument("workspace has " + std::to_string(workspace_elems) +
                                " floats, needs " + std::to_string(need));
  }
  const auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case DType::kFloat32:
      return launch_forward<float>(in, plan, row_lse, col_lse, diag, workspace, s);
    case DType::kFloat16:
      return launch_forward<__half>(in, plan, row_lse, col_lse, diag, workspace, s);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(in, plan, row_lse, col_lse, diag, workspace, s);
  }
}

void clip_backward(const PairInputs& in, const float* row_lse, const float* col_lse,
                   const float* grad, void* da, void* db, float* dscale, float* dbias,
                   float* workspace, int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require(row_lse, "row_lse_ptr");
  require(col_lse, "col_lse_ptr");
  require(grad, "grad_ptr");
  require(da, "da_ptr");
  require(db, "db_ptr");
  require(dscale, "dscale_ptr");
  require(dbias, "dbias_ptr");
  require(workspace, "workspace_ptr");
  const int device = detail::device_of(in.a, "a_ptr");
  detail::DeviceScope scope(device);
  const int split = backward_split(in.n, detail::sm_count(device));
  const int64_t num_cb = (in.n + kBN - 1) / kBN;
  const int64_t need = (1 + int64_t(split)) * in.n * in.d + 2 * num_cb * split;
  if (workspace_elems < need) {
    throw std::invalid_argument("workspace has " + std::to_string(workspace_elems) +
                                " floats, needs " + std::to_string(need));
  }
  const auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case DType::kFloat32:
      return launch_backward<float>(in, split, row_lse, col_lse, grad, da, db, dscale, dbias,
                                    workspace, s);
    case DType::kFloat16:
      return launch_backward<__half>(in, split, row_lse, col_lse, grad, da, db, dscale, dbias,
                                     workspace, s);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(in, split, row_lse, col_lse, grad, da, db, dscale,
                                            dbias, workspace, s);
  }
}

}  // namespace flashcontrast
