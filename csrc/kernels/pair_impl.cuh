// The pair engine's kernels, launchers, options and checks, shared by pair.cu (the entry
// points) and pair_float32.cu / pair_float16.cu / pair_bfloat16.cu (one dtype's
// instantiations each). Everything in pair_impl is internal to each translation unit (an
// unnamed namespace): only the typed halves below link across them.
//
// The pair engine (python/flashcontrast/backends/pair.py, the contract; docs/engine.md) on
// the tile engine (tiles.cuh): ONE forward and ONE backward kernel, templated on the dtype
// T, the epilogue E (softmax / rows / sigmoid) and the options O (a bitmask: positives,
// exclude_self, period > 0, groups, bias, positive-logit override), so CLIP, SigLIP,
// InfoNCE, the multi-view losses and Symile "n" are one sweep.
//
// a (n, d) rows against b (m, d) columns, any strides, 64 x 64 tiles of S = s A B^T + b,
// D in chunks of 32, fp32 accumulation (WMMA for fp16/bf16, SIMT FFMA for fp32: IEEE
// products, no TF32). GEMM count: forward 1 (X = A B^T), backward 3 (recompute X, dS B,
// dS^T A): the floor. Entry sets per tile from integers (tile_sets): global row
// row_offset + row0 + i equals global column col_offset + col0 + j iff j - i equals the
// tile's `diag` (an int, or kFar when the tiles do not meet); samples (k mod period) and
// group ids of the tile's 64 rows / 64 columns staged in shared memory. No n x m mask.
//
// Which instantiations exist: kForms below. A request whose options have no
// instantiation of their own runs the smallest compiled superset with neutral values
// (bias 0, no exclusion diagonal, period 0 == sample k itself, group ids that never meet):
// the same arithmetic bit for bit, so every option set runs and the common ones run
// specialized.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "flashcontrast/cuda_check.h"
#include "flashcontrast/pair.h"
#include "flashcontrast/tiles.cuh"
#include "common.cuh"

namespace flashcontrast {
namespace {
namespace pair_impl {

using namespace tiles;
using namespace common;

constexpr int kBM = kTileM, kBN = kTileN, kBK = kTileK;
constexpr int kMaxSplit = 4;
constexpr int kFar = 1 << 30;  // a `diag` no tile entry (|j - i| < 64) matches
// Register budgets (__launch_bounds__ minimum CTAs per SM): without one, ptxas picks an
// occupancy target per instantiation and spills a few words to meet it in some (seen on
// sm_90a: 4-24 bytes). Forward: 3 CTAs (<= 168 registers); backward, whose three tile
// products keep two accumulators and their staging live: 2 CTAs (<= 255 registers).
constexpr int kFwdBlocksPerSm = 3, kBwdBlocksPerSm = 2;

enum : int { kSoftmax = 0, kRows = 1, kSigmoid = 2 };
enum : unsigned {
  kPos = 1u,        // positives
  kExcl = 2u,       // exclude_self
  kPeriod = 4u,     // period > 0: samples staged per tile
  kGroups = 8u,     // group masks
  kBias = 16u,      // S = s X + b
  kOverride = 32u,  // positive_logits
  kNeutral = kExcl | kPeriod | kGroups | kBias,  // options a superset may carry neutrally
};

// Device-side description of one sweep (the host's PairParams, typed, options resolved).
template <typename T>
struct Sweep {
  Operands<T> op;  // a, b, n_a = n, n_b = m, d, strides, scale, bias (nullptr: 0)
  int64_t row_offset, col_offset;
  int64_t period;  // 0: sample(k) = k
  bool exclude_self;
  const int64_t* row_groups;  // nullptr with kGroups: ids that never meet (neutral)
  const int64_t* col_groups;
  const float* pos_logits;
  const float* x;  // (n, m) fp32 X as a GEMM wrote it (the panel path), or nullptr
};

// The tile's X = A_rb B_cb^T into Xs: multiplied (tile_logits), or on the panel path read
// from the GEMM's output p.x (zero outside the sweep). Either ends with a barrier that
// publishes Xs and the tables staged before it.
template <typename T>
__device__ __forceinline__ void tile_x(const Sweep<T>& p, int64_t row0, int64_t col0,
                                       T* As, T* Bs, float* Xs) {
  if (p.x == nullptr) {
    tile_logits<T>(p.op, row0, col0, As, Bs, Xs);
    return;
  }
  using L = TileSmem<T>;
  const int64_t n = p.op.n_a, m = p.op.n_b;
  __syncthreads();  // the previous readers of Xs are done
  for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kThreads) {
    const int i = idx / kTileN, j = idx % kTileN;
    const int64_t r = row0 + i, c = col0 + j;
    Xs[i * L::kLdX + j] = (r < n && c < m) ? p.x[r * m + c] : 0.0f;
  }
  __syncthreads();
}

// Shared memory beyond TileSmem: per-tile tables (int64 samples and group ids of the 64
// rows / 64 columns), per-row and per-column fp32 vectors, block-reduction scratch.
constexpr int kRowVecs = 8, kColVecs = 6;
constexpr int kSampR = 0, kSampC = kSampR + kBM * 8, kGidR = kSampC + kBN * 8,
              kGidC = kGidR + kBM * 8, kVecR = kGidC + kBN * 8,
              kVecC = kVecR + kRowVecs * kBM * 4, kRed = kVecC + kColVecs * kBN * 4,
              kExtraBytes = kRed + 32 * 4;
template <typename T>
using Layout = TileSmem<T, kExtraBytes>;

// Row vectors (backward): max, log sum of the row pair and the positive pair, their
// coefficients, the positive logits; column vectors (backward) the same without logits.
// The forward uses the column vectors as the column pass's half-tile partials.
enum { kRMax = 0, kRLog, kPMax, kPLog, kGr, kGpr, kPl };
enum { kCMax = 0, kCLog, kCpMax, kCpLog, kGc, kGpc };

// The pair kernels' shared memory (Layout<T>): the tile engine's regions and, in its extra
// bytes, the per-tile tables (samples, group ids), the row and column vectors (vc: the
// forward's column half-tile partials) with the row's positive logits, and the
// block-reduction scratch.
template <typename T>
struct PairSmem : TileViews<T, kExtraBytes> {
  int64_t *samp_r, *samp_c, *gid_r, *gid_c;
  float *vr, *vc, *red, *pl_r;

