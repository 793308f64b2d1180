// The kernels of one instruction-set path: included by kernels_generic.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp inside a namespace of their own (lk::isa_<path>), after kernels_prelude.h and
// after each unit has set its target (LK_HAVE_AVX2 / LK_HAVE_AVX512 name the vector types it
// may use). Everything below is compiled for that target: the micro-kernels, the feature build,
// the per-chunk pieces and the drivers.
#include "micro_impl.h"
#include "gemm.h"
#include "context.h"
#include "features.h"
#include "chunk_ops.h"
#include "sweep.h"
#include "step.h"

namespace attn {

// The kernel context of one call (the entry points checked the arguments).
template <typename scalar_t>
Leap<scalar_t> context(const lk::attn::Args& a) {
  using acc_t = typename Leap<scalar_t>::acc_t;
  Leap<scalar_t> L;
  L.B = a.B;
  L.T = a.T;
  L.S = a.S;
  L.H = a.H;
  L.Hkv = a.Hkv;
  L.Dk = a.Dk;
  L.Dv = a.Dv;
  L.G = a.H / a.Hkv;
  L.F = 2 * a.Dk;
  L.N = a.N;
  L.mode = a.mode;
  // any block_size >= the longest sequence is one block: clamp (64-bit, never truncated)
  L.W = a.block_size <= 0 ? 0 : std::min<int64_t>(a.block_size, std::max<int64_t>({a.T, a.S, 1}));
  L.causal = a.causal;
  L.normalize = a.normalize;
  // at least the smallest normal number (as _validate.effective_eps): eps=0 gives 0, not 0/0
  L.eps = std::max(static_cast<acc_t>(a.eps), std::numeric_limits<acc_t>::min());
  L.cu = a.cu;
  L.nvk = a.nvk;
  L.kpm = a.kpm;
  L.q = static_cast<const scalar_t*>(a.q);
  L.k = static_cast<const scalar_t*>(a.k);
  L.v = static_cast<const scalar_t*>(a.v);
  L.pq = static_cast<const acc_t*>(a.pq);
  L.pk = static_cast<const acc_t*>(a.pk);
  return L;
}

template <typename scalar_t>
void fwd(const lk::attn::Args& a) {
  using acc_t = typename Leap<scalar_t>::acc_t;
  auto L = context<scalar_t>(a);
  L.prepare();
  L.forward(static_cast<const acc_t*>(a.S0), static_cast<const acc_t*>(a.z0), static_cast<scalar_t*>(a.o),
            static_cast<acc_t*>(a.Sout), static_cast<acc_t*>(a.zout));
}

template <typename scalar_t>
void bwd(const lk::attn::Args& a) {
  using acc_t = typename Leap<scalar_t>::acc_t;
  auto L = context<scalar_t>(a);
  L.prepare(static_cast<const scalar_t*>(a.dout));
  L.backward(static_cast<const scalar_t*>(a.dout), static_cast<const acc_t*>(a.dSin),
             static_cast<const acc_t*>(a.dzin), static_cast<const acc_t*>(a.S0), static_cast<const acc_t*>(a.z0),
             static_cast<scalar_t*>(a.dq), static_cast<acc_t*>(a.dpq), static_cast<acc_t*>(a.dkh),
             static_cast<acc_t*>(a.dvh), static_cast<acc_t*>(a.dpkh), static_cast<acc_t*>(a.dS0),
             static_cast<acc_t*>(a.dz0));
}

template <typename scalar_t>
void step(const lk::attn::Args& a) {
  using acc_t = typename Leap<scalar_t>::acc_t;
  auto L = context<scalar_t>(a);
  L.work = 4.0 * L.B * L.H * (double)L.F * L.Dv * (L.T + 1);  // memory-bound: weigh bytes
  L.step(static_cast<const acc_t*>(a.S0), static_cast<const acc_t*>(a.z0), static_cast<scalar_t*>(a.o),
         static_cast<acc_t*>(a.Sout), static_cast<acc_t*>(a.zout));
}

}  // namespace attn
