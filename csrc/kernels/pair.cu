// The pair engine's entry points (csrc/include/flashcontrast/pair.h): checks, plans and the
// dtype dispatch onto the typed halves in pair_<dtype>.cu. The kernels and their
// derivation: pair_impl.cuh.
#include "pair_impl.cuh"

namespace flashcontrast {

using namespace pair_impl;

Epilogue parse_epilogue(const std::string& name, const char* field) {
  if (name == "softmax") return Epilogue::kSoftmax;
  if (name == "rows") return Epilogue::kRows;
  if (name == "sigmoid") return Epilogue::kSigmoid;
  throw std::invalid_argument(std::string(field) +
                              " must be 'softmax', 'rows' or 'sigmoid', got '" + name + "'");
}

const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::kSoftmax:
      return "softmax";
    case Epilogue::kRows:
      return "rows";
    case Epilogue::kSigmoid:
      return "sigmoid";
  }
  return "?";
}

int64_t pair_forward_workspace_elems(const PairParams& p, int device) {
  check_params(p);
  return forward_plan(p, sm_count_of(device)).elems;
}

int64_t pair_backward_workspace_elems(const PairParams& p, int device) {
  check_params(p);
  return backward_plan(p, sm_count_of(device)).elems;
}

void pair_forward(const PairParams& p, const PairStats& stats, float* workspace,
                  int64_t workspace_elems, void* stream) {
  check_params(p);
  check_stats_out(p, stats);
  const int device = detail::device_of(p.scale, "PairParams.scale");
  detail::DeviceScope scope(device);
  const ForwardPlan plan = forward_plan(p, sm_count_of(device));
  check_workspace(workspace, workspace_elems, plan.elems);
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pair_forward_typed<T>(p, stats, workspace, sm_count_of(device), st);
  });
}

void pair_backward(const PairParams& p, const PairStats& stats, const PairCoefs& coefs,
                   const PairGrads& grads, float* workspace, int64_t workspace_elems,
                   void* stream) {
  check_params(p);
  check_backward_in(p, stats, coefs);
  check_grads(p, grads);
  const int device = detail::device_of(p.scale, "PairParams.scale");
  detail::DeviceScope scope(device);
  const BackwardPlan plan = backward_plan(p, sm_count_of(device));
  check_workspace(workspace, workspace_elems, plan.elems);
  const auto st = static_cast<cudaStream_t>(stream);
  dispatch_dtype(p.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pair_backward_typed<T>(p, stats, coefs, grads, workspace, sm_count_of(device), st);
  });
}

}  // namespace flashcontrast