  __device__ __forceinline__ explicit PairSmem(unsigned char* smem)
      : TileViews<T, kExtraBytes>(smem),
        samp_r(reinterpret_cast<int64_t*>(this->extra + kSampR)),
        samp_c(reinterpret_cast<int64_t*>(this->extra + kSampC)),
        gid_r(reinterpret_cast<int64_t*>(this->extra + kGidR)),
        gid_c(reinterpret_cast<int64_t*>(this->extra + kGidC)),
        vr(reinterpret_cast<float*>(this->extra + kVecR)),
        vc(reinterpret_cast<float*>(this->extra + kVecC)),
        red(reinterpret_cast<float*>(this->extra + kRed)),
        pl_r(vr + kPl * kBM) {}
};

// Samples and group ids of the 64 rows (or columns) local0 .. local0 + 63 of a side with
// `count` entries and global index offset + local. With kGroups and no ids (neutral),
// rows get INT64_MIN and columns INT64_MAX: never equal. No barrier: the caller syncs.
template <unsigned O>
__device__ __forceinline__ void load_tables(int64_t* samp, int64_t* gid, const int64_t* groups,
                                            int64_t local0, int64_t count, int64_t offset,
                                            int64_t period, bool rows) {
  for (int t = threadIdx.x; t < kBM; t += kThreads) {
    const int64_t local = local0 + t;
    if constexpr ((O & kPeriod) != 0) {
      const int64_t k = offset + local;
      samp[t] = period > 0 ? k % period : k;
    }
    if constexpr ((O & kGroups) != 0) {
      const int64_t none = rows ? std::numeric_limits<int64_t>::min()
                                : std::numeric_limits<int64_t>::max();
      gid[t] = groups == nullptr ? none : (local < count ? groups[local] : int64_t(0));
    }
  }
}

// The entry sets of one tile (module comment). allowed(i, j, pos): whether entry (i, j) is
// in the statistics (not excluded, not masked); pos whether it is a positive. Bounds are
// the caller's.
template <unsigned O>
struct TileSets {
  int diag;   // j - i == diag: the same global index
  int ex;     // j - i == ex: excluded (kFar without exclude_self)
  const int64_t *samp_r, *samp_c, *gid_r, *gid_c;

