// SigLIP (shared/objectives.md section 2) on the tile engine (tiles.cuh).
//
// S = s * A B^T + b over 64 x 64 tiles (D in chunks of 32), fp32 accumulation; the same
// tiles, grids and workspaces as CLIP (kernels/clip.cu), with the epilogues
//   forward   sum_ij softplus(-z_ij S_ij)        (a plain sum: no statistics to save)
//   backward  Q_ij = sigmoid(S_ij) - [i == j]    (dS = (grad / n) Q), in [-1, 1]
// GEMM count: forward 1 + backward 3 (recompute X, Q @ B, Q^T @ A) = 4, the floor.
// Memory beyond inputs and outputs: forward G H floats; backward (1 + SPLIT) n d + 2
// programs floats. bf16/fp16: tensor cores (WMMA), Q rounded to T (|Q| <= 1, no per-tile
// normalization needed); fp32: SIMT FFMA, IEEE products (no TF32).
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "flashcontrast/cuda_check.h"
#include "flashcontrast/siglip.h"
#include "flashcontrast/tiles.cuh"

namespace flashcontrast {
namespace siglip_impl {

using namespace tiles;

constexpr int kBM = kTileM;
constexpr int kBN = kTileN;
constexpr int kBK = kTileK;
constexpr int kMaxSplit = 4;

// The tile engine's layout (TileSmem: Q overwrites X in place for fp32, is a separate T
// tile for WMMA), then block-sum scratch.
template <typename T>
struct Smem : TileSmem<T, 32 * 4> {
  static constexpr int kSmall = TileSmem<T, 32 * 4>::kExtraOff;
};

// ----------------------------------------------------------------------------- forward
// Grid (G, H) as CLIP's forward: program (g, h) sums softplus(-z S) over its tiles
// (rb = g mod G, cb = h mod H), per thread (one tile sum at a time, then into the running
// sum), then one CTA sum into partials[g H + h]. siglip_sum_kernel adds the G H partials
// in a fixed order: the total is deterministic run to run.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    siglip_fwd_kernel(Operands<T> p, float* __restrict__ partials) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* As = reinterpret_cast<T*>(smem + L::kA);
  T* Bs = reinterpret_cast<T*>(smem + L::kB);
  float* Xs = reinterpret_cast<float*>(smem + L::kX);
  float* red = reinterpret_cast<float*>(smem + L::kSmall);

  const int g = blockIdx.x, h = blockIdx.y, G = gridDim.x, H = gridDim.y;
  const int64_t n = p.n_a;
  const int num_rb = int((n + kBM - 1) / kBM), num_cb = int((n + kBN - 1) / kBN);
  const float scale = *p.scale;
  const float bias = p.bias ? *p.bias : 0.0f;
  float acc = 0.0f;

  for (int rb = g; rb < num_rb; rb += G) {
    const int64_t row0 = int64_t(rb) * kBM;
    for (int cb = h; cb < num_cb; cb += H) {
      const int64_t col0 = int64_t(cb) * kBN;
      tile_logits<T>(p, row0, col0, As, Bs, Xs);
      float tsum = 0.0f;
      for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, j = idx % kBN;
        const int64_t gi = row0 + i, gj = col0 + j;
        if (gi < n && gj < n) {
          const float s = fmaf(scale, Xs[i * L::kLdX + j], bias);
          tsum += softplus_stable(gi == gj ? -s : s);  // softplus(-z S)
        }
      }
      acc += tsum;
      // The next tile_logits starts with a barrier before Xs is overwritten.
    }
  }
  const float total = block_sum(acc, red);
  if (threadIdx.x == 0) partials[g * H + h] = total;
}

