// LeaP attention: chunkwise C++ kernels for the "cpu" backend: the Python entry points.
//
// Math (DESIGN section 2): with a = relu(x), theta = pi/2 * p, the re-weighted feature is
// x~ = [a sin(theta), a cos(theta)] (2*Dk, never stored for the whole sequence: built per
// chunk in thread-local buffers). o_t = num_t / max(den_t, eps) with
// num_t = q~_t S0 + sum_{s visible} A_ts v_s, den_t = q~_t z0 + sum A_ts, A_ts = q~_t . k~_s
// = (a_t . b_s) cos(theta_t - theta_s) (the intra-chunk scores use this Dk-sized form).
//
// Monotone cross-attention (T != S allowed, num_visible_keys) is the chunked scheme with
// lim(t) = n[b, t]: the forward sweeps the keys in order carrying the state, each query group
// reading it at its chunk boundary and adding masked scores over the one chunk its limits cut;
// the backward's reverse sweep hands each key chunk the state gradient accumulated from the groups
// above it plus the masked-pair terms of its own group: O(CH (T + S)) work per (sequence, head).
//
// Layout (csrc/attention/): this file (the entry points, baseline ISA) with checks.h; params.h, the
// interface to the kernels; the kernels, compiled once per instruction-set path (kernels_generic.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp, each including kernels_isa.h under its own target and
// namespace): micro_impl.h (GEMM and step micro-kernels), gemm.h, context.h (the kernel context),
// features.h (feature build), chunk_ops.h (per-chunk pieces), sweep.h (drivers), step.h (decode);
// ../common/ holds the task runner and the CPU-feature detection. Every entry point takes the
// driver `mode` and the path `isa` as arguments (attention/cpu.py passes them; no global state),
// checks its arguments, picks the path's kernels (the best this CPU runs, or the one asked for),
// then releases the GIL while they run.
//
// Relu keeps NaN; a padded key is selected to 0 where loaded (k, pk, v) and its dk, dv, dpk are
// exactly 0.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <type_traits>

#include "../common/task_runner.h"
#include "checks.h"
#include "params.h"

namespace lk {
namespace attn {

// ---------------------------------------------------------------------------------------
// Python bindings. Every entry point writes into output tensors that the caller allocated
// (attention/cpu.py, with torch.empty) and checks them (CPU, contiguous, exact shape and dtype,
// no alias of an input); none allocates an output itself. Every element of an output is
// written (the tests poison fresh buffers with NaN to prove it).
// ---------------------------------------------------------------------------------------

inline int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "leap_attention cpu kernels: unsupported dtype ", t);
  }
  return kF32;
}

inline const void* cptr(const OptT& t) { return has(t) ? t->data_ptr() : nullptr; }
inline void* mptr(const OptT& t) { return has(t) ? t->data_ptr() : nullptr; }

// The kernels' arguments common to every entry point (the checks ran before).
inline Args make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq,
                      const at::Tensor& pk, const OptT& S0, const OptT& z0, const OptT& kpm, const OptT& cu,
                      const OptT& nvk, bool causal, int64_t block_size, double eps, bool normalize, int64_t mode) {
  Args a;
  a.B = q.size(0);
  a.T = q.size(1);
  a.H = q.size(2);
  a.Dk = q.size(3);
  a.S = k.size(1);
  a.Hkv = k.size(2);
  a.Dv = v.size(3);
  a.N = has(cu) ? cu->numel() - 1 : a.B;
  a.block_size = block_size;
  a.mode = mode;
  a.causal = causal;
  a.normalize = normalize;
  a.eps = eps;
  a.cu = has(cu) ? cu->data_ptr<int64_t>() : nullptr;
  a.nvk = has(nvk) ? nvk->data_ptr<int64_t>() : nullptr;
  a.kpm = has(kpm) ? kpm->data_ptr<bool>() : nullptr;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.pq = pq.data_ptr();
  a.pk = pk.data_ptr();
  a.S0 = cptr(S0);
  a.z0 = cptr(z0);
  return a;
}