  __device__ __forceinline__ bool allowed(int i, int j, bool& pos) const {
    const int dj = j - i;
    const bool excl = (O & kExcl) != 0 && dj == ex;
    bool same = dj == diag;
    if constexpr ((O & kPeriod) != 0) same = samp_r[i] == samp_c[j];
    pos = (O & kPos) != 0 && same && !excl;
    if constexpr ((O & kGroups) != 0) {
      if (!same && gid_r[i] == gid_c[j]) return false;
    }
    return !excl;
  }
};

// The tables are those load_tables staged in sm for this tile's rows and columns.
template <typename T, unsigned O>
__device__ __forceinline__ TileSets<O> tile_sets(const Sweep<T>& p, int64_t row0, int64_t col0,
                                                 const PairSmem<T>& sm) {
  const int64_t delta = (p.row_offset + row0) - (p.col_offset + col0);  // j - i at equality
  const int diag = (delta > -kBM && delta < kBN) ? int(delta) : kFar;
  return TileSets<O>{diag, p.exclude_self ? diag : kFar, sm.samp_r, sm.samp_c, sm.gid_r, sm.gid_c};
}

// S of an allowed entry: s X + b (b = 0 without a bias), the row's given logit on a
// positive with the override.
template <unsigned O>
__device__ __forceinline__ float logit(float x, float scale, float bias, bool pos,
                                       const float* pl_r, int i) {
  float s = (O & kBias) != 0 ? fmaf(scale, x, bias) : scale * x;
  if constexpr ((O & kOverride) != 0) {
    if (pos) s = pl_r[i];
  }
  return s;
}

// (max, log sum) of a merged pair for exp((S - max) - log sum): an empty set (max -inf)
// becomes (0, +inf), whose weights are exactly 0, never NaN.
__device__ __forceinline__ void log_sum(float mx, float sm, float& out_max, float& out_log) {
  const bool empty = mx == -INFINITY;
  out_max = empty ? 0.0f : mx;
  out_log = empty ? INFINITY : logf(sm);
}

// The backward's staging of one merged pair for entry t (global index k) of a tile side:
// vec[at_max], vec[at_log] = log_sum(mx[k], sum[k]) and vec[at_g] = g[k] (slots of kBM ==
// kBN floats) where `use` (the coefficient is given, t is in range), else (0, +inf) and 0.
__device__ __forceinline__ void stage_pair(float* vec, int t, int64_t k, bool use,
                                           const float* mx, const float* sum, const float* g,
                                           int at_max, int at_log, int at_g) {
  static_assert(kBM == kBN, "row and column vectors share one slot size");
  float m = 0.0f, lg = INFINITY;
  if (use) log_sum(mx[k], sum[k], m, lg);
  vec[at_max * kBM + t] = m;
  vec[at_log * kBM + t] = lg;
  vec[at_g * kBM + t] = use ? g[k] : 0.0f;
}

// ----------------------------------------------------------------------------- forward
// Grid (G, H) (sweep_grid): program (g, h) owns row blocks g, g+G, ... and column blocks
// h, h+H, ... For each of its tiles, with S the logits of the allowed entries:
//   rows     online (max, sum e^{S - max}) per row over the allowed entries and over the
//            positives, in registers (two threads per row: tile max, then tile sum, then
//            lse_merge into the running pair); stored to ws rows [s][h][i] after the row
//            block (every h owns a column block, so every slot is written);
//   columns  ("softmax") the same along i in two half-columns of 32 rows merged through
//            shared memory, read-modify-written into ws columns [s][g][j]: slots exclusive
//            to the program (no atomics, deterministic); its first row block writes;
//   sigmoid  sum of softplus(-z S) (z = +1 on positives) per thread, one tile at a time,
//            then one CTA sum per program into ws[g H + h].
// pair_combine_kernel merges the H row and G column partials (lse_merge: exact, max then
// rescaled sums) into the (max, sum) outputs; sum_kernel (common.cuh) adds the G H
// sigmoid partials in a fixed order. Deterministic run to run.
template <typename T, int E, unsigned O>
__global__ void __launch_bounds__(kThreads, kFwdBlocksPerSm)
    pair_fwd_kernel(Sweep<T> p, float* __restrict__ ws) {
  using L = Layout<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const PairSmem<T> sm(smem);
  float* const part = sm.vc;  // 4 x 64: column half partials

  constexpr bool kPosS = (O & kPos) != 0;
  constexpr int R = kPosS ? 2 : 1;                      // pairs per row
  constexpr int C = E == kSoftmax ? (kPosS ? 2 : 1) : 0;  // pairs per column
  const int g = blockIdx.x, h = blockIdx.y, G = gridDim.x, H = gridDim.y;
  const int64_t n = p.op.n_a, m = p.op.n_b;
  const int num_rb = int(blocks_of(n, kBM)), num_cb = int(blocks_of(m, kBN));
  const float scale = *p.op.scale;
  const float bias = (O & kBias) != 0 && p.op.bias != nullptr ? *p.op.bias : 0.0f;
  const int tid = threadIdx.x;
  const int rr = tid / 2, rh = tid % 2;      // row pass: row rr, columns rh + 2c
  const int cc = tid % kBN, ch = tid / kBN;  // column pass: column cc, rows ch*32 + r
  float* rm = ws;                            // [s][h][i], s < R
  float* rl = rm + int64_t(R) * H * n;
  float* cm = rl + int64_t(R) * H * n;  // [s][g][j], s < C
  float* cl = cm + int64_t(C) * G * m;
  float total = 0.0f;  // sigmoid, this thread

  for (int rb = g; rb < num_rb; rb += G) {
    const int64_t row0 = int64_t(rb) * kBM;
    const int nrows = int(std::min<int64_t>(kBM, n - row0));
    // Safe to overwrite: the previous tile ended with a barrier; tile_logits publishes.
    load_tables<O>(sm.samp_r, sm.gid_r, p.row_groups, row0, n, p.row_offset, p.period, true);
    if constexpr ((O & kOverride) != 0) {
      for (int t = tid; t < kBM; t += kThreads) {
        sm.pl_r[t] = t < nrows ? p.pos_logits[row0 + t] : 0.0f;
      }
    }
    float run_m = -INFINITY, run_l = 0.0f, run_pm = -INFINITY, run_pl = 0.0f;
    for (int cb = h; cb < num_cb; cb += H) {
      const int64_t col0 = int64_t(cb) * kBN;
      const int ncols = int(std::min<int64_t>(kBN, m - col0));
      load_tables<O>(sm.samp_c, sm.gid_c, p.col_groups, col0, m, p.col_offset, p.period, false);
      tile_x<T>(p, row0, col0, sm.As, sm.Bs, sm.Xs);
      const TileSets<O> sets = tile_sets<T, O>(p, row0, col0, sm);

      if constexpr (E == kSigmoid) {
        float tile = 0.0f;
        for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
          const int i = idx / kBN, j = idx % kBN;
          bool pos;
          if (i < nrows && j < ncols && sets.allowed(i, j, pos)) {
            const float s = logit<O>(sm.Xs[i * L::kLdX + j], scale, bias, pos, sm.pl_r, i);
            tile += softplus_stable(pos ? -s : s);
          }
        }
        total += tile;
      } else {
        // Rows (padded rows compute finite values from zero-filled A, never stored).
        float tm = -INFINITY, tpm = -INFINITY;
        for (int c = rh; c < ncols; c += 2) {
          bool pos;
          if (sets.allowed(rr, c, pos)) {
            const float s = logit<O>(sm.Xs[rr * L::kLdX + c], scale, bias, pos, sm.pl_r, rr);
            tm = fmaxf(tm, s);
            if (kPosS && pos) tpm = fmaxf(tpm, s);
          }
        }
        tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
        if (kPosS) tpm = fmaxf(tpm, __shfl_xor_sync(0xffffffffu, tpm, 1));
        const float tmu = finite_or_zero(tm), tpmu = finite_or_zero(tpm);
        float tl = 0.0f, tpl = 0.0f;
        for (int c = rh; c < ncols; c += 2) {
          bool pos;
          if (sets.allowed(rr, c, pos)) {
            const float s = logit<O>(sm.Xs[rr * L::kLdX + c], scale, bias, pos, sm.pl_r, rr);
            tl += expf(s - tmu);
            if (kPosS && pos) tpl += expf(s - tpmu);
          }
        }
        tl += __shfl_xor_sync(0xffffffffu, tl, 1);
        lse_merge(run_m, run_l, tm, tl);
        if (kPosS) {
          tpl += __shfl_xor_sync(0xffffffffu, tpl, 1);
          lse_merge(run_pm, run_pl, tpm, tpl);
        }

        if constexpr (E == kSoftmax) {
          // Columns: two half-columns of 32 rows, merged through shared memory.
          float km = -INFINITY, kpm = -INFINITY;
          const int r_end = std::min(nrows, ch * 32 + 32);
          for (int r = ch * 32; r < r_end; ++r) {
            bool pos;
            if (sets.allowed(r, cc, pos)) {
              const float s = logit<O>(sm.Xs[r * L::kLdX + cc], scale, bias, pos, sm.pl_r, r);
              km = fmaxf(km, s);
              if (kPosS && pos) kpm = fmaxf(kpm, s);
            }
          }
          const float kmu = finite_or_zero(km), kpmu = finite_or_zero(kpm);
          float kl = 0.0f, kpl = 0.0f;
          for (int r = ch * 32; r < r_end; ++r) {
            bool pos;
            if (sets.allowed(r, cc, pos)) {
              const float s = logit<O>(sm.Xs[r * L::kLdX + cc], scale, bias, pos, sm.pl_r, r);
              kl += expf(s - kmu);
              if (kPosS && pos) kpl += expf(s - kpmu);
            }
          }
          if (ch == 1) {
            part[cc] = km;
            part[kBN + cc] = kl;
            part[2 * kBN + cc] = kpm;
            part[3 * kBN + cc] = kpl;
          }
          __syncthreads();
          if (ch == 0 && cc < ncols) {
            const int64_t j = col0 + cc;
            lse_merge(km, kl, part[cc], part[kBN + cc]);
            const int64_t s0 = int64_t(g) * m + j;
            if (rb != g) lse_merge(km, kl, cm[s0], cl[s0]);  // not the program's first visit
            cm[s0] = km;
            cl[s0] = kl;
            if (kPosS) {
              lse_merge(kpm, kpl, part[2 * kBN + cc], part[3 * kBN + cc]);
              const int64_t s1 = (int64_t(G) + g) * m + j;
              if (rb != g) lse_merge(kpm, kpl, cm[s1], cl[s1]);
              cm[s1] = kpm;
              cl[s1] = kpl;
            }
          }
        }
      }
      __syncthreads();  // readers of this tile's tables, X and partials are done
    }
    if (E != kSigmoid && rh == 0 && rr < nrows) {
      const int64_t i = row0 + rr;
      rm[int64_t(h) * n + i] = run_m;
      rl[int64_t(h) * n + i] = run_l;
      if (kPosS) {
        rm[(int64_t(H) + h) * n + i] = run_pm;
        rl[(int64_t(H) + h) * n + i] = run_pl;
      }
    }
  }
  if constexpr (E == kSigmoid) {
    const float sum = block_sum(total, sm.red);
    if (tid == 0) ws[int64_t(g) * H + h] = sum;
  }
}

// Row pairs from ws rows [s][0, H) (blockIdx.y == 0), column pairs from ws columns
// [s][0, G) (blockIdx.y == 1), merged in index order into the (max, sum) outputs.
__global__ void pair_combine_kernel(const float* __restrict__ ws, int64_t n, int64_t m, int H,
                                    int G, int R, int C, PairStats out) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool cols = blockIdx.y == 1;
  const int64_t count = cols ? m : n;
  if (k >= count) return;
  const float* rm = ws;
  const float* rl = rm + int64_t(R) * H * n;
  const float* cm = rl + int64_t(R) * H * n;
  const float* cl = cm + int64_t(C) * G * m;
  const int parts = cols ? G : H, sets = cols ? C : R;
  for (int s = 0; s < sets; ++s) {
    float mx = -INFINITY, sm = 0.0f;
    for (int q = 0; q < parts; ++q) {
      const int64_t at = (int64_t(s) * parts + q) * count + k;
      lse_merge(mx, sm, (cols ? cm : rm)[at], (cols ? cl : rl)[at]);
    }
    if (cols) {
      (s == 0 ? out.col_max : out.cpos_max)[k] = mx;
      (s == 0 ? out.col_sum : out.cpos_sum)[k] = sm;
    } else {
      (s == 0 ? out.row_max : out.pos_max)[k] = mx;
      (s == 0 ? out.row_sum : out.pos_sum)[k] = sm;
    }
  }
}

