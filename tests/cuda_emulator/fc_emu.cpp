// fc_emu.cpp: the scheduler behind fc_emu.h and the CUDA runtime calls csrc/ makes, for a
// CPU "device 0" whose memory is host memory (tests only; see README.md here).
//
// Environment, read at every launch:
//   FC_EMU_SCHEDULE  forward (default) | reverse | shuffle[:SEED]: the order in which blocks
//                    run and in which a block's ready threads run between barriers.
//   FC_EMU_SMS       multiprocessors the device reports (default 4: several programs per
//                    grid dimension at test sizes).
//   FC_EMU_SMEM_OPTIN  opt-in shared memory per block in bytes (default 232448, sm_90).
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace fc_emu {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr std::size_t kStack = 512 * 1024;        // per fiber, committed lazily by mmap
constexpr std::size_t kStaticSmem = 48 * 1024;    // CUDA's static shared-memory limit
constexpr std::size_t kDefaultDynamic = 48 * 1024;  // above this a kernel must opt in

enum class State { Ready, AtBarrier, AtWarp, Done, Failed };

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  State state = State::Done;
  std::size_t smem_cursor = 0;
  int shfl_calls = 0;
};

struct Schedule {
  enum Kind { kForward, kReverse, kShuffle } kind = kForward;
  std::mt19937_64 rng;
};

std::mutex g_launch_mutex;  // one launch at a time: the state below is global
std::vector<Fiber> g_fibers;
ucontext_t g_scheduler;
int g_current = 0;
const std::function<void()>* g_body = nullptr;
std::string g_error;
alignas(128) unsigned char g_static[kStaticSmem];
std::vector<unsigned char> g_dynamic_storage;
unsigned char* g_dynamic = nullptr;
std::size_t g_dynamic_bytes = 0, g_smem_optin = 232448;
uint64_t g_slots[2][1024];
std::map<const void*, int> g_max_dynamic;  // cudaFuncAttributeMaxDynamicSharedMemorySize
cudaError_t g_last_error = cudaSuccess;
int g_device = 0;

long env_long(const char* name, long fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtol(v, nullptr, 10) : fallback;
}

Schedule read_schedule() {
  Schedule s;
  const char* v = std::getenv("FC_EMU_SCHEDULE");
  const std::string text = v ? v : "forward";
  if (text == "reverse") {
    s.kind = Schedule::kReverse;
  } else if (text.rfind("shuffle", 0) == 0) {
    s.kind = Schedule::kShuffle;
    const auto colon = text.find(':');
    s.rng.seed(colon == std::string::npos ? 0 : std::stoull(text.substr(colon + 1)));
  } else if (text != "forward") {
    throw std::invalid_argument("FC_EMU_SCHEDULE must be forward, reverse or shuffle[:SEED]");
  }
  return s;
}

void order(std::vector<int>& idx, Schedule& s) {
  std::iota(idx.begin(), idx.end(), 0);
  if (s.kind == Schedule::kReverse) std::reverse(idx.begin(), idx.end());
  if (s.kind == Schedule::kShuffle) std::shuffle(idx.begin(), idx.end(), s.rng);
}

void fiber_entry() {
  (*g_body)();
  g_fibers[g_current].state = State::Done;  // uc_link returns to the scheduler
}

void set_thread(int t) {
  g_current = t;
  const unsigned bx = g_block_dim.x, by = g_block_dim.y;
  g_thread_idx = make_uint3(t % bx, (t / bx) % by, t / (bx * by));
}

void yield(State state) {
  Fiber& f = g_fibers[g_current];
  f.state = state;
  swapcontext(&f.ctx, &g_scheduler);
}

// Runs one block to completion; throws on an emulated fault or a barrier deadlock.
void run_block(int threads, Schedule& sched) {
  std::memset(g_static, 0xFF, sizeof(g_static));
  if (g_dynamic_bytes) std::memset(g_dynamic, 0xFF, g_dynamic_bytes);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = g_fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &g_scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
    f.smem_cursor = 0;
    f.shfl_calls = 0;
  }
  std::vector<int> idx(threads);
  for (;;) {
    order(idx, sched);
    for (int t : idx) {
      if (g_fibers[t].state != State::Ready) continue;
      set_thread(t);
      swapcontext(&g_scheduler, &g_fibers[t].ctx);
      if (!g_error.empty()) throw std::runtime_error(g_error);
    }
    // Every thread now waits or is done. Release whole warps first, then the block.
    int done = 0, at_barrier = 0;
    bool released = false;
    for (int w0 = 0; w0 < threads; w0 += 32) {
      const int w1 = std::min(threads, w0 + 32);
      int at_warp = 0;
      for (int t = w0; t < w1; ++t) at_warp += g_fibers[t].state == State::AtWarp;
      if (at_warp == 0) continue;
      if (at_warp != w1 - w0) {
        throw std::runtime_error("fc_emu: a warp-synchronous call was not reached by every "
                                 "lane of warp " + std::to_string(w0 / 32) +
                                 " (divergent or exited lanes)");
      }
      for (int t = w0; t < w1; ++t) g_fibers[t].state = State::Ready;
      released = true;
    }
    if (released) continue;
    for (int t = 0; t < threads; ++t) {
      done += g_fibers[t].state == State::Done;
      at_barrier += g_fibers[t].state == State::AtBarrier;
    }
    if (done == threads) return;
    if (done + at_barrier != threads) throw std::runtime_error("fc_emu: deadlock");
    for (int t = 0; t < threads; ++t)  // exited threads count as arrived, as on sm_70+
      if (g_fibers[t].state == State::AtBarrier) g_fibers[t].state = State::Ready;
  }
}

}  // namespace

