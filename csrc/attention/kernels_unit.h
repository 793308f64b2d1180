// The body of one per-ISA kernel unit (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
// The unit defines LK_UNIT_NAME (the path's name: generic, avx2, avx512), LK_UNIT_CODE (its
// code in common/isa.h), LK_UNIT_TARGET (a GCC / clang target string; absent for the generic
// path), LK_UNIT_X86_ONLY (the path needs an x86 build) and LK_HAVE_AVX2 / LK_HAVE_AVX512 (the
// vector types micro_impl.h may use), then includes this file.
//
// Only the code of the unit's namespace, lk::isa_<name>, is compiled for the target (a pragma
// pushed after kernels_prelude.h, whose code keeps the baseline ISA, and popped before the
// table): the table's getter runs on any CPU, and the entry points call into the table only
// where the CPU supports the target (params.h: isa_available).
#include "kernels_prelude.h"

#define LK_CAT2(a, b) a##b
#define LK_CAT(a, b) LK_CAT2(a, b)
#define LK_UNIT_NS LK_CAT(isa_, LK_UNIT_NAME)
#define LK_DO_PRAGMA(x) _Pragma(#x)

#if !defined(LK_UNIT_X86_ONLY) || \
    ((defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)))
#define LK_UNIT_BUILT 1
#endif

#if defined(LK_UNIT_BUILT) && defined(LK_UNIT_TARGET)
#if defined(__clang__)
#define LK_TARGET_PUSH(t) LK_DO_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
LK_TARGET_PUSH(LK_UNIT_TARGET)
#else
#pragma GCC push_options
#define LK_TARGET_PUSH(t) LK_DO_PRAGMA(GCC target(t))
LK_TARGET_PUSH(LK_UNIT_TARGET)
#endif
#include <immintrin.h>
#endif

#ifdef LK_UNIT_BUILT
namespace lk {
namespace LK_UNIT_NS {
#include "kernels_isa.h"
}  // namespace LK_UNIT_NS
}  // namespace lk
#endif

#if defined(LK_UNIT_BUILT) && defined(LK_UNIT_TARGET)
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace lk {
namespace attn {

const Kernels* LK_CAT(kernels_, LK_UNIT_NAME)() {
#ifdef LK_UNIT_BUILT
  using namespace LK_UNIT_NS::attn;
  static const Kernels t{LK_UNIT_CODE,
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