// ----------------------------------------------------------------------------- backward
// Grid (column blocks, SPLIT) (sweep_split): program (cb, sp) visits the row blocks
// rb = sp (mod SPLIT), staggered by cb so that concurrent programs add into different rows
// of dA. The column block's samples, ids, merged column pairs and coefficients are staged
// once; per tile:
//   X  = A_rb B_cb^T, recomputed exactly as the forward did (tile_logits), S = s X + b;
//   dS on the allowed entries, in fp32 (module comment of pair.h):
//        softmax / rows  gr_i P_ij - gpr_i Q_ij + gc_j Pc_ij - gpc_j Qc_ij,
//                        P = exp((S - max) - log sum) from the merged pair (never
//                        max + log sum rounded into one float: at s = 1e4 that is 1e-3);
//        sigmoid         g (sigmoid(S) - [pos]), the positive's as -g sigmoid(-S);
//        override        the positive's dS goes to dpos_i (fp32 atomic: one positive per
//                        row in practice) and is then 0;
//      the positives are subtracted here, BEFORE the rounding: near convergence P ~ Q on
//      the positives, rounded apart each carries 2^-9 (bf16);
//   ds += sum dS X, db += sum dS per thread (fp32 dS), one CTA sum per program;
//   16-bit: dS / max|dS| rounded to T once (tile_norm), the products multiplied back;
//   per D chunk: dA_ws[rb] += dS @ B_cb (fp32 atomics), dB_ws[sp][cb] += dS^T @ A_rb
//   (plain read-modify-write: rows of cb in slice sp belong to this program alone).
// finalize_kernel (common.cuh): da = Tout(s dA_ws), db = Tout(s sum_sp dB_ws[sp]) (Tout the
// input dtype or fp32); sum_kernel: dscale, dbias from the program partials.
struct BwdVectors {
  const float *row_max, *row_sum, *pos_max, *pos_sum;
  const float *col_max, *col_sum, *cpos_max, *cpos_sum;
  const float *gr, *gpr, *gc, *gpc, *g;  // nullptr: 0 (g: sigmoid, required)
};