[[noreturn]] void fail(const char* what) {
  if (g_error.empty()) g_error = std::string("fc_emu: ") + what;
  for (;;) yield(State::Failed);  // never resumed
}

void syncthreads() { yield(State::AtBarrier); }
void warp_wait() { yield(State::AtWarp); }
int linear_tid() { return g_current; }
uint64_t* shfl_slots(int call) { return g_slots[call & 1]; }
int next_shfl_call() { return g_fibers[g_current].shfl_calls++; }

unsigned char* static_shared(std::size_t bytes, std::size_t align) {
  Fiber& f = g_fibers[g_current];
  const std::size_t start = (f.smem_cursor + align - 1) / align * align;
  if (start + bytes > kStaticSmem) fail("static shared memory above 48 KiB");
  if (start + bytes + g_dynamic_bytes > g_smem_optin)
    fail("static + dynamic shared memory above the device's per-block limit");
  f.smem_cursor = start + bytes;
  return g_static + start;
}

unsigned char* dynamic_shared(std::size_t align) {
  if (reinterpret_cast<uintptr_t>(g_dynamic) % align != 0) fail("dynamic shared misaligned");
  return g_dynamic;
}

void run_launch(const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem,
                const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const long threads = long(block.x) * block.y * block.z;
  const auto limit = g_max_dynamic.count(kernel) ? std::size_t(g_max_dynamic[kernel])
                                                 : kDefaultDynamic;
  g_smem_optin = std::size_t(env_long("FC_EMU_SMEM_OPTIN", 232448));
  if (threads < 1 || threads > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 ||
      grid.z < 1 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (dynamic_smem > limit || dynamic_smem > g_smem_optin) {
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  Schedule sched = read_schedule();
  if (g_fibers.size() < std::size_t(threads)) {
    const std::size_t old = g_fibers.size();
    g_fibers.resize(threads);
    for (std::size_t t = old; t < g_fibers.size(); ++t) {
      void* s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (s == MAP_FAILED) throw std::runtime_error("fc_emu: cannot map a fiber stack");
      g_fibers[t].stack = s;
    }
  }
  g_dynamic_storage.assign(dynamic_smem + 128, 0);
  g_dynamic = g_dynamic_storage.data() +
              (128 - reinterpret_cast<uintptr_t>(g_dynamic_storage.data()) % 128) % 128;
  g_dynamic_bytes = dynamic_smem;
  g_body = &body;
  g_error.clear();
  g_block_dim = block;
  g_grid_dim = grid;
  const long blocks = long(grid.x) * grid.y * grid.z;
  std::vector<int> block_order(blocks);
  order(block_order, sched);
  for (int b : block_order) {
    g_block_idx = make_uint3(b % grid.x, (b / grid.x) % grid.y, b / (long(grid.x) * grid.y));
    run_block(int(threads), sched);
  }
}

}  // namespace fc_emu

// ----------------------------------------------------------------------------- runtime API
// Just what csrc/ calls. Memory is host memory; "device 0" is the only device.
extern "C" {

cudaError_t cudaGetLastError() {
  const cudaError_t e = fc_emu::g_last_error;
  fc_emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidDevice: return "invalid device ordinal (emulated)";
    default: return "unknown error (emulated)";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = fc_emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return fc_emu::g_last_error = cudaErrorInvalidDevice;
  fc_emu::g_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  *version = 0;  // no driver: the emulator is not one
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* /*ptr*/) {
  std::memset(attributes, 0, sizeof(*attributes));
  attributes->type = cudaMemoryTypeDevice;
  attributes->device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = int(fc_emu::env_long("FC_EMU_SMS", 4));
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(fc_emu::env_long("FC_EMU_SMEM_OPTIN", 232448));
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > fc_emu::env_long("FC_EMU_SMEM_OPTIN", 232448))
      return fc_emu::g_last_error = cudaErrorInvalidValue;
    fc_emu::g_max_dynamic[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t /*stream*/) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}

}  // extern "C"
