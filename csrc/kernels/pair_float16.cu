// The pair engine's float16 instantiations (pair_impl.cuh): a translation unit of their own,
// compiled in parallel with the other dtypes'.
#include "pair_impl.cuh"

namespace flashcontrast {
FC_PAIR_TYPED(__half)
}  // namespace flashcontrast