template <typename T, int E, unsigned O>
__global__ void __launch_bounds__(kThreads, kBwdBlocksPerSm)
    pair_bwd_kernel(Sweep<T> p, BwdVectors v, float* __restrict__ da_ws,
                    float* __restrict__ db_ws, float* __restrict__ partials,
                    float* __restrict__ dpos, T* __restrict__ ds_out,
                    const float* __restrict__ ds_unit) {
  using L = Layout<T>;
  __shared__ __align__(128) unsigned char smem[L::kBytes];
  const PairSmem<T> sm(smem);

  constexpr bool kPosS = (O & kPos) != 0;
  const int cb = blockIdx.x, sp = blockIdx.y, split = gridDim.y;
  const int64_t n = p.op.n_a, m = p.op.n_b, d = p.op.d;
  const int num_rb = int(blocks_of(n, kBM));
  const int count = (num_rb - sp + split - 1) / split;  // sp < num_rb by construction
  const float scale = *p.op.scale;
  const float bias = (O & kBias) != 0 && p.op.bias != nullptr ? *p.op.bias : 0.0f;
  const float gtot = E == kSigmoid ? *v.g : 0.0f;
  const bool has_gr = v.gr != nullptr, has_gpr = kPosS && v.gpr != nullptr;
  const bool has_gc = E == kSoftmax && v.gc != nullptr;
  const bool has_gpc = E == kSoftmax && kPosS && v.gpc != nullptr;
  const int tid = threadIdx.x;
  const int64_t col0 = int64_t(cb) * kBN;
  const int ncols = int(std::min<int64_t>(kBN, m - col0));
  float* db_slice = db_ws + int64_t(sp) * m * d;
  // The panel path: dS / u to ds_out, no dA / dB products (two GEMMs do them).
  const float inv_unit = ds_unit != nullptr ? 1.0f / *ds_unit : 1.0f;

  load_tables<O>(sm.samp_c, sm.gid_c, p.col_groups, col0, m, p.col_offset, p.period, false);
  if (E == kSoftmax && tid < kBN) {
    const int64_t j = col0 + tid;
    const bool in = tid < ncols;
    stage_pair(sm.vc, tid, j, has_gc && in, v.col_max, v.col_sum, v.gc, kCMax, kCLog, kGc);
    stage_pair(sm.vc, tid, j, has_gpc && in, v.cpos_max, v.cpos_sum, v.gpc, kCpMax, kCpLog,
               kGpc);
  }
  float ds_acc = 0.0f, dbias_acc = 0.0f;

  for (int t = 0; t < count; ++t) {
    const int rb = sp + ((t + cb) % count) * split;
    const int64_t row0 = int64_t(rb) * kBM;
    const int nrows = int(std::min<int64_t>(kBM, n - row0));
    load_tables<O>(sm.samp_r, sm.gid_r, p.row_groups, row0, n, p.row_offset, p.period, true);
    if (E != kSigmoid && tid < kBM) {
      const int64_t i = row0 + tid;
      const bool in = tid < nrows;
      stage_pair(sm.vr, tid, i, has_gr && in, v.row_max, v.row_sum, v.gr, kRMax, kRLog, kGr);
      stage_pair(sm.vr, tid, i, has_gpr && in, v.pos_max, v.pos_sum, v.gpr, kPMax, kPLog, kGpr);
    }
    if constexpr ((O & kOverride) != 0) {
      if (tid < kBM) sm.pl_r[tid] = tid < nrows ? p.pos_logits[row0 + tid] : 0.0f;
    }
    tile_x<T>(p, row0, col0, sm.As, sm.Bs, sm.Xs);  // its barrier publishes the tables
    const TileSets<O> sets = tile_sets<T, O>(p, row0, col0, sm);

    float tmax = 0.0f;
    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int i = idx / kBN, j = idx % kBN;
      const float x = sm.Xs[i * L::kLdX + j];
      float dv = 0.0f;
      bool pos;
      if (i < nrows && j < ncols && sets.allowed(i, j, pos)) {
        const float s = logit<O>(x, scale, bias, pos, sm.pl_r, i);
        if constexpr (E == kSigmoid) {
          dv = gtot * (pos ? -sigmoid_stable(-s) : sigmoid_stable(s));
        } else {
          // P = exp((S - max) - log sum): S - max exact near the maximum, log sum small.
          auto weight = [&](const float* v, int at, int mx, int lg, int k) {
            return v[at * kBM + k] * expf((s - v[mx * kBM + k]) - v[lg * kBM + k]);
          };
          if (has_gr) dv = weight(sm.vr, kGr, kRMax, kRLog, i);
          if (has_gpr && pos) dv -= weight(sm.vr, kGpr, kPMax, kPLog, i);
          if constexpr (E == kSoftmax) {
            if (has_gc) dv += weight(sm.vc, kGc, kCMax, kCLog, j);
            if (has_gpc && pos) dv -= weight(sm.vc, kGpc, kCpMax, kCpLog, j);
          }
        }
        if constexpr ((O & kOverride) != 0) {
          if (pos) {  // the positive's logit is not s <a_i, b_j> + b: its gradient apart
            atomicAdd(dpos + row0 + i, dv);
            dv = 0.0f;
          }
        }
        ds_acc = fmaf(dv, x, ds_acc);
        dbias_acc += dv;
      }
      sm.Xs[i * L::kLdX + j] = dv;  // in place (same thread, same slot); fp32: this is Ps
      tmax = fmaxf(tmax, fabsf(dv));
      if (ds_out != nullptr && i < nrows && j < ncols) {
        ds_out[(row0 + i) * m + col0 + j] = from_float<T>(dv * inv_unit);
      }
    }
    if (ds_out != nullptr) {  // uniform across the block
      __syncthreads();  // before the next tile overwrites the row tables, vectors, Xs
      continue;
    }
    float mult = 1.0f;
    if constexpr (kUsesWmma<T>) {
      float inv;
      mult = tile_norm(block_max_all(tmax, sm.red), inv);  // barriers: dS complete in Xs
      for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
        const int i = idx / kBN, j = idx % kBN;
        sm.Ps[i * L::kLdP + j] = from_float<T>(sm.Xs[i * L::kLdX + j] * inv);
      }
    }

    for (int64_t k0 = 0; k0 < d; k0 += kBK) {
      __syncthreads();  // dS complete; previous chunk's readers of As/Bs and staging done
      load_tile<T, kBM, kBK>(sm.As, L::kLdK, p.op.a, p.op.a_stride0, p.op.a_stride1, row0, n, k0,
                             d);
      load_tile<T, kBN, kBK>(sm.Bs, L::kLdK, p.op.b, p.op.b_stride0, p.op.b_stride1, col0, m, k0,
                             d);
      __syncthreads();
      TileAcc<T, kBM, kBK> acc_a;  // dS (BM x BN) @ B chunk (BN x BK)
      acc_a.zero();
      acc_a.template mma<kBN, true, true>(sm.Ps, L::kLdP, sm.Bs, L::kLdK);
      TileAcc<T, kBN, kBK> acc_b;  // dS^T (BN x BM) @ A chunk (BM x BK)
      acc_b.zero();
      acc_b.template mma<kBM, false, true>(sm.Ps, L::kLdP, sm.As, L::kLdK);
      // Staging (WMMA only) goes through Xs: dead once Ps is built, separate from Ps there.
      acc_a.for_each(sm.Xs, L::kLdX, [&](int i, int c, float val) {
        if (i < nrows && k0 + c < d) atomicAdd(da_ws + (row0 + i) * d + k0 + c, mult * val);
      });
      acc_b.for_each(sm.Xs, L::kLdX, [&](int j, int c, float val) {
        if (j < ncols && k0 + c < d) db_slice[(col0 + j) * d + k0 + c] += mult * val;
      });
    }
    __syncthreads();  // before the next tile overwrites the row tables, vectors, Xs, Ps
  }

  const int programs = gridDim.x * gridDim.y;
  const int pid = cb * split + sp;
  const float ds_total = block_sum(ds_acc, sm.red);
  if (tid == 0) partials[pid] = ds_total;
  const float db_total = block_sum(dbias_acc, sm.red);
  if (tid == 0) partials[programs + pid] = db_total;
}

// ----------------------------------------------------------------------------- options

// The instantiations: every epilogue, with and without positives (and the override for
// "rows" with positives), each in two forms: lean (bias and exclusion, which cost nothing
// when neutral: fmaf(s, x, 0) == s * x, and an exclusion diagonal no entry meets) and full
// (every neutral option: samples per tile and group ids as well). 14 (E, O) pairs per
// dtype and direction; each costs ~0.9 s of ptxas per arch, so the 2^6 option sets are
// not all compiled: the template parameters still remove what a form does not have, and
// the dispatch below runs each request on the smallest compiled form containing it.
constexpr unsigned kForms[] = {kBias | kExcl, kNeutral};
constexpr int kNumForms = int(sizeof(kForms) / sizeof(kForms[0]));

constexpr bool valid(int e, unsigned o) {
  return (o & kOverride) == 0 || (e == kRows && (o & kPos) != 0);
}

constexpr int popcount(unsigned x) { return x == 0 ? 0 : int(x & 1u) + popcount(x >> 1); }

