// flashcontrast._C: the only file that knows Python. Tensors arrive as integers (data_ptr(),
// the stream's cuda_stream); the kernels in csrc/kernels never see Python or torch.
// Every C++ exception leaves as a Python exception prefixed with the function's name:
// std::invalid_argument -> ValueError, anything else (flashcontrast::CudaError) -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flashcontrast/gram.h"
#include "flashcontrast/pair.h"
#include "flashcontrast/runtime_info.h"
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
  } catch (const py::type_error& e) {  // an argument of the wrong Python type, by name
    throw py::type_error(prefix + e.what());
  } catch (const py::value_error& e) {
    throw py::value_error(prefix + e.what());
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

// ----------------------------------------------------------------------------- typed structs
// The launchers below take their inputs as structs with named fields (PairParams,
// PairStats, PairCoefs, PairGrads, GramParams, TripleParams) and every other integer as a
// keyword-only argument, so that no call is a list of integers a swap would still fit.
// Every field and argument is converted here: a value of the wrong Python type raises
// TypeError naming it ("PairParams.n must be an int, got float"); ranges and null
// pointers are checked by the launchers in C++ (ValueError naming the field).

std::string type_name(py::handle v) {
  return py::str(py::type::of(v).attr("__name__")).cast<std::string>();
}

std::uintptr_t to_address(py::handle v, const std::string& field) {
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr())) {
    throw py::type_error(field + " must be an int (a device address, 0 for none), got " +
                         type_name(v));
  }
  const unsigned long long x = PyLong_AsUnsignedLongLong(v.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(field + " must be a device address in [0, 2^64), got " +
                          py::repr(v).cast<std::string>());
  }
  return static_cast<std::uintptr_t>(x);
}

std::int64_t to_int64(py::handle v, const std::string& field) {
  if (!PyLong_Check(v.ptr()) || PyBool_Check(v.ptr())) {
    throw py::type_error(field + " must be an int, got " + type_name(v));
  }
  const long long x = PyLong_AsLongLong(v.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(field + " must fit in int64, got " + py::repr(v).cast<std::string>());
  }
  return static_cast<std::int64_t>(x);
}

bool to_bool(py::handle v, const std::string& field) {
  if (!PyBool_Check(v.ptr())) throw py::type_error(field + " must be a bool, got " + type_name(v));
  return v.ptr() == Py_True;
}

float to_float(py::handle v, const std::string& field) {
  if (!(PyFloat_Check(v.ptr()) || PyLong_Check(v.ptr())) || PyBool_Check(v.ptr())) {
    throw py::type_error(field + " must be a float, got " + type_name(v));
  }
  return static_cast<float>(PyFloat_AsDouble(v.ptr()));
}

std::string to_string(py::handle v, const std::string& field) {
  if (!PyUnicode_Check(v.ptr())) {
    throw py::type_error(field + " must be a str, got " + type_name(v));
  }
  return v.cast<std::string>();
}

