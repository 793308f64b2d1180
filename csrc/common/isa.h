// Instruction-set paths of the CPU micro-kernels and their run-time choice.
//
// Every build compiles the micro-kernels three times, each in its own translation unit with its
// own target (attention/micro_*.cpp): AVX-512 (F, BW, DQ, VL) + FMA, AVX2 + FMA, and a generic
// one built for the compiler's baseline (x86-64 SSE2, aarch64, ...). Nothing else is built for more
// than the baseline, so one binary runs on any CPU of its architecture. The path is chosen per
// call: the caller names one (Python: attention/cpu.py, LEAPFORMER_CPU_ISA or set_isa()), or
// passes kAuto for the best one this CPU supports. A path the CPU (or the build) lacks is refused.
#pragma once

#include <cstdint>

namespace lk {

enum Isa : int { kAuto = -1, kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(int isa) {
  switch (isa) {
    case kGeneric: return "generic";
    case kAvx2: return "avx2";
    case kAvx512: return "avx512";
    default: return "auto";
  }
}

// Whether this CPU runs path `isa` (the OS saves the vector registers: __builtin_cpu_supports
// reads CPUID with the XSAVE checks of libgcc / compiler-rt).
inline bool cpu_supports(int isa) {
  if (isa == kGeneric) return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#endif
  return false;
}

}  // namespace lk
