// flashcontrast._C: the only file that knows Python. Tensors arrive as integers (data_ptr(),
// the stream's cuda_stream); the kernels in csrc/kernels never see Python or torch.
// Every C++ exception leaves as a Python exception prefixed with the function's name:
// std::invalid_argument -> ValueError, anything else (flashcontrast::CudaError) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "flashcontrast/clip.h"
#include "flashcontrast/runtime_info.h"

namespace py = pybind11;
namespace fc = flashcontrast;

namespace {

[[noreturn]] void rethrow_as_python(const char* name) {
  const std::string prefix = std::string("flashcontrast._C.") + name + ": ";
  try {
    throw;
  } catch (const py::error_already_set&) {
    throw;
  } catch (const std::invalid_argument& e) {
    throw py::value_error(prefix + e.what());
  } catch (const std::exception& e) {
    throw std::runtime_error(prefix + e.what());
  }
}

// m.def(name, fn) with the exception translation above; `name` is used for both.
template <typename R, typename... Args, typename... Extra>
void def(py::module_& m, const char* name, R (*fn)(Args...), const Extra&... extra) {
  m.def(
      name,
      [name, fn](Args... args) -> R {
        try {
          return fn(args...);
        } catch (...) {
          rethrow_as_python(name);
        }
      },
      extra...);
}

void selftest_fill(std::uintptr_t ptr, std::int64_t n, float value, std::uintptr_t stream) {
  fc::selftest_fill(reinterpret_cast<float*>(ptr), n, value, reinterpret_cast<void*>(stream));
}

template <typename T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

fc::PairInputs pair_inputs(std::uintptr_t a_ptr, std::uintptr_t b_ptr, std::int64_t n,
                           std::int64_t d, std::int64_t a_stride0, std::int64_t a_stride1,
                           std::int64_t b_stride0, std::int64_t b_stride1,
                           const std::string& dtype, std::uintptr_t scale_ptr,
                           std::uintptr_t bias_ptr) {
  fc::PairInputs in;
  in.a = as_ptr<const void>(a_ptr);
  in.b = as_ptr<const void>(b_ptr);
  in.n = n;
  in.d = d;
  in.a_stride0 = a_stride0;
  in.a_stride1 = a_stride1;
  in.b_stride0 = b_stride0;
  in.b_stride1 = b_stride1;
  in.dtype = fc::parse_dtype(dtype);
  in.scale = as_ptr<const float>(scale_ptr);
  in.bias = as_ptr<const float>(bias_ptr);  // 0: no bias
  return in;
}

void clip_forward(std::uintptr_t a_ptr, std::uintptr_t b_ptr, std::int64_t n, std::int64_t d,
                  std::int64_t a_stride0, std::int64_t a_stride1, std::int64_t b_stride0,
                  std::int64_t b_stride1, const std::string& dtype, std::uintptr_t scale_ptr,
                  std::uintptr_t bias_ptr, std::uintptr_t row_lse_ptr, std::uintptr_t col_lse_ptr,
                  std::uintptr_t diag_ptr, std::uintptr_t workspace_ptr,
                  std::int64_t workspace_elems, std::uintptr_t stream) {
  fc::clip_forward(pair_inputs(a_ptr, b_ptr, n, d, a_stride0, a_stride1, b_stride0, b_stride1,
                               dtype, scale_ptr, bias_ptr),
                   as_ptr<float>(row_lse_ptr), as_ptr<float>(col_lse_ptr), as_ptr<float>(diag_ptr),
                   as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

void clip_backward(std::uintptr_t a_ptr, std::uintptr_t b_ptr, std::int64_t n, std::int64_t d,
                   std::int64_t a_stride0, std::int64_t a_stride1, std::int64_t b_stride0,
                   std::int64_t b_stride1, const std::string& dtype, std::uintptr_t scale_ptr,
                   std::uintptr_t bias_ptr, std::uintptr_t row_lse_ptr,
                   std::uintptr_t col_lse_ptr, std::uintptr_t grad_ptr, std::uintptr_t da_ptr,
                   std::uintptr_t db_ptr, std::uintptr_t dscale_ptr, std::uintptr_t dbias_ptr,
                   std::uintptr_t workspace_ptr, std::int64_t workspace_elems,
                   std::uintptr_t stream) {
  fc::clip_backward(pair_inputs(a_ptr, b_ptr, n, d, a_stride0, a_stride1, b_stride0, b_stride1,
                                dtype, scale_ptr, bias_ptr),
                    as_ptr<const float>(row_lse_ptr), as_ptr<const float>(col_lse_ptr),
                    as_ptr<const float>(grad_ptr), as_ptr<void>(da_ptr), as_ptr<void>(db_ptr),
                    as_ptr<float>(dscale_ptr), as_ptr<float>(dbias_ptr),
                    as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashcontrast CUDA kernels (pointers and streams passed as integers)";
  def(m, "cuda_runtime_version", &fc::cuda_runtime_version,
      "CUDA runtime version this module links statically, e.g. 13000 for 13.0.");
  def(m, "cuda_driver_version", &fc::cuda_driver_version,
      "CUDA version supported by the installed driver; 0 when there is no driver.");
  def(m, "cuda_device_count", &fc::cuda_device_count,
      "Number of visible CUDA devices; 0 when there is no device or no driver.");
  def(m, "compiled_archs", &fc::compiled_archs,
      "Compute capabilities this binary was compiled for, e.g. [80, 86, 89, 90].");
  def(m, "_selftest_fill", &selftest_fill, py::arg("ptr"), py::arg("n"), py::arg("value"),
      py::arg("stream") = 0,
      "Fill n float32 values at device pointer `ptr` with `value` on `stream` (async).");

  // CLIP InfoNCE. Pointers are device addresses (data_ptr()), strides in elements, dtype
  // "float32" | "float16" | "bfloat16", bias_ptr 0 for no bias, stream a cudaStream_t.
  // Outputs and workspaces are allocated by the caller; nothing synchronizes the host.
  def(m, "clip_forward_workspace_elems", &fc::clip_forward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("device"),
      "float32 elements of clip_forward's workspace for (n, d) inputs on CUDA device `device`.");
  def(m, "clip_backward_workspace_elems", &fc::clip_backward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("device"),
      "float32 elements of clip_backward's workspace for (n, d) inputs on CUDA device `device`.");
  def(m, "clip_forward", &clip_forward, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("b_stride0"),
      py::arg("b_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("bias_ptr"),
      py::arg("row_lse_ptr"), py::arg("col_lse_ptr"), py::arg("diag_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_elems"), py::arg("stream"),
      "S = scale * A B^T + bias: writes row_lse, col_lse, diag ((n,) float32 each).");
  def(m, "clip_backward", &clip_backward, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("b_stride0"),
      py::arg("b_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("bias_ptr"),
      py::arg("row_lse_ptr"), py::arg("col_lse_ptr"), py::arg("grad_ptr"), py::arg("da_ptr"),
      py::arg("db_ptr"), py::arg("dscale_ptr"), py::arg("dbias_ptr"), py::arg("workspace_ptr"),
      py::arg("workspace_elems"), py::arg("stream"),
      "Writes da, db (contiguous (n, d), input dtype) and dscale, dbias (float32 scalars).");
}