// fwd(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize, o, S, z): writes o
// [B, T, H, Dv] (q's dtype) and, when S and z are given (output_final_state), the final states S
// [N, H, 2*Dk, Dv], z [N, H, 2*Dk] (state dtype; N = B, or the number of cu_seqlens sequences).
// nvk: num_visible_keys (None, or int64 [B, T]: monotone cross-attention; the final state is that
// of all S keys).
void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq, const at::Tensor& pk,
         const OptT& S0, const OptT& z0, const OptT& kpm, const OptT& cu, const OptT& nvk, bool causal,
         int64_t block_size, double eps, bool normalize, const at::Tensor& o, const OptT& S, const OptT& z,
         int64_t mode, int64_t isa) {
  check_inputs(q, k, v, pq, pk);
  check_mode(mode);
  const Kernels* kern = kernels_for(isa);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = num_seqs(q, k, cu);
  if (has(nvk)) check_visible_keys(*nvk, q.size(0), q.size(1), k.size(1), causal, has(cu), block_size);
  check_states(q, v, n, S0, z0, kpm, k.size(1));
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Dv = v.size(3);
  const std::initializer_list<const at::Tensor*> ins = {&q, &k, &v, &pq, &pk};
  check_out(o, "o", q.scalar_type(), {B, T, H, Dv}, ins);
  TORCH_CHECK(has(S) == has(z), "leap_attention cpu kernels: the final-state outputs S and z come together");
  const bool final_state = has(S);
  if (final_state) {
    check_out(*S, "S", acc, {n, H, 2 * Dk, Dv}, ins);
    check_out(*z, "z", acc, {n, H, 2 * Dk}, ins);
  }
  Args a = make_args(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize, mode);
  a.o = o.data_ptr();
  a.Sout = mptr(S);
  a.zout = mptr(z);
  const KernelFn fn = kern->fwd[dtype_index(q.scalar_type())];
  py::gil_scoped_release no_gil;  // the kernels touch no Python object
  fn(a);
}