// One CTA, fixed order: out = sum of `count` partials (deterministic).
__global__ void __launch_bounds__(kThreads)
    siglip_sum_kernel(const float* __restrict__ partials, int count, float* __restrict__ out) {
  __shared__ float red[kThreads / 32];
  float acc = 0.0f;
  for (int i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  acc = block_sum(acc, red);
  if (threadIdx.x == 0) *out = acc;
}

// ----------------------------------------------------------------------------- backward
// CLIP's backward (clip.cu) with Q = sigmoid(S) - [i == j] in place of P: grid (column
// blocks, SPLIT), program (cb, sp) visits row blocks rb = sp (mod SPLIT), staggered by cb.
//   X = A_rb B_cb^T (recompute); Q (0 outside), the diagonal as -sigmoid(-S_ii) (exact
//   where sigmoid(S_ii) rounds to 1); dA_ws[rb] += Q @ B_cb (fp32 atomics);
//   dB_ws[sp][cb] += Q^T @ A_rb (per-program read-modify-write, deterministic);
//   ds += sum Q X, db += sum Q (one CTA sum per program).
// Finalize: da = T(c s dA_ws), db = T(c s sum_sp dB_ws[sp]), dscale = c sum ds,
// dbias = c sum db, with c = grad / n.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    siglip_bwd_kernel(Operands<T> p, float* __restrict__ da_ws, float* __restrict__ db_ws,
                      float* __restrict__ partials) {
  using L = Smem<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* As = reinterpret_cast<T*>(smem + L::kA);
  T* Bs = reinterpret_cast<T*>(smem + L::kB);
  float* Xs = reinterpret_cast<float*>(smem + L::kX);
  T* Ps = reinterpret_cast<T*>(smem + L::kP);
  float* red = reinterpret_cast<float*>(smem + L::kSmall);

  const int cb = blockIdx.x, sp = blockIdx.y, split = gridDim.y;
  const int64_t n = p.n_a, d = p.d;
  const int num_rb = int((n + kBM - 1) / kBM);
  const int count = (num_rb - sp + split - 1) / split;  // sp < num_rb by construction
  const float scale = *p.scale;
  const float bias = p.bias ? *p.bias : 0.0f;
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(cb) * kBN;
  float* db_slice = db_ws + int64_t(sp) * n * d;
  float ds_acc = 0.0f, dbias_acc = 0.0f;

  for (int t = 0; t < count; ++t) {
    const int rb = sp + ((t + cb) % count) * split;
    const int64_t row0 = int64_t(rb) * kBM;
    tile_logits<T>(p, row0, col0, As, Bs, Xs);

    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int i = idx / kBN, j = idx % kBN;
      const int64_t gi = row0 + i, gj = col0 + j;
      const float x = Xs[i * L::kLdX + j];
      float q = 0.0f;
      if (gi < n && gj < n) {
        const float s = fmaf(scale, x, bias);
        q = gi == gj ? -sigmoid_stable(-s) : sigmoid_stable(s);
        ds_acc = fmaf(q, x, ds_acc);
        dbias_acc += q;
      }
      Ps[i * L::kLdP + j] = from_float<T>(q);  // fp32: in place over X (same thread, slot)
    }

    for (int64_t k0 = 0; k0 < d; k0 += kBK) {
      __syncthreads();  // Q complete; previous chunk's readers of As/Bs done
      load_tile<T, kBM, kBK>(As, L::kLdK, p.a, p.a_stride0, p.a_stride1, row0, n, k0, d);
      load_tile<T, kBN, kBK>(Bs, L::kLdK, p.b, p.b_stride0, p.b_stride1, col0, n, k0, d);
      __syncthreads();
      TileAcc<T, kBM, kBK> acc_a;  // Q (BM x BN) @ B chunk (BN x BK)
      acc_a.zero();
      acc_a.template mma<kBN, true, true>(Ps, L::kLdP, Bs, L::kLdK);
      TileAcc<T, kBN, kBK> acc_b;  // Q^T (BN x BM) @ A chunk (BM x BK)
      acc_b.zero();
      acc_b.template mma<kBM, false, true>(Ps, L::kLdP, As, L::kLdK);
      // Staging (WMMA only) through Xs: dead once Q is built, separate from Ps there.
      acc_a.for_each(Xs, L::kLdX, [&](int i, int c, float v) {
        if (row0 + i < n && k0 + c < d) atomicAdd(da_ws + (row0 + i) * d + k0 + c, v);
      });
      acc_b.for_each(Xs, L::kLdX, [&](int j, int c, float v) {
        if (col0 + j < n && k0 + c < d) db_slice[(col0 + j) * d + k0 + c] += v;
      });
    }
    __syncthreads();  // before the next tile overwrites Xs / Ps
  }

  const int programs = gridDim.x * gridDim.y;
  const int pid = cb * split + sp;
  const float ds_total = block_sum(ds_acc, red);
  if (tid == 0) partials[pid] = ds_total;
  const float db_total = block_sum(dbias_acc, red);
  if (tid == 0) partials[programs + pid] = db_total;
}

