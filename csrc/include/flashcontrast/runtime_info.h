// Runtime information and a self-test kernel. Torch-free and Python-free: callers pass raw
// pointers and streams; every CUDA failure is thrown as flashcontrast::CudaError naming the
// CUDA call, and bad arguments as std::invalid_argument. bindings.cpp turns both into
// Python exceptions.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace flashcontrast {

class CudaError : public std::runtime_error {
 public:
  CudaError(const char* call, const char* what)
      : std::runtime_error(std::string(call) + " failed: " + what) {}
};

// cudaRuntimeGetVersion of the (statically linked) runtime, e.g. 13000 for CUDA 13.0.
int cuda_runtime_version();
// cudaDriverGetVersion: the CUDA version the installed driver supports; 0 without a driver.
int cuda_driver_version();
// Number of visible devices; 0 (not an error) when there is no device or no driver.
int cuda_device_count();
// Compute capabilities this binary carries code for, e.g. {80, 86, 89, 90, 100, 120}.
std::vector<int> compiled_archs();

// Fills n floats at the device pointer `data` with `value` on `stream` (a cudaStream_t; 0
// is the legacy default stream), on the device that owns `data`. Asynchronous: errors raised
// by the kernel itself surface at the next synchronizing call.
void selftest_fill(float* data, int64_t n, float value, void* stream);

}  // namespace flashcontrast
