// The attention kernels of the generic path: the compiler's baseline ISA (x86-64 SSE2, aarch64 NEON, ...) without explicit vectors: every
// build has it; it serves CPUs without AVX2 + FMA.
#include "kernels_prelude.h"

namespace lk {
namespace isa_generic {
#include "kernels_isa.h"
}  // namespace isa_generic

namespace attn {

const Kernels* kernels_generic() {
  using namespace isa_generic::attn;
  static const Kernels t{kGeneric,
                         {&fwd<float>, &fwd<double>, &fwd<c10::BFloat16>, &fwd<c10::Half>},
                         {&bwd<float>, &bwd<double>, &bwd<c10::BFloat16>, &bwd<c10::Half>},
                         {&step<float>, &step<double>, &step<c10::BFloat16>, &step<c10::Half>}};
  return &t;
}

}  // namespace attn
}  // namespace lk