template <typename T>
__global__ void siglip_bwd_finalize_kernel(const float* __restrict__ da_ws,
                                           const float* __restrict__ db_ws, int split,
                                           int64_t nd, const float* __restrict__ scale,
                                           const float* __restrict__ grad, float inv_n,
                                           T* __restrict__ da, T* __restrict__ db) {
  const float cs = *grad * inv_n * *scale;
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
    siglip_bwd_scalars_kernel(const float* __restrict__ partials, int programs,
                              const float* __restrict__ grad, float inv_n,
                              float* __restrict__ dscale, float* __restrict__ dbias) {
  __shared__ float red[kThreads / 32];
  float ds = 0.0f, db = 0.0f;
  for (int i = threadIdx.x; i < programs; i += kThreads) {
    ds += partials[i];
    db += partials[programs + i];
  }
  const float c = *grad * inv_n;
  ds = block_sum(ds, red);
  if (threadIdx.x == 0) *dscale = c * ds;
  db = block_sum(db, red);
  if (threadIdx.x == 0) *dbias = c * db;
}

// ----------------------------------------------------------------------------- launchers

struct ForwardPlan {
  int g, h;
};

ForwardPlan forward_plan(int64_t n, int sms) {  // clip.cu's plan
  const int64_t blocks = (n + kBM - 1) / kBM;
  const int64_t target = 2 * int64_t(std::max(sms, 1));
  const int64_t g = std::min(blocks, target);
  const int64_t h = std::min(blocks, std::max<int64_t>(1, target / g));
  return {int(g), int(h)};
}

int backward_split(int64_t n, int sms) {  // clip.cu's split
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

void require_workspace(int64_t have, int64_t need) {
  if (have < need) {
    throw std::invalid_argument("workspace has " + std::to_string(have) + " floats, needs " +
                                std::to_string(need));
  }
}

template <typename T>
Operands<T> make_params(const PairInputs& in) {
  return Operands<T>{static_cast<const T*>(in.a), static_cast<const T*>(in.b), in.n, in.n,
                       in.d, in.a_stride0, in.a_stride1, in.b_stride0, in.b_stride1,
                       in.scale, in.bias};
}

template <typename T>
void launch_forward(const PairInputs& in, ForwardPlan plan, float* total, float* ws,
                    cudaStream_t stream) {
  siglip_fwd_kernel<T><<<dim3(plan.g, plan.h), kThreads, 0, stream>>>(make_params<T>(in), ws);
  detail::check_launch("siglip_fwd_kernel");
  siglip_sum_kernel<<<1, kThreads, 0, stream>>>(ws, plan.g * plan.h, total);
  detail::check_launch("siglip_sum_kernel");
}

template <typename T>
void launch_backward(const PairInputs& in, int split, const float* grad, void* da, void* db,
                     float* dscale, float* dbias, float* ws, cudaStream_t stream) {
  const int64_t n = in.n, nd = in.n * in.d;
  const int num_cb = int((n + kBN - 1) / kBN);
  const int programs = num_cb * split;
  float* da_ws = ws;
  float* db_ws = ws + nd;
  float* partials = ws + (1 + int64_t(split)) * nd;
  FC_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * (1 + size_t(split)) * size_t(nd), stream));
  siglip_bwd_kernel<T><<<dim3(num_cb, split), kThreads, 0, stream>>>(make_params<T>(in), da_ws,
                                                                       db_ws, partials);
  detail::check_launch("siglip_bwd_kernel");
  const float inv_n = 1.0f / float(n);
  const unsigned blocks = unsigned(std::min<int64_t>((nd + 255) / 256, 8192));
  siglip_bwd_finalize_kernel<T><<<blocks, 256, 0, stream>>>(
      da_ws, db_ws, split, nd, in.scale, grad, inv_n, static_cast<T*>(da), static_cast<T*>(db));
  detail::check_launch("siglip_bwd_finalize_kernel");
  siglip_bwd_scalars_kernel<<<1, kThreads, 0, stream>>>(partials, programs, grad, inv_n, dscale,
                                                         dbias);
  detail::check_launch("siglip_bwd_scalars_kernel");
}

}  // namespace siglip_impl

using namespace siglip_impl;

int64_t siglip_forward_workspace_elems(int64_t n, int64_t d, int device) {
  if (n < 1 || d < 1) throw std::invalid_argument("n and d must be >= 1");
  const ForwardPlan plan = forward_plan(n, detail::sm_count(device));
  return int64_t(plan.g) * plan.h;
}

int64_t siglip_backward_workspace_elems(int64_t n, int64_t d, int device) {
  if (n < 1 || d < 1) throw std::invalid_argument("n and d must be >= 1");
  const int split = backward_split(n, detail::sm_count(device));
  const int64_t num_cb = (n + kBN - 1) / kBN;
  return (1 + int64_t(split)) * n * d + 2 * num_cb * split;
}

void siglip_forward(const PairInputs& in, float* total, float* workspace,
                    int64_t workspace_elems, void* stream) {
  check_inputs(in);
  require(total, "total_ptr");
  require(workspace, "workspace_ptr");
  const int device = detail::device_of(in.a, "a_ptr");
  detail::DeviceScope scope(device);
  const ForwardPlan plan = forward_plan(in.n, detail::sm_count(device));
  require_workspace(workspace_elems, int64_t(plan.g) * plan.h);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case DType::kFloat32:
      return launch_forward<float>(in, plan, total, workspace, s);
    case DType::kFloat16:
      return launch_forward<__half>(in, plan, total, workspace, s);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(in, plan, total, workspace, s);
  }
}

void siglip_backward(const PairInputs& in, const float* grad, void* da, void* db,
                     float* dscale, float* dbias, float* workspace, int64_t workspace_elems,
                     void* stream) {
  check_inputs(in);
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
  require_workspace(workspace_elems, (1 + int64_t(split)) * in.n * in.d + 2 * num_cb * split);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (in.dtype) {
    case DType::kFloat32:
      return launch_backward<float>(in, split, grad, da, db, dscale, dbias, workspace, s);
    case DType::kFloat16:
      return launch_backward<__half>(in, split, grad, da, db, dscale, dbias, workspace, s);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(in, split, grad, da, db, dscale, dbias, workspace,
                                            s);
  }
}

}  // namespace flashcontrast