// The compiled option set for a request: the base bits (positives, override) exactly, the
// neutral bits the smallest compiled form containing them.
unsigned resolve(unsigned want) {
  const unsigned base = want & (kPos | kOverride), neutral = want & kNeutral;
  unsigned best = kNeutral;
  for (unsigned f : kForms) {
    if ((f & neutral) == neutral && popcount(f) < popcount(best)) best = f;
  }
  return base | best;
}

// f(std::integral_constant<int, E>, std::integral_constant<unsigned, O>) for the compiled
// (E, O) equal to (e, o); o must be a resolve() result.
template <int E, unsigned Base, int... I, typename F>
void dispatch_forms(unsigned o, F&& f, std::integer_sequence<int, I...>) {
  bool done = false;
  auto one = [&](auto form) {
    constexpr unsigned O = Base | decltype(form)::value;
    if (!done && o == O) {
      done = true;
      f(std::integral_constant<int, E>{}, std::integral_constant<unsigned, O>{});
    }
  };
  (one(std::integral_constant<unsigned, kForms[I]>{}), ...);
  if (!done) throw std::logic_error("pair engine: no instantiation for the options");
}

template <int E, typename F>
void dispatch_base(unsigned o, F&& f) {
  const auto forms = std::make_integer_sequence<int, kNumForms>{};
  switch (o & (kPos | kOverride)) {
    case 0u:
      return dispatch_forms<E, 0u>(o, f, forms);
    case kPos:
      return dispatch_forms<E, kPos>(o, f, forms);
    default:
      if constexpr (valid(E, kPos | kOverride)) {
        return dispatch_forms<E, kPos | kOverride>(o, f, forms);
      }
      throw std::logic_error("pair engine: override without rows and positives");
  }
}

template <typename F>
void dispatch_options(int e, unsigned o, F&& f) {
  switch (e) {
    case kSoftmax:
      return dispatch_base<kSoftmax>(o, f);
    case kRows:
      return dispatch_base<kRows>(o, f);
    default:
      return dispatch_base<kSigmoid>(o, f);
  }
}

// ----------------------------------------------------------------------------- checks

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

void forbid(const void* ptr, const char* field, const char* why) {
  if (ptr != nullptr) bad(std::string(field) + " must be null (0) " + why);
}

constexpr int64_t kMaxRows = (int64_t(1) << 31) - kBM;

void check_params(const PairParams& p) {
  if (p.n < 1) bad("PairParams.n must be >= 1, got " + std::to_string(p.n));
  if (p.m < 1) bad("PairParams.m must be >= 1, got " + std::to_string(p.m));
  if (p.d < 0) bad("PairParams.d must be >= 0, got " + std::to_string(p.d));
  if (p.n > kMaxRows) bad("PairParams.n must be < 2^31 - 64, got " + std::to_string(p.n));
  if (p.m > kMaxRows) bad("PairParams.m must be < 2^31 - 64, got " + std::to_string(p.m));
  check_strides("PairParams.", {{p.a_stride0, "a_stride0"}, {p.a_stride1, "a_stride1"},
                                 {p.b_stride0, "b_stride0"}, {p.b_stride1, "b_stride1"}});
  if (p.d > 0) {  // zero-size tensors may have no storage
    require(p.a, "PairParams.a");
    require(p.b, "PairParams.b");
  }
  require(p.scale, "PairParams.scale");
  if (p.period < 0) bad("PairParams.period must be >= 0, got " + std::to_string(p.period));
  if (p.row_offset < 0)
    bad("PairParams.row_offset must be >= 0, got " + std::to_string(p.row_offset));
  if (p.col_offset < 0)
    bad("PairParams.col_offset must be >= 0, got " + std::to_string(p.col_offset));
  if ((p.row_groups == nullptr) != (p.col_groups == nullptr)) {
    bad(p.row_groups == nullptr ? "PairParams.row_groups is null while col_groups is set"
                                : "PairParams.col_groups is null while row_groups is set");
  }
  if (p.positive_logits != nullptr && !(p.epilogue == Epilogue::kRows && p.positives)) {
    bad("PairParams.positive_logits needs epilogue 'rows' with positives, got epilogue '" +
        std::string(epilogue_name(p.epilogue)) + "', positives " +
        (p.positives ? "true" : "false"));
  }
  switch (p.epilogue) {
    case Epilogue::kSoftmax:
    case Epilogue::kRows:
    case Epilogue::kSigmoid:
      break;
    default:
      bad("PairParams.epilogue is not a known epilogue");
  }
}

unsigned options_of(const PairParams& p) {
  unsigned o = 0;
  if (p.positives) o |= kPos;
  if (p.exclude_self) o |= kExcl;
  // Samples matter only to positives and group masks.
  if (p.period > 0 && (p.positives || p.row_groups != nullptr)) o |= kPeriod;
  if (p.row_groups != nullptr) o |= kGroups;
  if (p.bias != nullptr) o |= kBias;
  if (p.positive_logits != nullptr) o |= kOverride;
  return o;
}

int epilogue_index(Epilogue e) {
  return e == Epilogue::kSoftmax ? kSoftmax : e == Epilogue::kRows ? kRows : kSigmoid;
}

template <typename T>
Sweep<T> make_sweep(const PairParams& p) {
  Sweep<T> s{};
  s.op = Operands<T>{static_cast<const T*>(p.a), static_cast<const T*>(p.b), p.n, p.m, p.d,
                     p.a_stride0, p.a_stride1, p.b_stride0, p.b_stride1, p.scale, p.bias};
  s.row_offset = p.row_offset;
  s.col_offset = p.col_offset;
  s.period = p.period;
  s.exclude_self = p.exclude_self;
  s.row_groups = p.row_groups;
  s.col_groups = p.col_groups;
  s.pos_logits = p.positive_logits;
  s.x = p.x;
  return s;
}

// ----------------------------------------------------------------------------- plans

struct ForwardPlan {
  SweepGrid grid;
  int r, c;  // pairs per row / column
  int64_t elems;
};

ForwardPlan forward_plan(const PairParams& p, int sms) {
  ForwardPlan plan;
  plan.grid = sweep_grid(blocks_of(p.n, kBM), blocks_of(p.m, kBN), sms);
  const bool sig = p.epilogue == Epilogue::kSigmoid;
  plan.r = sig ? 0 : (p.positives ? 2 : 1);
  plan.c = p.epilogue == Epilogue::kSoftmax ? (p.positives ? 2 : 1) : 0;
  const int64_t rows = 2 * int64_t(plan.r) * plan.grid.h * p.n;
  const int64_t cols = 2 * int64_t(plan.c) * plan.grid.g * p.m;
  plan.elems = sig ? int64_t(plan.grid.g) * plan.grid.h : rows + cols;
  return plan;
}

