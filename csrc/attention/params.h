// The interface between the Python entry points (leap_attention.cpp, built for the baseline ISA)
// and the kernels, which are compiled once per instruction-set path (kernels_generic.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp: the same code, kernels_isa.h, for three targets): plain
// data and function pointers only, nothing that a target could change.
#pragma once

#include <cstdint>

#include "../common/isa.h"

namespace lk {
namespace attn {

// Everything one call reads and writes; the entry points fill it after their checks. Pointers
// are typed by the kernel: q, k, v, o, dout, dq in the input dtype; pq, pk, states and their
// gradients, dkh, dvh, dpkh in the state dtype (float32, float64 for float64 inputs).
struct Args {
  int64_t B = 0, T = 0, S = 0, H = 0, Hkv = 0, Dk = 0, Dv = 0;
  int64_t N = 0;           // sequences: B, or the number of cu_seqlens sequences
  int64_t block_size = 0;  // <= 0: not block-causal
  int64_t mode = 0;        // driver: 0 automatic, 1 sequential over chunks, 2 across chunks
  bool causal = true, normalize = true;
  double eps = 1e-6;
  const int64_t* cu = nullptr;   // cu_seqlens [N + 1] or null
  const int64_t* nvk = nullptr;  // num_visible_keys [B, T] or null
  const bool* kpm = nullptr;     // key_padding_mask [B, S] or null
  const void *q = nullptr, *k = nullptr, *v = nullptr, *pq = nullptr, *pk = nullptr;
  const void *S0 = nullptr, *z0 = nullptr;  // initial state or null
  // forward / step outputs
  void *o = nullptr, *Sout = nullptr, *zout = nullptr;
  // backward
  const void *dout = nullptr, *dSin = nullptr, *dzin = nullptr;
  void *dq = nullptr, *dpq = nullptr, *dkh = nullptr, *dvh = nullptr, *dpkh = nullptr, *dS0 = nullptr, *dz0 = nullptr;
};

constexpr int64_t kChunk = 64;  // key chunk length of the chunked form

enum Dtype : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

using KernelFn = void (*)(const Args&);

// The kernels of one path, per input dtype.
struct Kernels {
  int isa = kGeneric;
  KernelFn fwd[4] = {};
  KernelFn bwd[4] = {};
  KernelFn step[4] = {};
};

// Each unit's table (its getter is baseline code: it runs on any CPU); null where the build cannot
// target that path (not x86, or a compiler without the target).
const Kernels* kernels_generic();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

inline const Kernels* kernels_table(int isa) {
  switch (isa) {
    case kAvx512: return kernels_avx512();
    case kAvx2: return kernels_avx2();
    case kGeneric: return kernels_generic();
    default: return nullptr;
  }
}

// Whether path `isa` is supported by this CPU and built.
inline bool isa_available(int isa) { return cpu_supports(isa) && kernels_table(isa) != nullptr; }

// The best available path (the CPU's features are read once: a constant of the process).
inline int best_isa() {
  static const int best = isa_available(kAvx512) ? int(kAvx512) : isa_available(kAvx2) ? int(kAvx2) : int(kGeneric);
  return best;
}

}  // namespace attn
}  // namespace lk