// An enum given by its name: parse(name, field) (dtype.h's parse_dtype, pair.h's
// parse_epilogue), its std::invalid_argument as ValueError.
template <typename E>
E to_enum(py::handle v, const std::string& field, E (*parse)(const std::string&, const char*)) {
  try {
    return parse(to_string(v, field), field.c_str());
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

// The Python side of a C++ value of type M, for struct fields and launcher arguments:
// from_python checks and converts (the to_* above, errors naming `field`), to_python is
// what a field's getter and the struct's repr show. Pointers are device addresses (ints).
template <typename M>
struct Convert;

template <typename P>
struct Convert<P*> {
  static P* from_python(py::handle v, const std::string& field) {
    return reinterpret_cast<P*>(to_address(v, field));
  }
  static py::object to_python(P* p) { return py::int_(reinterpret_cast<std::uintptr_t>(p)); }
};

template <>
struct Convert<std::int64_t> {
  static std::int64_t from_python(py::handle v, const std::string& field) {
    return to_int64(v, field);
  }
  static py::object to_python(std::int64_t x) { return py::int_(x); }
};

template <>
struct Convert<bool> {
  static bool from_python(py::handle v, const std::string& field) { return to_bool(v, field); }
  static py::object to_python(bool x) { return py::bool_(x); }
};

template <>
struct Convert<fc::DType> {
  static fc::DType from_python(py::handle v, const std::string& field) {
    return to_enum(v, field, fc::parse_dtype);
  }
  static py::object to_python(fc::DType x) { return py::str(fc::dtype_name(x)); }
};

template <>
struct Convert<fc::Epilogue> {
  static fc::Epilogue from_python(py::handle v, const std::string& field) {
    return to_enum(v, field, fc::parse_epilogue);
  }
  static py::object to_python(fc::Epilogue x) { return py::str(fc::epilogue_name(x)); }
};

// A launcher's argument `name` as an M (a device address as a pointer, an int64).
template <typename M>
M arg(py::handle v, const char* name) {
  return Convert<M>::from_python(v, name);
}

// py::class_<S> whose fields are properties with the converting setters (Convert), a
// keyword-only constructor (S(field=value, ...): unknown names and missing required fields
// raise TypeError naming them) and a repr listing every field. Module-local: the tests load
// the CPU-emulated build of this module (tests/cuda_emulator) next to the real one, and
// pybind11 types are otherwise registered process-wide.
template <typename S>
class Struct {
 public:
  Struct(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc, py::module_local()),
        name_(name),
        table_(std::make_shared<Table>()) {}

  // A field of any type Convert knows, converted on every set (the constructor's too).
  template <typename M>
  Struct& field(const char* name, M S::*member, bool required, const char* doc) {
    const std::string full = name_ + "." + name;
    return add(
        name, required, doc,
        [member](const S& s) -> py::object { return Convert<M>::to_python(s.*member); },
        [member, full](S& s, py::handle v) { s.*member = Convert<M>::from_python(v, full); });
  }

  // The constructor and repr; call once, after the fields.
  void done() {
    auto table = table_;
    const std::string name = name_;
    cls_.def(py::init([table, name](py::kwargs kwargs) {
               S s{};
               for (auto item : kwargs) {
                 const std::string key = py::str(item.first).cast<std::string>();
                 auto it = table->setters.find(key);
                 if (it == table->setters.end()) {
                   throw py::type_error(name + "() has no field '" + key + "'");
                 }
                 it->second(s, item.second);
               }
               for (const auto& field : table->required) {
                 if (!kwargs.contains(py::str(field))) {
                   throw py::type_error(name + "() missing required field '" + field + "'");
                 }
               }
               return s;
             }),
             ("Keyword arguments only; required fields: " + join(table->required)).c_str());
    cls_.def("__repr__", [table, name](const S& s) {
      std::string out = name + "(";
      for (std::size_t i = 0; i < table->order.size(); ++i) {
        const auto& field = table->order[i];
        out += (i ? ", " : "") + field + "=" +
               py::repr(table->getters.at(field)(s)).template cast<std::string>();
      }
      return out + ")";
    });
  }

 private:
  struct Table {
    std::map<std::string, std::function<void(S&, py::handle)>> setters;
    std::map<std::string, std::function<py::object(const S&)>> getters;
    std::vector<std::string> order, required;
  };

  static std::string join(const std::vector<std::string>& names) {
    std::string out;
    for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
    return out.empty() ? "none" : out;
  }

  template <typename G, typename St>
  Struct& add(const char* field, bool required, const char* doc, G getter, St setter) {
    table_->setters[field] = setter;
    table_->getters[field] = getter;
    table_->order.push_back(field);
    if (required) table_->required.push_back(field);
    cls_.def_property(field, getter, setter, doc);
    return *this;
  }

  py::class_<S> cls_;
  std::string name_;
  std::shared_ptr<Table> table_;
};

constexpr bool kRequired = true, kOptional = false;

// ---- the pair engine (pair.h)

std::int64_t pair_forward_workspace_elems(const fc::PairParams& params, py::handle device) {
  return fc::pair_forward_workspace_elems(params, int(to_int64(device, "device")));
}

std::int64_t pair_backward_workspace_elems(const fc::PairParams& params, py::handle device) {
  return fc::pair_backward_workspace_elems(params, int(to_int64(device, "device")));
}

void pair_forward(const fc::PairParams& params, const fc::PairStats& stats, py::handle workspace,
                  py::handle workspace_elems, py::handle stream) {
  fc::pair_forward(params, stats, arg<float*>(workspace, "workspace"),
                   to_int64(workspace_elems, "workspace_elems"), arg<void*>(stream, "stream"));
}

void pair_backward(const fc::PairParams& params, const fc::PairStats& stats,
                   const fc::PairCoefs& coefs, const fc::PairGrads& grads, py::handle workspace,
                   py::handle workspace_elems, py::handle stream) {
  fc::pair_backward(params, stats, coefs, grads, arg<float*>(workspace, "workspace"),
                    to_int64(workspace_elems, "workspace_elems"), arg<void*>(stream, "stream"));
}

// ---- GRAM (gram.h)

std::int64_t gram_forward_workspace_elems(const fc::GramInputs& params, py::handle device) {
  return fc::gram_forward_workspace_elems(params, int(to_int64(device, "device")));
}

std::int64_t gram_backward_workspace_elems(const fc::GramInputs& params, py::handle device) {
  return fc::gram_backward_workspace_elems(params, int(to_int64(device, "device")));
}

void gram_forward(const fc::GramInputs& params, py::handle row_lse, py::handle col_lse,
                  py::handle diag, py::handle row_sum, py::handle col_sum, py::handle workspace,
                  py::handle workspace_elems, py::handle stream) {
  fc::gram_forward(params, arg<float*>(row_lse, "row_lse"), arg<float*>(col_lse, "col_lse"),
                   arg<float*>(diag, "diag"), arg<float*>(row_sum, "row_sum"),
                   arg<float*>(col_sum, "col_sum"), arg<float*>(workspace, "workspace"),
                   to_int64(workspace_elems, "workspace_elems"), arg<void*>(stream, "stream"));
}

// total: None -> the columns m; out_dtype: None -> the inputs' dtype.
void gram_backward(const fc::GramInputs& params, py::handle row_lse, py::handle col_lse,
                   py::handle grad, py::handle label_smoothing, py::handle d_anchor,
                   py::handle d_others_u, py::handle dscale, py::handle col_tt,
                   py::handle col_uu, py::handle workspace, py::handle workspace_elems,
                   py::handle stream, py::handle total, py::handle out_dtype) {
  const std::int64_t cols = params.m < 0 ? params.n : params.m;
  const fc::DType out =
      out_dtype.is_none() ? params.dtype : to_enum(out_dtype, "out_dtype", fc::parse_dtype);
  fc::gram_backward(params, arg<const float*>(row_lse, "row_lse"),
                    arg<const float*>(col_lse, "col_lse"), arg<const float*>(grad, "grad"),
                    to_float(label_smoothing, "label_smoothing"),
                    total.is_none() ? cols : to_int64(total, "total"), out,
                    arg<void*>(d_anchor, "d_anchor"), arg<void*>(d_others_u, "d_others_u"),
                    arg<float*>(dscale, "dscale"), arg<float*>(col_tt, "col_tt"),
                    arg<float*>(col_uu, "col_uu"), arg<float*>(workspace, "workspace"),
                    to_int64(workspace_elems, "workspace_elems"), arg<void*>(stream, "stream"));
}

// ---- Symile n_squared (symile.h)

std::int64_t symile_n2_forward_workspace_elems(const fc::TripleInputs& params, py::handle device) {
  return fc::symile_n2_forward_workspace_elems(params, int(to_int64(device, "device")));
}

std::int64_t symile_n2_backward_workspace_elems(const fc::TripleInputs& params,
                                                py::handle device) {
  return fc::symile_n2_backward_workspace_elems(params, int(to_int64(device, "device")));
}

void symile_n2_forward(const fc::TripleInputs& params, py::handle row_lse, py::handle workspace,
                       py::handle workspace_elems, py::handle stream) {
  fc::symile_n2_forward(params, arg<float*>(row_lse, "row_lse"),
                        arg<float*>(workspace, "workspace"),
                        to_int64(workspace_elems, "workspace_elems"), arg<void*>(stream, "stream"));
}

void symile_n2_backward(const fc::TripleInputs& params, py::handle row_lse, py::handle grad_rows,
                        py::handle dx, py::handle dy, py::handle dz, py::handle dscale,
                        py::handle workspace, py::handle workspace_elems, py::handle stream) {
  fc::symile_n2_backward(params, arg<const float*>(row_lse, "row_lse"),
                         arg<const float*>(grad_rows, "grad_rows"), arg<void*>(dx, "dx"),
                         arg<void*>(dy, "dy"), arg<void*>(dz, "dz"),
                         arg<float*>(dscale, "dscale"), arg<float*>(workspace, "workspace"),
                         to_int64(workspace_elems, "workspace_elems"),
                         arg<void*>(stream, "stream"));
}

void register_structs(py::module_& m) {
  using P = fc::PairParams;
  Struct<P>(m, "PairParams", "One sweep of the pair engine: inputs and static options (pair.h).")
      .field("a", &P::a, kRequired, "(n, d) rows, device address")
      .field("b", &P::b, kRequired, "(m, d) columns, device address (may equal a)")
      .field("n", &P::n, kRequired, "rows of a")
      .field("m", &P::m, kRequired, "rows of b")
      .field("d", &P::d, kRequired, "features")
      .field("a_stride0", &P::a_stride0, kRequired, "element stride of a's rows")
      .field("a_stride1", &P::a_stride1, kRequired, "element stride of a's features")
      .field("b_stride0", &P::b_stride0, kRequired, "element stride of b's rows")
      .field("b_stride1", &P::b_stride1, kRequired, "element stride of b's features")
      .field("dtype", &P::dtype, kRequired, "'float32' | 'float16' | 'bfloat16' (a and b)")
      .field("scale", &P::scale, kRequired, "fp32 device scalar")
      .field("bias", &P::bias, kOptional, "fp32 device scalar, 0 for none")
      .field("epilogue", &P::epilogue, kRequired, "'softmax' | 'rows' | 'sigmoid'")
      .field("positives", &P::positives, kRequired, "entries of one sample are positives")
      .field("exclude_self", &P::exclude_self, kOptional, "global row == column is excluded")
      .field("period", &P::period, kOptional, "sample(k) = k mod period; 0: k")
      .field("row_offset", &P::row_offset, kOptional, "global index of row 0")
      .field("col_offset", &P::col_offset, kOptional, "global index of column 0")
      .field("row_groups", &P::row_groups, kOptional, "(n,) int64 ids, 0 for none")
      .field("col_groups", &P::col_groups, kOptional, "(m,) int64 ids, 0 for none")
      .field("positive_logits", &P::positive_logits, kOptional,
             "(n,) fp32 logits of the positives ('rows' with positives), 0 for none")
      .field("x", &P::x, kOptional, "(n, m) fp32 X = a b^T read instead of multiplied, 0: none")
      .done();
  using St = fc::PairStats;
  Struct<St>(m, "PairStats",
             "fp32 (max, sum) statistics, device addresses (0: not used by the epilogue).")
      .field("row_max", &St::row_max, kOptional, "(n,)")
      .field("row_sum", &St::row_sum, kOptional, "(n,)")
      .field("pos_max", &St::pos_max, kOptional, "(n,) over the row's positives")
      .field("pos_sum", &St::pos_sum, kOptional, "(n,)")
      .field("col_max", &St::col_max, kOptional, "(m,), partial over the sweep's rows")
      .field("col_sum", &St::col_sum, kOptional, "(m,)")
      .field("cpos_max", &St::cpos_max, kOptional, "(m,) over the column's positives")
      .field("cpos_sum", &St::cpos_sum, kOptional, "(m,)")
      .field("total", &St::total, kOptional, "0-d, 'sigmoid'")
      .done();
  using C = fc::PairCoefs;
  Struct<C>(m, "PairCoefs", "The backward's fp32 coefficients, device addresses (0: zero).")
      .field("rows", &C::rows, kOptional, "(n,) gr")
      .field("pos_rows", &C::pos_rows, kOptional, "(n,) gpr")
      .field("cols", &C::cols, kOptional, "(m,) gc")
      .field("pos_cols", &C::pos_cols, kOptional, "(m,) gpc")
      .field("total", &C::total, kOptional, "0-d g, 'sigmoid' (required there)")
      .done();
  using G = fc::PairGrads;
  Struct<G>(m, "PairGrads", "The backward's outputs, device addresses.")
      .field("da", &G::da, kOptional, "(n, d) contiguous, out_dtype (0 with ds)")
      .field("db", &G::db, kOptional, "(m, d) contiguous, out_dtype (0 with ds)")
      .field("dscale", &G::dscale, kRequired, "fp32 scalar")
      .field("dbias", &G::dbias, kRequired, "fp32 scalar")
      .field("dpos", &G::dpos, kOptional, "(n,) fp32, with positive_logits only")
      .field("out_dtype", &G::out_dtype, kRequired, "the inputs' dtype or 'float32'")
      .field("ds", &G::ds, kOptional, "(n, m) inputs' dtype: dS / ds_unit instead of da, db")
      .field("ds_unit", &G::ds_unit, kOptional, "fp32 scalar dividing dS, 0: 1 (with ds)")
      .done();
  using GP = fc::GramInputs;
  Struct<GP>(m, "GramParams", "GRAM's inputs (gram.h).")
      .field("anchor", &GP::anchor, kRequired, "(n, d) device address")
      .field("others", &GP::others, kRequired, "(k, m, d) device address")
      .field("n", &GP::n, kRequired, "anchor rows")
      .field("d", &GP::d, kRequired, "features")
      .field("k", &GP::k, kRequired, "others per sample, 1..5")
      .field("m", &GP::m, kOptional, "sample columns (default -1: m = n)")
      .field("row_offset", &GP::row_offset, kOptional, "row i's own column (default 0)")
      .field("anchor_stride0", &GP::anchor_stride0, kRequired, "")
      .field("anchor_stride1", &GP::anchor_stride1, kRequired, "")
      .field("others_stride0", &GP::others_stride0, kRequired, "")
      .field("others_stride1", &GP::others_stride1, kRequired, "")
      .field("others_stride2", &GP::others_stride2, kRequired, "")
      .field("dtype", &GP::dtype, kRequired, "'float32' | 'float16' | 'bfloat16'")
      .field("scale", &GP::scale, kRequired, "fp32 device scalar")
      .field("det_h", &GP::det_h, kRequired, "(m,) fp32")
      .field("adj_h", &GP::adj_h, kRequired, "(m, k, k) fp32")
      .field("floor_h", &GP::floor_h, kRequired, "(m,) fp32")
      .done();
  using TP = fc::TripleInputs;
  Struct<TP>(m, "TripleParams", "Symile n_squared's inputs x, y, z (symile.h).")
      .field("x", &TP::x, kRequired, "(n, d) device address")
      .field("y", &TP::y, kRequired, "(m, d) device address")
      .field("z", &TP::z, kRequired, "(m, d) device address")
      .field("n", &TP::n, kRequired, "rows of x")
      .field("d", &TP::d, kRequired, "features")
      .field("m", &TP::m, kOptional, "rows of y and z (default -1: m = n)")
      .field("x_stride0", &TP::x_stride0, kRequired, "")
      .field("x_stride1", &TP::x_stride1, kRequired, "")
      .field("y_stride0", &TP::y_stride0, kRequired, "")
      .field("y_stride1", &TP::y_stride1, kRequired, "")
      .field("z_stride0", &TP::z_stride0, kRequired, "")
      .field("z_stride1", &TP::z_stride1, kRequired, "")
      .field("dtype", &TP::dtype, kRequired, "'float32' | 'float16' | 'bfloat16'")
      .field("scale", &TP::scale, kRequired, "fp32 device scalar")
      .done();
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

  // The launchers: params structs (register_structs) and keyword-only addresses. Pointers
  // are device addresses (data_ptr()), strides in elements, dtype "float32" | "float16" |
  // "bfloat16", stream a cudaStream_t. Outputs and workspaces are allocated by the caller
  // (sizes from the *_workspace_elems functions; backward workspaces are zeroed on the
  // stream); nothing synchronizes the host.
  register_structs(m);
  def(m, "pair_forward_workspace_elems", &pair_forward_workspace_elems, py::arg("params"),
      py::kw_only(), py::arg("device"),
      "float32 elements of pair_forward's workspace on CUDA device `device`.");
  def(m, "pair_backward_workspace_elems", &pair_backward_workspace_elems, py::arg("params"),
      py::kw_only(), py::arg("device"),
      "float32 elements of pair_backward's workspace on CUDA device `device`.");
  def(m, "pair_forward", &pair_forward, py::arg("params"), py::arg("stats"), py::kw_only(),
      py::arg("workspace"), py::arg("workspace_elems"), py::arg("stream"),
      "One sweep's statistics into `stats` (PairStats: the fields the epilogue has).");
  def(m, "pair_backward", &pair_backward, py::arg("params"), py::arg("stats"), py::arg("coefs"),
      py::arg("grads"), py::kw_only(), py::arg("workspace"), py::arg("workspace_elems"),
      py::arg("stream"), "The gradients of the loss `coefs` define, from merged `stats`.");
  def(m, "gram_forward_workspace_elems", &gram_forward_workspace_elems, py::arg("params"),
      py::kw_only(), py::arg("device"));
  def(m, "gram_backward_workspace_elems", &gram_backward_workspace_elems, py::arg("params"),
      py::kw_only(), py::arg("device"));
  def(m, "gram_forward", &gram_forward, py::arg("params"), py::kw_only(), py::arg("row_lse"),
      py::arg("col_lse"), py::arg("diag"), py::arg("row_sum"), py::arg("col_sum"),
      py::arg("workspace"), py::arg("workspace_elems"), py::arg("stream"),
      "L = -scale * volume: writes row_lse (n,), col_lse (m,), diag (n,), row_sum (n,), "
      "col_sum (m,) (float32; partial over this call's rows / columns).");
  def(m, "gram_backward", &gram_backward, py::arg("params"), py::kw_only(), py::arg("row_lse"),
      py::arg("col_lse"), py::arg("grad"), py::arg("label_smoothing"), py::arg("d_anchor"),
      py::arg("d_others_u"), py::arg("dscale"), py::arg("col_tt"), py::arg("col_uu"),
      py::arg("workspace"), py::arg("workspace_elems"), py::arg("stream"),
      py::arg("total") = py::none(), py::arg("out_dtype") = py::none(),
      "Writes d_anchor (n, d), d_others_u (k, m, d) (out_dtype: None, the inputs', or "
      "'float32'), dscale, col_tt (m,), col_uu (m, k, k) (float32); total: the N of the loss "
      "(None: m).");
  def(m, "symile_n2_forward_workspace_elems", &symile_n2_forward_workspace_elems,
      py::arg("params"), py::kw_only(), py::arg("device"));
  def(m, "symile_n2_backward_workspace_elems", &symile_n2_backward_workspace_elems,
      py::arg("params"), py::kw_only(), py::arg("device"));
  def(m, "symile_n2_forward", &symile_n2_forward, py::arg("params"), py::kw_only(),
      py::arg("row_lse"), py::arg("workspace"), py::arg("workspace_elems"), py::arg("stream"),
      "row_lse_i = LSE_{j,k} scale * sum_d x_id y_jd z_kd ((n,) float32).");
  def(m, "symile_n2_backward", &symile_n2_backward, py::arg("params"), py::kw_only(),
      py::arg("row_lse"), py::arg("grad_rows"), py::arg("dx"), py::arg("dy"), py::arg("dz"),
      py::arg("dscale"), py::arg("workspace"), py::arg("workspace_elems"), py::arg("stream"),
      "Writes dx, dy, dz (contiguous (n, d), float32) and dscale (fp32 scalar).");
}