struct BackwardPlan {
  int split, num_cb;
  int64_t elems;
};

BackwardPlan backward_plan(const PairParams& p, int sms) {
  BackwardPlan plan;
  const int64_t row_blocks = blocks_of(p.n, kBM), col_blocks = blocks_of(p.m, kBN);
  // dB slices cost m d each: at most 4, or as many as keep them within 4 n d.
  const int64_t max_split = std::max<int64_t>(kMaxSplit, blocks_of(kMaxSplit * p.n, p.m));
  plan.split = sweep_split(row_blocks, col_blocks, sms, max_split);
  plan.num_cb = int(col_blocks);
  // The panel path (X given: the backward writes dS, two GEMMs form dA and dB) needs the
  // program partials only, not the dA / dB accumulators.
  const int64_t grads = p.x != nullptr ? 0 : p.n * p.d + int64_t(plan.split) * p.m * p.d;
  plan.elems = grads + 2 * col_blocks * plan.split;
  return plan;
}

void check_workspace(const float* ws, int64_t have, int64_t need) {
  require(ws, "workspace");
  if (have < need) {
    bad("workspace_elems is " + std::to_string(have) + " floats, the sweep needs " +
        std::to_string(need));
  }
}

// ----------------------------------------------------------------------------- launchers

template <typename T, int E, unsigned O>
void launch_forward(const PairParams& p, const ForwardPlan& plan, const PairStats& st, float* ws,
                    cudaStream_t stream) {
  const dim3 grid(plan.grid.g, plan.grid.h);
  pair_fwd_kernel<T, E, O><<<grid, kThreads, 0, stream>>>(make_sweep<T>(p), ws);
  detail::check_launch("pair_fwd_kernel");
  if (E == kSigmoid) {
    sum_kernel<<<1, kThreads, 0, stream>>>(ws, plan.grid.g * plan.grid.h, st.total, nullptr);
    detail::check_launch("sum_kernel");
    return;
  }
  const unsigned blocks = unsigned(blocks_of(std::max(p.n, p.m), 256));
  const unsigned ys = plan.c > 0 ? 2u : 1u;
  pair_combine_kernel<<<dim3(blocks, ys), 256, 0, stream>>>(ws, p.n, p.m, plan.grid.h, plan.grid.g,
                                                            plan.r, plan.c, st);
  detail::check_launch("pair_combine_kernel");
}

template <typename T, typename Tout, int E, unsigned O>
void launch_backward(const PairParams& p, const BackwardPlan& plan, const PairStats& st,
                     const PairCoefs& co, const PairGrads& gr, float* ws, cudaStream_t stream) {
  const bool panel = gr.ds != nullptr;  // no dA / dB accumulators (backward_plan)
  const int64_t nd = panel ? 0 : p.n * p.d, md = panel ? 0 : p.m * p.d;
  float* da_ws = ws;  // never touched on the panel path
  float* db_ws = ws + nd;
  float* partials = db_ws + int64_t(plan.split) * md;
  const int programs = plan.num_cb * plan.split;
  if (nd + plan.split * md > 0) {
    FC_CUDA_CHECK(cudaMemsetAsync(ws, 0, sizeof(float) * size_t(nd + plan.split * md), stream));
  }
  if (gr.dpos != nullptr) {
    FC_CUDA_CHECK(cudaMemsetAsync(gr.dpos, 0, sizeof(float) * size_t(p.n), stream));
  }
  const BwdVectors v{st.row_max, st.row_sum, st.pos_max, st.pos_sum, st.col_max, st.col_sum,
                     st.cpos_max, st.cpos_sum, co.rows, co.pos_rows, co.cols, co.pos_cols,
                     co.total};
  pair_bwd_kernel<T, E, O><<<dim3(plan.num_cb, plan.split), kThreads, 0, stream>>>(
      make_sweep<T>(p), v, da_ws, db_ws, partials, gr.dpos, static_cast<T*>(gr.ds),
      gr.ds_unit);
  detail::check_launch("pair_bwd_kernel");
  if (nd > 0) {
    finalize_kernel<Tout><<<grid_1d(nd), 256, 0, stream>>>(da_ws, 1, nd, p.scale,
                                                           static_cast<Tout*>(gr.da));
    detail::check_launch("finalize_kernel");
    finalize_kernel<Tout><<<grid_1d(md), 256, 0, stream>>>(db_ws, plan.split, md, p.scale,
                                                           static_cast<Tout*>(gr.db));
    detail::check_launch("finalize_kernel");
  }
  sum_kernel<<<1, kThreads, 0, stream>>>(partials, programs, gr.dscale, gr.dbias);
  detail::check_launch("sum_kernel");
}

// The statistics fields a forward with these options writes (the rest must be null).
void check_stats_out(const PairParams& p, const PairStats& s) {
  const bool sig = p.epilogue == Epilogue::kSigmoid, soft = p.epilogue == Epilogue::kSoftmax;
  const struct {
    const float* ptr;
    const char* name;
    bool used;
    const char* why;
  } fields[] = {
      {s.row_max, "PairStats.row_max", !sig, "with epilogue 'sigmoid'"},
      {s.row_sum, "PairStats.row_sum", !sig, "with epilogue 'sigmoid'"},
      {s.pos_max, "PairStats.pos_max", !sig && p.positives, "without row positives"},
      {s.pos_sum, "PairStats.pos_sum", !sig && p.positives, "without row positives"},
      {s.col_max, "PairStats.col_max", soft, "without epilogue 'softmax'"},
      {s.col_sum, "PairStats.col_sum", soft, "without epilogue 'softmax'"},
      {s.cpos_max, "PairStats.cpos_max", soft && p.positives, "without column positives"},
      {s.cpos_sum, "PairStats.cpos_sum", soft && p.positives, "without column positives"},
      {s.total, "PairStats.total", sig, "without epilogue 'sigmoid'"},
  };
  for (const auto& f : fields) {
    if (f.used) {
      require(f.ptr, f.name);
    } else {
      forbid(f.ptr, f.name, f.why);
    }
  }
}

