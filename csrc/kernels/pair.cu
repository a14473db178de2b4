// The pair engine's entry points (csrc/include/flashcontrast/pair.h): checks, plans and the
// dtype dispatch onto the typed halves in pair_<dtype>.cu. The kernels and their
// derivation: pair_impl.cuh.
#include "pair_impl.cuh"

namespace flashcontrast {

using namespace pair_impl;

namespace {

constexpr EnumName<Epilogue> kEpilogueNames[] = {
    {Epilogue::kSoftmax, "softmax"}, {Epilogue::kRows, "rows"}, {Epilogue::kSigmoid, "sigmoid"}};

}  // namespace

Epilogue parse_epilogue(const std::string& name, const char* field) {
  if (const Epilogue* e = find_enum(kEpilogueNames, name)) return *e;
  throw std::invalid_argument(std::string(field) +
                              " must be 'softmax', 'rows' or 'sigmoid', got '" + name + "'");
}

const char* epilogue_name(Epilogue e) { return enum_name(kEpilogueNames, e); }

int64_t pair_forward_workspace_elems(const PairParams& p, int device) {
  check_params(p);
  return forward_plan(p, sm_count_of(device)).elems;
}

int64_t pair_backward_workspace_elems(const PairParams& p, int device) {
  check_params(p);
  return backward_plan(p, sm_count_of(device)).elems;
}

namespace {

// pair_forward / pair_backward after their argument checks: on the device of p.scale
// (detail::LaunchScope), the workspace checked against plan_of(p, SMs).elems, then
// launch(static_cast<T*>(nullptr), SMs, stream) for the T of p.dtype.
template <typename PlanOf, typename F>
void launch_on_device(const PairParams& p, PlanOf plan_of, const float* workspace,
                      int64_t workspace_elems, void* stream, F&& launch) {
  const detail::LaunchScope at(p.scale, "PairParams.scale", stream);
  check_workspace(workspace, workspace_elems, plan_of(p, at.sms).elems);
  dispatch_dtype(p.dtype, [&](auto* tag) { launch(tag, at.sms, at.stream); });
}

}  // namespace

void pair_forward(const PairParams& p, const PairStats& stats, float* workspace,
                  int64_t workspace_elems, void* stream) {
  check_params(p);
  check_stats_out(p, stats);
  launch_on_device(p, forward_plan, workspace, workspace_elems, stream,
                   [&](auto* tag, int sms, cudaStream_t st) {
                     using T = std::remove_pointer_t<decltype(tag)>;
                     pair_forward_typed<T>(p, stats, workspace, sms, st);
                   });
}

void pair_backward(const PairParams& p, const PairStats& stats, const PairCoefs& coefs,
                   const PairGrads& grads, float* workspace, int64_t workspace_elems,
                   void* stream) {
  check_params(p);
  check_backward_in(p, stats, coefs);
  check_grads(p, grads);
  launch_on_device(p, backward_plan, workspace, workspace_elems, stream,
                   [&](auto* tag, int sms, cudaStream_t st) {
                     using T = std::remove_pointer_t<decltype(tag)>;
                     pair_backward_typed<T>(p, stats, coefs, grads, workspace, sms, st);
                   });
}

}  // namespace flashcontrast
