// The attention kernels of the avx2 path: AVX2 + FMA (ymm registers). Only the code of this unit's namespace is
// compiled for the target (a pragma pushed after kernels_prelude.h and popped before the table):
// the table's getter runs on any CPU, and the entry points call in here only where the CPU
// supports the target (params.h: isa_available).
#include "kernels_prelude.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LK_UNIT_BUILT 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include <immintrin.h>
#define LK_HAVE_AVX2 1

namespace lk {
namespace isa_avx2 {
#include "kernels_isa.h"
}  // namespace isa_avx2
}  // namespace lk

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace lk {
namespace attn {

const Kernels* kernels_avx2() {
#ifdef LK_UNIT_BUILT
  using namespace isa_avx2::attn;
  static const Kernels t{kAvx2,
                         {&fwd<float>, &fwd<double>, &fwd<c10::BFloat16>, &fwd<c10::Half>},
                         {&bwd<float>, &bwd<double>, &bwd<c10::BFloat16>, &bwd<c10::Half>},
                         {&step<float>, &step<double>, &step<c10::BFloat16>, &step<c10::Half>}};
  return &t;
#else
  return nullptr;  // not an x86 build: the generic path serves
#endif
}

}  // namespace attn
}  // namespace lk