// The coefficients the options allow, and the merged statistics those present need.
void check_backward_in(const PairParams& p, const PairStats& s, const PairCoefs& c) {
  const bool sig = p.epilogue == Epilogue::kSigmoid, soft = p.epilogue == Epilogue::kSoftmax;
  if (sig) {
    require(c.total, "PairCoefs.total");
    forbid(c.rows, "PairCoefs.rows", "with epilogue 'sigmoid'");
    forbid(c.pos_rows, "PairCoefs.pos_rows", "with epilogue 'sigmoid'");
    forbid(c.cols, "PairCoefs.cols", "with epilogue 'sigmoid'");
    forbid(c.pos_cols, "PairCoefs.pos_cols", "with epilogue 'sigmoid'");
    return;
  }
  forbid(c.total, "PairCoefs.total", "without epilogue 'sigmoid'");
  if (!p.positives) {
    forbid(c.pos_rows, "PairCoefs.pos_rows", "without positives");
    forbid(c.pos_cols, "PairCoefs.pos_cols", "without positives");
  }
  if (!soft) {
    forbid(c.cols, "PairCoefs.cols", "without epilogue 'softmax'");
    forbid(c.pos_cols, "PairCoefs.pos_cols", "without epilogue 'softmax'");
  }
  // Each coefficient present needs its merged (max, sum) pair.
  const struct {
    const float* coef;
    const float *max, *sum;
    const char *max_name, *sum_name;
  } pairs[] = {
      {c.rows, s.row_max, s.row_sum, "PairStats.row_max", "PairStats.row_sum"},
      {c.pos_rows, s.pos_max, s.pos_sum, "PairStats.pos_max", "PairStats.pos_sum"},
      {c.cols, s.col_max, s.col_sum, "PairStats.col_max", "PairStats.col_sum"},
      {c.pos_cols, s.cpos_max, s.cpos_sum, "PairStats.cpos_max", "PairStats.cpos_sum"},
  };
  for (const auto& q : pairs) {
    if (q.coef != nullptr) require_all({{q.max, q.max_name}, {q.sum, q.sum_name}});
  }
}

void check_grads(const PairParams& p, const PairGrads& g) {
  if (p.d > 0 && g.ds == nullptr) {
    require(g.da, "PairGrads.da");
    require(g.db, "PairGrads.db");
  }
  if ((g.ds != nullptr) != (p.x != nullptr)) {
    bad("PairParams.x and PairGrads.ds go together in the backward (the panel path)");
  }
  if (g.ds == nullptr) forbid(g.ds_unit, "PairGrads.ds_unit", "without PairGrads.ds");
  require(g.dscale, "PairGrads.dscale");
  require(g.dbias, "PairGrads.dbias");
  if (p.positive_logits != nullptr) {
    require(g.dpos, "PairGrads.dpos");
  } else {
    forbid(g.dpos, "PairGrads.dpos", "without PairParams.positive_logits");
  }
  if (g.out_dtype != p.dtype && g.out_dtype != DType::kFloat32) {
    bad(std::string("PairGrads.out_dtype must be the inputs' dtype (") + dtype_name(p.dtype) +
        ") or float32, got " + dtype_name(g.out_dtype));
  }
}

int sm_count_of(int device) { return detail::sm_count(device); }

}  // namespace pair_impl
}  // namespace

// The dtype-typed halves of pair_forward / pair_backward (the kernels' launches for one
// T), each defined in its own translation unit, pair_<dtype>.cu, so that the three
// dtypes' instantiations compile in parallel: the engine's 112 kernels in one file took
// ~90 s of nvcc for sm_90a on the CI machine, the longest step of a GPU machine's build.
// p, the statistics and the workspace are checked by the caller (pair.cu).
template <typename T>
void pair_forward_typed(const PairParams& p, const PairStats& st, float* ws, int sms,
                        cudaStream_t stream);
template <typename T>
void pair_backward_typed(const PairParams& p, const PairStats& st, const PairCoefs& co,
                         const PairGrads& gr, float* ws, int sms, cudaStream_t stream);
template <>
void pair_forward_typed<float>(const PairParams&, const PairStats&, float*, int, cudaStream_t);
template <>
void pair_forward_typed<__half>(const PairParams&, const PairStats&, float*, int, cudaStream_t);
template <>
void pair_forward_typed<__nv_bfloat16>(const PairParams&, const PairStats&, float*, int,
                                       cudaStream_t);
template <>
void pair_backward_typed<float>(const PairParams&, const PairStats&, const PairCoefs&,
                                const PairGrads&, float*, int, cudaStream_t);
template <>
void pair_backward_typed<__half>(const PairParams&, const PairStats&, const PairCoefs&,
                                 const PairGrads&, float*, int, cudaStream_t);
template <>
void pair_backward_typed<__nv_bfloat16>(const PairParams&, const PairStats&, const PairCoefs&,
                                        const PairGrads&, float*, int, cudaStream_t);

namespace {
namespace pair_impl {

// The bodies of the typed halves (instantiated once, in pair_<dtype>.cu).
template <typename T>
void forward_for(const PairParams& p, const PairStats& st, float* ws, int sms,
                 cudaStream_t stream) {
  const ForwardPlan plan = forward_plan(p, sms);
  dispatch_options(epilogue_index(p.epilogue), resolve(options_of(p)), [&](auto e, auto o) {
    launch_forward<T, decltype(e)::value, decltype(o)::value>(p, plan, st, ws, stream);
  });
}

template <typename T>
void backward_for(const PairParams& p, const PairStats& st, const PairCoefs& co,
                  const PairGrads& gr, float* ws, int sms, cudaStream_t stream) {
  const BackwardPlan plan = backward_plan(p, sms);
  const bool f32_out = gr.out_dtype == DType::kFloat32;
  dispatch_options(epilogue_index(p.epilogue), resolve(options_of(p)), [&](auto e, auto o) {
    constexpr int E = decltype(e)::value;
    constexpr unsigned O = decltype(o)::value;
    if (f32_out || std::is_same<T, float>::value) {
      launch_backward<T, float, E, O>(p, plan, st, co, gr, ws, stream);
    } else {
      launch_backward<T, T, E, O>(p, plan, st, co, gr, ws, stream);
    }
  });
}

}  // namespace pair_impl
}  // namespace

// The definitions of the typed halves for one dtype T: one use per pair_<dtype>.cu.
#define FC_PAIR_TYPED(T)                                                                  \
  template <>                                                                             \
  void pair_forward_typed<T>(const PairParams& p, const PairStats& st, float* ws, int sms, \
                             cudaStream_t stream) {                                       \
    pair_impl::forward_for<T>(p, st, ws, sms, stream);                                    \
  }                                                                                       \
  template <>                                                                             \
  void pair_backward_typed<T>(const PairParams& p, const PairStats& st, const PairCoefs& co, \
                              const PairGrads& gr, float* ws, int sms, cudaStream_t stream) { \
    pair_impl::backward_for<T>(p, st, co, gr, ws, sms, stream);                           \
  }

}  // namespace flashcontrast
