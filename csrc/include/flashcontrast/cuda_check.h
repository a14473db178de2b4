// Host-side CUDA error handling shared by the kernel files (csrc/kernels/*.cu). Includes the
// CUDA runtime, so only .cu files include it; bindings.cpp sees the torch- and CUDA-free
// launch declarations (pair.h, gram.h, symile.h) only.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "flashcontrast/runtime_info.h"  // CudaError

namespace flashcontrast {
namespace detail {

// Throws CudaError naming the call; clears the (non-sticky) error so later calls start clean.
inline void cuda_check(cudaError_t err, const char* call) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  throw CudaError(call, cudaGetErrorString(err));
}

// After a <<<...>>> launch: configuration errors (too many threads, no kernel image for this
// GPU, ...) are reported here, naming the kernel. Errors inside the kernel are asynchronous.
inline void check_launch(const char* kernel) {
  cuda_check(cudaGetLastError(), (std::string("cudaLaunchKernel(") + kernel + ")").c_str());
}

// Makes `device` current for the scope of the object, as the stream passed in belongs to it.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (device != previous_) {
      cuda_check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceScope() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The device that owns `ptr`; std::invalid_argument for host or unknown memory.
inline int device_of(const void* ptr, const char* name) {
  cudaPointerAttributes attrs{};
  cuda_check(cudaPointerGetAttributes(&attrs, ptr), "cudaPointerGetAttributes");
  if (attrs.type != cudaMemoryTypeDevice && attrs.type != cudaMemoryTypeManaged) {
    throw std::invalid_argument(std::string(name) + " is not CUDA device memory");
  }
  return attrs.device;
}

inline int sm_count(int device) {
  int count = 0;
  cuda_check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
  return count;
}

// What every launcher sets up after its argument checks: the device that owns `ptr`
// (device_of: std::invalid_argument naming `name`), made current for the object's lifetime
// (DeviceScope), its SM count (which sizes the grids and workspaces) and the caller's
// stream, in that order.
struct LaunchScope {
  int device;
  DeviceScope scope;
  int sms;
  cudaStream_t stream;

  LaunchScope(const void* ptr, const char* name, void* caller_stream)
      : device(device_of(ptr, name)),
        scope(device),
        sms(sm_count(device)),
        stream(static_cast<cudaStream_t>(caller_stream)) {}
};

}  // namespace detail
}  // namespace flashcontrast

#ifndef FC_CUDA_CHECK
#define FC_CUDA_CHECK(call) ::flashcontrast::detail::cuda_check((call), #call)
#endif