// bwd(do, dS, dz, q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize,
//     dq, dk, dv, dpq, dpk, dS0, dz0, dkh, dvh, dpkh): writes dq, dk, dv (q's dtype), dpq, dpk
// (state dtype) and, when the initial state S0, z0 was given, dS0, dz0 (state dtype).
// dkh [B, S, H, Dk], dvh [B, S, H, Dv], dpkh [B, S, H] (state dtype) are the per-query-head key
// gradients, reduced over the GQA group (fixed order) into dk, dv, dpk: given by the caller
// exactly where the kernel cannot write into dk, dv, dpk directly (dkh, dvh: Hkv != H or a
// half dtype; dpkh: Hkv != H), and overwritten.
void bwd(const at::Tensor& dout, const OptT& dS, const OptT& dz, const at::Tensor& q, const at::Tensor& k,
         const at::Tensor& v, const at::Tensor& pq, const at::Tensor& pk, const OptT& S0, const OptT& z0,
         const OptT& kpm, const OptT& cu, const OptT& nvk, bool causal, int64_t block_size, double eps,
         bool normalize, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& dpq,
         const at::Tensor& dpk, const OptT& dS0, const OptT& dz0, const OptT& dkh_in, const OptT& dvh_in,
         const OptT& dpkh_in, int64_t mode, int64_t isa) {
  check_inputs(q, k, v, pq, pk);
  check_mode(mode);
  const Kernels* kern = kernels_for(isa);
  TORCH_CHECK(dout.is_contiguous() && dout.scalar_type() == q.scalar_type(), "do: contiguous, q's dtype");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), S = k.size(1), Hkv = k.size(2),
                Dv = v.size(3);
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == B && dout.size(1) == T && dout.size(2) == H && dout.size(3) == Dv,
              "do must have o's shape [B, T, H, Dv]");
  const int64_t n = num_seqs(q, k, cu);
  if (has(nvk)) check_visible_keys(*nvk, B, T, S, causal, has(cu), block_size);
  check_states(q, v, n, S0, z0, kpm, S);
  check_opt(dS, "dS", acc, n * H * 2 * Dk * Dv, false);  // made contiguous below
  check_opt(dz, "dz", acc, n * H * 2 * Dk, false);
  const at::Tensor none;
  const std::initializer_list<const at::Tensor*> ins = {
      &dout, &q, &k, &v, &pq, &pk, has(dS) ? &*dS : &none, has(dz) ? &*dz : &none, has(S0) ? &*S0 : &none,
      has(z0) ? &*z0 : &none};
  const auto dt = q.scalar_type();
  check_out(dq, "dq", dt, {B, T, H, Dk}, ins);
  check_out(dk, "dk", dt, {B, S, Hkv, Dk}, ins);
  check_out(dv, "dv", dt, {B, S, Hkv, Dv}, ins);
  check_out(dpq, "dpq", acc, {B, T, H}, ins);
  check_out(dpk, "dpk", acc, {B, S, Hkv}, ins);
  const bool has_state = has(S0);
  TORCH_CHECK(has(dS0) == has_state && has(dz0) == has_state,
              "leap_attention cpu kernels: the outputs dS0, dz0 are given exactly when the initial state is");
  if (has_state) {
    check_out(*dS0, "dS0", acc, {n, H, 2 * Dk, Dv}, ins);
    check_out(*dz0, "dz0", acc, {n, H, 2 * Dk}, ins);
  }
  // the per-query-head key gradients: the outputs themselves where they can be
  const bool kv_direct = Hkv == H && dt == acc, p_direct = Hkv == H;
  TORCH_CHECK(has(dkh_in) != kv_direct && has(dvh_in) != kv_direct,
              "leap_attention cpu kernels: the workspaces dkh, dvh are given exactly when Hkv != H or the "
              "dtype is a half type");
  TORCH_CHECK(has(dpkh_in) != p_direct,
              "leap_attention cpu kernels: the workspace dpkh is given exactly when Hkv != H");
  const at::Tensor dkh = kv_direct ? dk : *dkh_in, dvh = kv_direct ? dv : *dvh_in, dpkh = p_direct ? dpk : *dpkh_in;
  if (!kv_direct) {
    check_out(dkh, "dkh", acc, {B, S, H, Dk}, ins);
    check_out(dvh, "dvh", acc, {B, S, H, Dv}, ins);
  }
  if (!p_direct) check_out(dpkh, "dpkh", acc, {B, S, H}, ins);
  // the state gradient may come without the state (output_final_state without initial_state)
  at::Tensor dSc, dzc;
  if (has(dS) || has(dz)) {
    dSc = has(dS) ? dS->contiguous() : at::zeros({n, H, 2 * Dk, Dv}, q.options().dtype(acc));
    dzc = has(dz) ? dz->contiguous() : at::zeros({n, H, 2 * Dk}, q.options().dtype(acc));
  }
  Args a = make_args(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize, mode);
  a.dout = dout.data_ptr();
  a.dSin = dSc.defined() ? dSc.data_ptr() : nullptr;
  a.dzin = dzc.defined() ? dzc.data_ptr() : nullptr;
  a.dq = dq.data_ptr();
  a.dpq = dpq.data_ptr();
  a.dkh = dkh.data_ptr();
  a.dvh = dvh.data_ptr();
  a.dpkh = dpkh.data_ptr();
  a.dS0 = mptr(dS0);
  a.dz0 = mptr(dz0);
  const KernelFn fn = kern->bwd[dtype_index(dt)];
  py::gil_scoped_release no_gil;  // the kernels touch no Python object
  fn(a);
  if (kv_direct && p_direct) return;
  // reduce over the GQA group (fixed order) and cast to the output dtype
  const int64_t G = H / Hkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "leap_bwd_reduce", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* pdk = dkh.data_ptr<acc_t>();
    const acc_t* pdv = dvh.data_ptr<acc_t>();
    const acc_t* pdp = dpkh.data_ptr<acc_t>();
    scalar_t* odk = dk.data_ptr<scalar_t>();
    scalar_t* odv = dv.data_ptr<scalar_t>();
    acc_t* odp = dpk.data_ptr<acc_t>();
    at::parallel_for(0, B * S * Hkv, std::max<int64_t>(256, (int64_t)(kSerialWork / (G * (Dk + Dv + 1)))),
                     [&](int64_t a, int64_t e) {
      for (int64_t r = a; r < e; ++r) {  // r = (b*S + s)*Hkv + hk
        const int64_t bs = r / Hkv, hk = r % Hkv;
        if (!kv_direct) {
          for (int64_t d = 0; d < Dk; ++d) {
            acc_t x = 0;
            for (int64_t g = 0; g < G; ++g) x += pdk[(bs * H + hk * G + g) * Dk + d];
            odk[r * Dk + d] = static_cast<scalar_t>(x);
          }
          for (int64_t d = 0; d < Dv; ++d) {
            acc_t x = 0;
            for (int64_t g = 0; g < G; ++g) x += pdv[(bs * H + hk * G + g) * Dv + d];
            odv[r * Dv + d] = static_cast<scalar_t>(x);
          }
        }
        if (!p_direct) {
          acc_t x = 0;
          for (int64_t g = 0; g < G; ++g) x += pdp[bs * H + hk * G + g];
          odp[r] = x;
        }
      }
    });
  });
}

