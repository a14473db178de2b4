// fc_emu.h: runs csrc/'s CUDA kernels on the CPU, for tests only (see README.md here).
//
// Force-included (g++ -include) before every csrc/ file, which build.py compiles as C++
// after two rewrites: `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `::fc_emu::launch(kernel, grid, block, smem, stream)(args)`, and each `__shared__`
// array becomes a pointer into the block's shared-memory arena (poisoned with 0xFF bytes,
// i.e. NaN floats, at every block start, so reads of unwritten shared memory show).
//
// Execution model: the blocks of a launch run one after another; the threads of a block
// are fibers (ucontext) on one OS thread, each run until it reaches __syncthreads() or a
// warp-synchronous call, in an order the test chooses (FC_EMU_SCHEDULE), so a missing
// barrier changes the result. WMMA is emulated warp-wide: lane 0 of a warp holds and
// computes the whole 16 x 16 fragment (fp32 accumulation), the other lanes do nothing,
// which is what the API promises as long as fragment elements are never addressed per
// lane (tiles.cuh never does). Alignment and ldm rules of WMMA, shared-memory limits and
// launch-configuration limits are checked as a GPU would reject them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fc_emu {

extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Records the first error of the running launch and parks the calling fiber for good;
// the launch then throws std::runtime_error with `what`.
[[noreturn]] void fail(const char* what);
void syncthreads();
void warp_wait();               // every lane of the calling warp reaches this point
int linear_tid();               // x + y bx + z bx by
uint64_t* shfl_slots(int call);  // 1024 slots of the given parity (call & 1)
int next_shfl_call();            // per-fiber counter of warp-synchronous calls
unsigned char* static_shared(std::size_t bytes, std::size_t align);
unsigned char* dynamic_shared(std::size_t align);

void run_launch(const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem,
                const std::function<void()>& body);

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t smem;

  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel called with the wrong argument count");
    std::tuple<P...> params(static_cast<P>(std::forward<A>(args))...);  // by value, as CUDA
    run_launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
               [&] { std::apply(kernel, params); });
  }
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem = 0,
                    cudaStream_t /*stream: launches run synchronously*/ = nullptr) {
  return Launch<P...>{kernel, grid, block, smem};
}

template <class T>
T* shared_array(std::size_t count, std::size_t align) {
  return reinterpret_cast<T*>(static_shared(count * sizeof(T), align));
}
template <class T>
T* dynamic_array(std::size_t align) {
  return reinterpret_cast<T*>(dynamic_shared(align));
}

inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

}  // namespace fc_emu

// ----------------------------------------------------------------------------- builtins
#define threadIdx (::fc_emu::g_thread_idx)
#define blockIdx (::fc_emu::g_block_idx)
#define blockDim (::fc_emu::g_block_dim)
#define gridDim (::fc_emu::g_grid_dim)
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// nvcc's cuda_runtime.h has this overload for kernel pointers; host compilers do not see it.
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

inline void __syncthreads() { ::fc_emu::syncthreads(); }

// Full-warp butterfly exchange. Slots alternate by call parity, so a lane that runs ahead
// into the next shuffle cannot overwrite a value its partner has not read yet.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
  if (mask != 0xffffffffu || width != 32) ::fc_emu::fail("partial-warp shuffles are not emulated");
  const int call = ::fc_emu::next_shfl_call();
  uint64_t* slots = ::fc_emu::shfl_slots(call);
  const int tid = ::fc_emu::linear_tid();
  std::memcpy(&slots[tid], &value, sizeof(T));
  ::fc_emu::warp_wait();
  const int partner = (tid & ~31) | ((tid & 31) ^ (lane_mask & 31));
  T out;
  std::memcpy(&out, &slots[partner], sizeof(T));
  return out;
}

// One fiber runs at a time, so a read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// ----------------------------------------------------------------------------- WMMA
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Only the 16 x 16 x 16 shape tiles.cuh uses. `v` is private to the emulation: kernel
// code that addressed fragment elements would not compile, as it should not be written.
template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulated WMMA shape is 16x16x16 only");

 public:
  float v[256];
};

namespace detail {
inline bool lane0() { return (::fc_emu::linear_tid() & 31) == 0; }

template <class T>
inline void check_operand(const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::fc_emu::fail("WMMA operand pointer is not 256-bit (32-byte) aligned");
  if ((ldm * sizeof(T)) % 16 != 0) ::fc_emu::fail("WMMA ldm is not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads are not emulated");
  detail::check_operand<T>(p, ldm);
  if (!detail::lane0()) return;
  // Element (r, c) of the fragment: matrix_a is M x K (rows i, cols k), matrix_b K x N.
  constexpr bool row = std::is_same<L, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = ::fc_emu::to_f(row ? p[r * ldm + c] : p[c * ldm + r]);
}

template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!detail::lane0()) return;
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc = std::fmaf(a.v[i * 16 + k], b.v[k * 16 + j], acc);
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_operand<float>(p, ldm);
  if (!detail::lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * 16 + c];
}

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float value) {
  for (float& x : f.v) x = value;
}

}  // namespace wmma
}  // namespace nvcuda
