// flashcontrast._C: the only file that knows Python. Tensors arrive as integers (data_ptr(),
// the stream's cuda_stream); the kernels in csrc/kernels never see Python or torch.
// Every C++ exception leaves as a Python exception prefixed with the function's name:
// std::invalid_argument -> ValueError, anything else (flashcontrast::CudaError) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "flashcontrast/clip.h"
#include "flashcontrast/gram.h"
#include "flashcontrast/multiview.h"
#include "flashcontrast/runtime_info.h"
#include "flashcontrast/siglip.h"
#include "flashcontrast/symile.h"

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
                  std::int64_t workspace_elems, std::uintptr_t stream,
                  std::uintptr_t groups_ptr) {
  fc::PairInputs in = pair_inputs(a_ptr, b_ptr, n, d, a_stride0, a_stride1, b_stride0,
                                  b_stride1, dtype, scale_ptr, bias_ptr);
  in.groups = as_ptr<const std::int64_t>(groups_ptr);  // 0: no groups
  fc::clip_forward(in, as_ptr<float>(row_lse_ptr), as_ptr<float>(col_lse_ptr), as_ptr<float>(diag_ptr),
                   as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

void clip_backward(std::uintptr_t a_ptr, std::uintptr_t b_ptr, std::int64_t n, std::int64_t d,
                   std::int64_t a_stride0, std::int64_t a_stride1, std::int64_t b_stride0,
                   std::int64_t b_stride1, const std::string& dtype, std::uintptr_t scale_ptr,
                   std::uintptr_t bias_ptr, std::uintptr_t row_lse_ptr,
                   std::uintptr_t col_lse_ptr, std::uintptr_t grad_ptr, std::uintptr_t da_ptr,
                   std::uintptr_t db_ptr, std::uintptr_t dscale_ptr, std::uintptr_t dbias_ptr,
                   std::uintptr_t workspace_ptr, std::int64_t workspace_elems,
                   std::uintptr_t stream, std::uintptr_t groups_ptr) {
  fc::PairInputs in = pair_inputs(a_ptr, b_ptr, n, d, a_stride0, a_stride1, b_stride0,
                                  b_stride1, dtype, scale_ptr, bias_ptr);
  in.groups = as_ptr<const std::int64_t>(groups_ptr);  // 0: no groups
  fc::clip_backward(in, as_ptr<const float>(row_lse_ptr), as_ptr<const float>(col_lse_ptr),
                    as_ptr<const float>(grad_ptr), as_ptr<void>(da_ptr), as_ptr<void>(db_ptr),
                    as_ptr<float>(dscale_ptr), as_ptr<float>(dbias_ptr),
                    as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

using u64 = std::uintptr_t;
using i64 = std::int64_t;

void rowce_forward(u64 a_ptr, u64 w_ptr, i64 n, i64 d, i64 a_stride0, i64 a_stride1,
                   i64 w_stride0, i64 w_stride1, const std::string& dtype, u64 scale_ptr,
                   u64 diag_logit_ptr, u64 row_lse_ptr, u64 workspace_ptr, i64 workspace_elems,
                   u64 stream) {
  fc::rowce_forward(pair_inputs(a_ptr, w_ptr, n, d, a_stride0, a_stride1, w_stride0, w_stride1,
                                dtype, scale_ptr, 0),
                    as_ptr<const float>(diag_logit_ptr), as_ptr<float>(row_lse_ptr),
                    as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

void rowce_backward(u64 a_ptr, u64 w_ptr, i64 n, i64 d, i64 a_stride0, i64 a_stride1,
                    i64 w_stride0, i64 w_stride1, const std::string& dtype, u64 scale_ptr,
                    u64 diag_logit_ptr, u64 row_lse_ptr, u64 grad_rows_ptr, u64 da_ptr,
                    u64 dw_ptr, u64 dscale_ptr, u64 ddiag_ptr, u64 workspace_ptr,
                    i64 workspace_elems, u64 stream) {
  fc::rowce_backward(pair_inputs(a_ptr, w_ptr, n, d, a_stride0, a_stride1, w_stride0, w_stride1,
                                 dtype, scale_ptr, 0),
                     as_ptr<const float>(diag_logit_ptr), as_ptr<const float>(row_lse_ptr),
                     as_ptr<const float>(grad_rows_ptr), as_ptr<void>(da_ptr),
                     as_ptr<void>(dw_ptr), as_ptr<float>(dscale_ptr), as_ptr<float>(ddiag_ptr),
                     as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

fc::TripleInputs triple_inputs(u64 x_ptr, u64 y_ptr, u64 z_ptr, i64 n, i64 d, i64 x_stride0,
                               i64 x_stride1, i64 y_stride0, i64 y_stride1, i64 z_stride0,
                               i64 z_stride1, const std::string& dtype, u64 scale_ptr) {
  fc::TripleInputs in;
  in.x = as_ptr<const void>(x_ptr);
  in.y = as_ptr<const void>(y_ptr);
  in.z = as_ptr<const void>(z_ptr);
  in.n = n;
  in.d = d;
  in.x_stride0 = x_stride0;
  in.x_stride1 = x_stride1;
  in.y_stride0 = y_stride0;
  in.y_stride1 = y_stride1;
  in.z_stride0 = z_stride0;
  in.z_stride1 = z_stride1;
  in.dtype = fc::parse_dtype(dtype);
  in.scale = as_ptr<const float>(scale_ptr);
  return in;
}

void symile_n2_forward(u64 x_ptr, u64 y_ptr, u64 z_ptr, i64 n, i64 d, i64 x_stride0,
                       i64 x_stride1, i64 y_stride0, i64 y_stride1, i64 z_stride0,
                       i64 z_stride1, const std::string& dtype, u64 scale_ptr, u64 row_lse_ptr,
                       u64 workspace_ptr, i64 workspace_elems, u64 stream) {
  fc::symile_n2_forward(triple_inputs(x_ptr, y_ptr, z_ptr, n, d, x_stride0, x_stride1, y_stride0,
                                      y_stride1, z_stride0, z_stride1, dtype, scale_ptr),
                        as_ptr<float>(row_lse_ptr), as_ptr<float>(workspace_ptr),
                        workspace_elems, as_ptr<void>(stream));
}

void symile_n2_backward(u64 x_ptr, u64 y_ptr, u64 z_ptr, i64 n, i64 d, i64 x_stride0,
                        i64 x_stride1, i64 y_stride0, i64 y_stride1, i64 z_stride0,
                        i64 z_stride1, const std::string& dtype, u64 scale_ptr,
                        u64 row_lse_ptr, u64 grad_rows_ptr, u64 dx_ptr, u64 dy_ptr, u64 dz_ptr,
                        u64 dscale_ptr, u64 workspace_ptr, i64 workspace_elems, u64 stream) {
  fc::symile_n2_backward(triple_inputs(x_ptr, y_ptr, z_ptr, n, d, x_stride0, x_stride1,
                                       y_stride0, y_stride1, z_stride0, z_stride1, dtype,
                                       scale_ptr),
                         as_ptr<const float>(row_lse_ptr), as_ptr<const float>(grad_rows_ptr),
                         as_ptr<void>(dx_ptr), as_ptr<void>(dy_ptr), as_ptr<void>(dz_ptr),
                         as_ptr<float>(dscale_ptr), as_ptr<float>(workspace_ptr),
                         workspace_elems, as_ptr<void>(stream));
}

void siglip_forward(u64 a_ptr, u64 b_ptr, i64 n, i64 d, i64 a_stride0, i64 a_stride1,
                    i64 b_stride0, i64 b_stride1, const std::string& dtype, u64 scale_ptr,
                    u64 bias_ptr, u64 total_ptr, u64 workspace_ptr, i64 workspace_elems,
                    u64 stream) {
  fc::siglip_forward(pair_inputs(a_ptr, b_ptr, n, d, a_stride0, a_stride1, b_stride0,
                                 b_stride1, dtype, scale_ptr, bias_ptr),
                     as_ptr<float>(total_ptr), as_ptr<float>(workspace_ptr), workspace_elems,
                     as_ptr<void>(stream));
}

void siglip_backward(u64 a_ptr, u64 b_ptr, i64 n, i64 d, i64 a_stride0, i64 a_stride1,
                     i64 b_stride0, i64 b_stride1, const std::string& dtype, u64 scale_ptr,
                     u64 bias_ptr, u64 grad_ptr, u64 da_ptr, u64 db_ptr, u64 dscale_ptr,
                     u64 dbias_ptr, u64 workspace_ptr, i64 workspace_elems, u64 stream) {
  fc::siglip_backward(pair_inputs(a_ptr, b_ptr, n, d, a_stride0, a_stride1, b_stride0,
                                  b_stride1, dtype, scale_ptr, bias_ptr),
                      as_ptr<const float>(grad_ptr), as_ptr<void>(da_ptr), as_ptr<void>(db_ptr),
                      as_ptr<float>(dscale_ptr), as_ptr<float>(dbias_ptr),
                      as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

fc::SelfSimInputs selfsim_inputs(u64 u_ptr, i64 v, i64 n, i64 d, i64 stride_v, i64 stride_n,
                                 i64 stride_d, const std::string& dtype, u64 scale_ptr,
                                 bool per_view, u64 groups_ptr) {
  fc::SelfSimInputs in;
  in.u = as_ptr<const void>(u_ptr);
  in.v = v;
  in.n = n;
  in.d = d;
  in.stride_v = stride_v;
  in.stride_n = stride_n;
  in.stride_d = stride_d;
  in.dtype = fc::parse_dtype(dtype);
  in.scale = as_ptr<const float>(scale_ptr);
  in.per_view = per_view;
  in.groups = as_ptr<const std::int64_t>(groups_ptr);  // 0: no groups
  return in;
}

void selfsim_rowlse_forward(u64 u_ptr, i64 v, i64 n, i64 d, i64 stride_v, i64 stride_n,
                            i64 stride_d, const std::string& dtype, u64 scale_ptr,
                            bool per_view, u64 groups_ptr, u64 row_lse_ptr, u64 workspace_ptr,
                            i64 workspace_elems, u64 stream) {
  fc::selfsim_rowlse_forward(selfsim_inputs(u_ptr, v, n, d, stride_v, stride_n, stride_d, dtype,
                                            scale_ptr, per_view, groups_ptr),
                             as_ptr<float>(row_lse_ptr), as_ptr<float>(workspace_ptr),
                             workspace_elems, as_ptr<void>(stream));
}

void selfsim_rowlse_backward(u64 u_ptr, i64 v, i64 n, i64 d, i64 stride_v, i64 stride_n,
                             i64 stride_d, const std::string& dtype, u64 scale_ptr,
                             bool per_view, u64 groups_ptr, u64 row_lse_ptr, u64 grad_rows_ptr,
                             u64 du_ptr, u64 dscale_ptr, u64 workspace_ptr,
                             i64 workspace_elems, u64 stream) {
  fc::selfsim_rowlse_backward(selfsim_inputs(u_ptr, v, n, d, stride_v, stride_n, stride_d,
                                             dtype, scale_ptr, per_view, groups_ptr),
                              as_ptr<const float>(row_lse_ptr), as_ptr<const float>(grad_rows_ptr),
                              as_ptr<float>(du_ptr), as_ptr<float>(dscale_ptr),
                              as_ptr<float>(workspace_ptr), workspace_elems,
                              as_ptr<void>(stream));
}

fc::GramInputs gram_inputs(u64 anchor_ptr, u64 others_ptr, i64 n, i64 d, i64 k,
                           i64 anchor_stride0, i64 anchor_stride1, i64 others_stride0,
                           i64 others_stride1, i64 others_stride2, const std::string& dtype,
                           u64 scale_ptr, u64 det_h_ptr, u64 adj_h_ptr, u64 floor_h_ptr) {
  fc::GramInputs in;
  in.anchor = as_ptr<const void>(anchor_ptr);
  in.others = as_ptr<const void>(others_ptr);
  in.n = n;
  in.d = d;
  in.k = k;
  in.anchor_stride0 = anchor_stride0;
  in.anchor_stride1 = anchor_stride1;
  in.others_stride0 = others_stride0;
  in.others_stride1 = others_stride1;
  in.others_stride2 = others_stride2;
  in.dtype = fc::parse_dtype(dtype);
  in.scale = as_ptr<const float>(scale_ptr);
  in.det_h = as_ptr<const float>(det_h_ptr);
  in.adj_h = as_ptr<const float>(adj_h_ptr);
  in.floor_h = as_ptr<const float>(floor_h_ptr);
  return in;
}

void gram_forward(u64 anchor_ptr, u64 others_ptr, i64 n, i64 d, i64 k, i64 anchor_stride0,
                  i64 anchor_stride1, i64 others_stride0, i64 others_stride1,
                  i64 others_stride2, const std::string& dtype, u64 scale_ptr, u64 det_h_ptr,
                  u64 adj_h_ptr, u64 floor_h_ptr, u64 row_lse_ptr, u64 col_lse_ptr,
                  u64 diag_ptr, u64 row_sum_ptr, u64 col_sum_ptr, u64 workspace_ptr,
                  i64 workspace_elems, u64 stream) {
  fc::gram_forward(gram_inputs(anchor_ptr, others_ptr, n, d, k, anchor_stride0, anchor_stride1,
                               others_stride0, others_stride1, others_stride2, dtype, scale_ptr,
                               det_h_ptr, adj_h_ptr, floor_h_ptr),
                   as_ptr<float>(row_lse_ptr), as_ptr<float>(col_lse_ptr), as_ptr<float>(diag_ptr),
                   as_ptr<float>(row_sum_ptr), as_ptr<float>(col_sum_ptr),
                   as_ptr<float>(workspace_ptr), workspace_elems, as_ptr<void>(stream));
}

void gram_backward(u64 anchor_ptr, u64 others_ptr, i64 n, i64 d, i64 k, i64 anchor_stride0,
                   i64 anchor_stride1, i64 others_stride0, i64 others_stride1,
                   i64 others_stride2, const std::string& dtype, u64 scale_ptr, u64 det_h_ptr,
                   u64 adj_h_ptr, u64 floor_h_ptr, u64 row_lse_ptr, u64 col_lse_ptr,
                   u64 grad_ptr, float label_smoothing, u64 d_anchor_ptr, u64 d_others_u_ptr,
                   u64 dscale_ptr, u64 col_tt_ptr, u64 col_uu_ptr, u64 workspace_ptr,
                   i64 workspace_elems, u64 stream) {
  fc::gram_backward(gram_inputs(anchor_ptr, others_ptr, n, d, k, anchor_stride0, anchor_stride1,
                                others_stride0, others_stride1, others_stride2, dtype, scale_ptr,
                                det_h_ptr, adj_h_ptr, floor_h_ptr),
                    as_ptr<const float>(row_lse_ptr), as_ptr<const float>(col_lse_ptr),
                    as_ptr<const float>(grad_ptr), label_smoothing, as_ptr<void>(d_anchor_ptr),
                    as_ptr<void>(d_others_u_ptr), as_ptr<float>(dscale_ptr),
                    as_ptr<float>(col_tt_ptr), as_ptr<float>(col_uu_ptr),
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
      py::arg("groups_ptr") = 0,
      "S = scale * A B^T + bias: writes row_lse, col_lse, diag ((n,) float32 each). "
      "groups_ptr: (n,) int64 device group ids, or 0 for none (S_ij = -inf where i != j "
      "and the ids are equal).");
  def(m, "clip_backward", &clip_backward, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("b_stride0"),
      py::arg("b_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("bias_ptr"),
      py::arg("row_lse_ptr"), py::arg("col_lse_ptr"), py::arg("grad_ptr"), py::arg("da_ptr"),
      py::arg("db_ptr"), py::arg("dscale_ptr"), py::arg("dbias_ptr"), py::arg("workspace_ptr"),
      py::arg("workspace_elems"), py::arg("stream"), py::arg("groups_ptr") = 0,
      "Writes da, db (contiguous (n, d), input dtype) and dscale, dbias (float32 scalars); "
      "groups_ptr as clip_forward (dS = 0 on masked pairs).");
  // Symile (symile.h) and GRAM (gram.h): same conventions as CLIP. Workspace sizes from the
  // *_workspace_elems functions; backward workspaces are zeroed on the stream.
  def(m, "rowce_forward_workspace_elems", &fc::rowce_forward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("device"));
  def(m, "rowce_backward_workspace_elems", &fc::rowce_backward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("device"));
  def(m, "rowce_forward", &rowce_forward, py::arg("a_ptr"), py::arg("w_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("w_stride0"),
      py::arg("w_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("diag_logit_ptr"),
      py::arg("row_lse_ptr"), py::arg("workspace_ptr"), py::arg("workspace_elems"),
      py::arg("stream"), "Row LSE of scale * a w^T with the diagonal replaced by diag_logit.");
  def(m, "rowce_backward", &rowce_backward, py::arg("a_ptr"), py::arg("w_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("w_stride0"),
      py::arg("w_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("diag_logit_ptr"),
      py::arg("row_lse_ptr"), py::arg("grad_rows_ptr"), py::arg("da_ptr"), py::arg("dw_ptr"),
      py::arg("dscale_ptr"), py::arg("ddiag_ptr"), py::arg("workspace_ptr"),
      py::arg("workspace_elems"), py::arg("stream"),
      "Writes da, dw (contiguous (n, d), input dtype), dscale (fp32 scalar), ddiag ((n,) fp32).");
  def(m, "symile_n2_forward_workspace_elems", &fc::symile_n2_forward_workspace_elems,
      py::arg("n"), py::arg("d"), py::arg("device"));
  def(m, "symile_n2_backward_workspace_elems", &fc::symile_n2_backward_workspace_elems,
      py::arg("n"), py::arg("d"), py::arg("device"));
  def(m, "symile_n2_forward", &symile_n2_forward, py::arg("x_ptr"), py::arg("y_ptr"),
      py::arg("z_ptr"), py::arg("n"), py::arg("d"), py::arg("x_stride0"), py::arg("x_stride1"),
      py::arg("y_stride0"), py::arg("y_stride1"), py::arg("z_stride0"), py::arg("z_stride1"),
      py::arg("dtype"), py::arg("scale_ptr"), py::arg("row_lse_ptr"), py::arg("workspace_ptr"),
      py::arg("workspace_elems"), py::arg("stream"),
      "row_lse_i = LSE_{j,k} scale * sum_d x_id y_jd z_kd ((n,) float32).");
  def(m, "symile_n2_backward", &symile_n2_backward, py::arg("x_ptr"), py::arg("y_ptr"),
      py::arg("z_ptr"), py::arg("n"), py::arg("d"), py::arg("x_stride0"), py::arg("x_stride1"),
      py::arg("y_stride0"), py::arg("y_stride1"), py::arg("z_stride0"), py::arg("z_stride1"),
      py::arg("dtype"), py::arg("scale_ptr"), py::arg("row_lse_ptr"), py::arg("grad_rows_ptr"),
      py::arg("dx_ptr"), py::arg("dy_ptr"), py::arg("dz_ptr"), py::arg("dscale_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_elems"), py::arg("stream"),
      "Writes dx, dy, dz (contiguous (n, d), float32) and dscale (fp32 scalar).");
  def(m, "gram_forward_workspace_elems", &fc::gram_forward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("k"), py::arg("device"));
  def(m, "gram_backward_workspace_elems", &fc::gram_backward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("k"), py::arg("device"));
  def(m, "gram_forward", &gram_forward, py::arg("anchor_ptr"), py::arg("others_ptr"),
      py::arg("n"), py::arg("d"), py::arg("k"), py::arg("anchor_stride0"),
      py::arg("anchor_stride1"), py::arg("others_stride0"), py::arg("others_stride1"),
      py::arg("others_stride2"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("det_h_ptr"),
      py::arg("adj_h_ptr"), py::arg("floor_h_ptr"), py::arg("row_lse_ptr"),
      py::arg("col_lse_ptr"), py::arg("diag_ptr"),
      py::arg("row_sum_ptr"), py::arg("col_sum_ptr"), py::arg("workspace_ptr"),
      py::arg("workspace_elems"), py::arg("stream"),
      "L = -scale * volume: writes row_lse, col_lse, diag, row_sum, col_sum ((n,) float32).");
  def(m, "gram_backward", &gram_backward, py::arg("anchor_ptr"), py::arg("others_ptr"),
      py::arg("n"), py::arg("d"), py::arg("k"), py::arg("anchor_stride0"),
      py::arg("anchor_stride1"), py::arg("others_stride0"), py::arg("others_stride1"),
      py::arg("others_stride2"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("det_h_ptr"),
      py::arg("adj_h_ptr"), py::arg("floor_h_ptr"), py::arg("row_lse_ptr"),
      py::arg("col_lse_ptr"), py::arg("grad_ptr"),
      py::arg("label_smoothing"), py::arg("d_anchor_ptr"), py::arg("d_others_u_ptr"),
      py::arg("dscale_ptr"), py::arg("col_tt_ptr"), py::arg("col_uu_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_elems"), py::arg("stream"),
      "Writes d_anchor (n, d), d_others_u (k, n, d) (input dtype), dscale, col_tt (n,), "
      "col_uu (n, k, k) (float32).");
  // SigLIP (siglip.h): conventions as CLIP; bias_ptr 0 for no bias.
  def(m, "siglip_forward_workspace_elems", &fc::siglip_forward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("device"));
  def(m, "siglip_backward_workspace_elems", &fc::siglip_backward_workspace_elems, py::arg("n"),
      py::arg("d"), py::arg("device"));
  def(m, "siglip_forward", &siglip_forward, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("b_stride0"),
      py::arg("b_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("bias_ptr"),
      py::arg("total_ptr"), py::arg("workspace_ptr"), py::arg("workspace_elems"),
      py::arg("stream"), "total = sum_ij softplus(-z_ij S_ij) (float32 scalar at total_ptr).");
  def(m, "siglip_backward", &siglip_backward, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("n"),
      py::arg("d"), py::arg("a_stride0"), py::arg("a_stride1"), py::arg("b_stride0"),
      py::arg("b_stride1"), py::arg("dtype"), py::arg("scale_ptr"), py::arg("bias_ptr"),
      py::arg("grad_ptr"), py::arg("da_ptr"), py::arg("db_ptr"), py::arg("dscale_ptr"),
      py::arg("dbias_ptr"), py::arg("workspace_ptr"), py::arg("workspace_elems"),
      py::arg("stream"),
      "For L = total / n: writes da, db (contiguous (n, d), input dtype), dscale, dbias "
      "(float32 scalars).");
  // Multi-view self-similarity row LSE (multiview.h): u (v, n, d) with element strides;
  // groups_ptr (n,) int64 ids or 0; row_lse / grad_rows (v, n) contiguous float32.
  def(m, "selfsim_forward_workspace_elems", &fc::selfsim_forward_workspace_elems,
      py::arg("v"), py::arg("n"), py::arg("d"), py::arg("per_view"), py::arg("device"));
  def(m, "selfsim_backward_workspace_elems", &fc::selfsim_backward_workspace_elems,
      py::arg("v"), py::arg("n"), py::arg("d"), py::arg("per_view"), py::arg("device"));
  def(m, "selfsim_rowlse_forward", &selfsim_rowlse_forward, py::arg("u_ptr"), py::arg("v"),
      py::arg("n"), py::arg("d"), py::arg("stride_v"), py::arg("stride_n"), py::arg("stride_d"),
      py::arg("dtype"), py::arg("scale_ptr"), py::arg("per_view"), py::arg("groups_ptr"),
      py::arg("row_lse_ptr"), py::arg("workspace_ptr"), py::arg("workspace_elems"),
      py::arg("stream"),
      "row_lse (v, n) float32: LSE of scale <u_r, u_c> over the allowed columns (-inf if none).");
  def(m, "selfsim_rowlse_backward", &selfsim_rowlse_backward, py::arg("u_ptr"), py::arg("v"),
      py::arg("n"), py::arg("d"), py::arg("stride_v"), py::arg("stride_n"), py::arg("stride_d"),
      py::arg("dtype"), py::arg("scale_ptr"), py::arg("per_view"), py::arg("groups_ptr"),
      py::arg("row_lse_ptr"), py::arg("grad_rows_ptr"), py::arg("du_ptr"), py::arg("dscale_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_elems"), py::arg("stream"),
      "Writes du ((v, n, d) contiguous float32) and dscale (float32 scalar).");
}