// step(q, k, v, pq, pk, S0, z0, eps, normalize, o, S, z): t new tokens on top of (S0, z0)
// (None = zeros); writes o [B, t, H, Dv] and the new state S [B, H, 2*Dk, Dv], z [B, H, 2*Dk].
void step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq, const at::Tensor& pk,
          const OptT& S0, const OptT& z0, double eps, bool normalize, const at::Tensor& o, const at::Tensor& S,
          const at::Tensor& z, int64_t isa) {
  check_inputs(q, k, v, pq, pk);
  const Kernels* kern = kernels_for(isa);
  TORCH_CHECK(k.size(1) == q.size(1), "step: k needs as many new tokens as q");
  check_states(q, v, q.size(0), S0, z0, c10::nullopt, k.size(1));
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3), Dv = v.size(3);
  const at::Tensor none;
  const std::initializer_list<const at::Tensor*> ins = {&q, &k, &v, &pq, &pk, has(S0) ? &*S0 : &none,
                                                         has(z0) ? &*z0 : &none};
  check_out(o, "o", q.scalar_type(), {B, T, H, Dv}, ins);
  check_out(S, "S", acc, {B, H, 2 * Dk, Dv}, ins);
  check_out(z, "z", acc, {B, H, 2 * Dk}, ins);
  Args a = make_args(q, k, v, pq, pk, S0, z0, c10::nullopt, c10::nullopt, c10::nullopt, true, 0, eps, normalize, 0);
  a.o = o.data_ptr();
  a.Sout = S.data_ptr();
  a.zout = z.data_ptr();
  const KernelFn fn = kern->step[dtype_index(q.scalar_type())];
  py::gil_scoped_release no_gil;  // the kernels touch no Python object
  fn(a);
}

}  // namespace attn
}  // namespace lk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LeaPformer attention: chunkwise C++ CPU kernels (forward, backward, decode step)";
  // every entry point writes into output tensors the caller allocated (attention/cpu.py)
  m.def("fwd", &lk::attn::fwd, "LeaP attention forward: writes o (and S, z when given)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("pq"), py::arg("pk"), py::arg("S0"), py::arg("z0"), py::arg("key_padding_mask"),
        py::arg("cu_seqlens"), py::arg("num_visible_keys"), py::arg("causal"), py::arg("block_size"), py::arg("eps"),
        py::arg("normalize"), py::arg("o"), py::arg("S"), py::arg("z"), py::arg("mode") = 0, py::arg("isa") = -1);
  m.def("bwd", &lk::attn::bwd, "LeaP attention backward: writes dq, dk, dv, dpq, dpk (and dS0, dz0 when given)",
        py::arg("do"), py::arg("dS"), py::arg("dz"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pq"),
        py::arg("pk"), py::arg("S0"), py::arg("z0"), py::arg("key_padding_mask"), py::arg("cu_seqlens"),
        py::arg("num_visible_keys"), py::arg("causal"), py::arg("block_size"), py::arg("eps"), py::arg("normalize"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dpq"), py::arg("dpk"), py::arg("dS0"), py::arg("dz0"),
        py::arg("dkh"), py::arg("dvh"), py::arg("dpkh"), py::arg("mode") = 0, py::arg("isa") = -1);
  m.def("step", &lk::attn::step, "LeaP attention decode step: writes o, S, z", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("pq"), py::arg("pk"), py::arg("S0"), py::arg("z0"), py::arg("eps"), py::arg("normalize"),
        py::arg("o"), py::arg("S"), py::arg("z"), py::arg("isa") = -1);
  m.def("isa_available", [](int64_t isa) { return lk::attn::isa_available((int)isa); },
        "whether instruction-set path isa (0 generic, 1 avx2, 2 avx512) is built and supported by this CPU");
  m.def("best_isa", [] { return (int64_t)lk::attn::best_isa(); }, "the path that isa=-1 (automatic) runs");
  m.attr("ISA_NAMES") = py::make_tuple("generic", "avx2", "avx512");
  m.attr("CHUNK") = lk::attn::kChunk;
}
