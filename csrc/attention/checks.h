// LeaP attention (CPU): the checks of the entry points' arguments (inputs, cu_seqlens,
// num_visible_keys, states, the caller's output buffers) and the choice of the kernels' path.
//
// Hardening (DESIGN section 6): sizes are refused, never truncated, where they exceed what the
// kernels address; every offset or product is int64_t (never `long`, 32-bit on Windows);
// block_size is int64 and any value >= the sequence length is one block; cu_seqlens and
// num_visible_keys are checked here (CPU tensors, and the Python-side value checks are skipped
// under torch.compile).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <limits>

#include "params.h"

namespace lk {
namespace attn {

using OptT = c10::optional<at::Tensor>;

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq,
                  const at::Tensor& pk) {
  for (const at::Tensor* t : {&q, &k, &v, &pq, &pk}) {
    TORCH_CHECK(t->device().is_cpu(), "leap_attention cpu kernels need CPU tensors");
    TORCH_CHECK(t->is_contiguous(), "leap_attention cpu kernels need contiguous tensors");
  }
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(pq.scalar_type() == acc && pk.scalar_type() == acc, "pq, pk must be in the state dtype");
  // the kernels index with these: a mismatch would read out of bounds
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == S && v.size(2) == Hkv && k.size(3) == q.size(3),
              "q, k, v shapes do not match");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "the heads of k must divide the heads of q");
  TORCH_CHECK(pq.dim() == 3 && pq.size(0) == B && pq.size(1) == T && pq.size(2) == H, "pq must be [B, T, H]");
  TORCH_CHECK(pk.dim() == 3 && pk.size(0) == B && pk.size(1) == S && pk.size(2) == Hkv, "pk must be [B, S, Hkv]");
  // sizes are held in int (loop counters, and small sums such as 2*F + 2*Dv + 1 of head sizes);
  // offsets and products are formed in int64_t. Refuse, never truncate.
  constexpr int64_t kMax = std::numeric_limits<int>::max() / 2, kMaxHead = int64_t(1) << 24;
  for (int64_t d : {B, T, H, S, Hkv})
    TORCH_CHECK(d <= kMax, "leap_attention cpu kernels: a dimension of ", d, " exceeds ", kMax);
  TORCH_CHECK(q.size(3) <= kMaxHead && v.size(3) <= kMaxHead, "leap_attention cpu kernels: head dims above ",
              kMaxHead, " are not supported");
}

// cu_seqlens is read on the host (a CPU tensor here, so checking it costs nothing): the eager
// validation is skipped under torch.compile, and a bad offset would index out of bounds.
inline void check_cu_seqlens(const at::Tensor& cu, int64_t B, int64_t T, int64_t S) {
  TORCH_CHECK_VALUE(cu.device().is_cpu() && cu.scalar_type() == at::kLong && cu.is_contiguous() && cu.dim() == 1,
                    "cu_seqlens: a contiguous 1-D int64 CPU tensor");
  TORCH_CHECK_VALUE(cu.numel() >= 2, "cu_seqlens must hold N + 1 >= 2 offsets, got ", cu.numel());
  TORCH_CHECK_VALUE(B == 1 && S == T, "cu_seqlens needs packed q, k, v (batch size 1, S == T), got B=", B,
                    ", T=", T, ", S=", S);
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t n = cu.numel() - 1;
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int>::max() / 2, "cu_seqlens: too many sequences (", n, ")");
  TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens must start at 0, got ", c[0]);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(c[i + 1] >= c[i] && c[i + 1] <= T, "cu_seqlens must be non-decreasing within [0, T=", T,
                      "], got cu_seqlens[", i + 1, "] = ", c[i + 1], " after ", c[i]);
  TORCH_CHECK_VALUE(c[n] == T, "cu_seqlens must end at the total length T=", T, ", got ", c[n]);
}

// num_visible_keys is read on the host too (the eager value checks are skipped under
// torch.compile, and lim() indexes the keys with it): [B, T] int64, values in [0, S],
// non-decreasing along t; only with causal=false, without cu_seqlens and block_size.
inline void check_visible_keys(const at::Tensor& n, int64_t B, int64_t T, int64_t S, bool causal, bool varlen,
                        int64_t block_size) {
  TORCH_CHECK_VALUE(!causal, "num_visible_keys needs causal=False (it sets the visibility itself)");
  TORCH_CHECK_VALUE(!varlen, "num_visible_keys cannot be combined with cu_seqlens");
  TORCH_CHECK_VALUE(block_size <= 0, "num_visible_keys cannot be combined with block_size");
  TORCH_CHECK_VALUE(n.device().is_cpu() && n.scalar_type() == at::kLong && n.is_contiguous(),
                    "num_visible_keys: a contiguous int64 CPU tensor");
  TORCH_CHECK_VALUE(n.dim() == 2 && n.size(0) == B && n.size(1) == T, "num_visible_keys must be [B, T] = [", B,
                    ", ", T, "], got ", n.sizes());
  const int64_t* c = n.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* r = c + b * T;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK_VALUE(r[t] >= 0 && r[t] <= S, "num_visible_keys must lie in [0, S=", S, "], got ", r[t],
                        " at [", b, ", ", t, "]");
      TORCH_CHECK_VALUE(t == 0 || r[t] >= r[t - 1], "num_visible_keys must be non-decreasing along t, got ", r[t],
                        " after ", r[t - 1], " at [", b, ", ", t, "]");
    }
  }
}

// an optional state-like tensor: contiguous, CPU, dtype, numel
inline void check_opt(const OptT& t, const char* name, at::ScalarType dt, int64_t numel, bool contiguous = true) {
  if (!has(t)) return;
  TORCH_CHECK(t->device().is_cpu() && (t->is_contiguous() || !contiguous) && t->scalar_type() == dt, name,
              ": a contiguous CPU tensor in the state dtype");
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " elements, expected ", numel);
}

inline int64_t num_seqs(const at::Tensor& q, const at::Tensor& k, const OptT& cu) {
  if (!has(cu)) return q.size(0);
  check_cu_seqlens(*cu, q.size(0), q.size(1), k.size(1));
  return cu->numel() - 1;
}

inline void check_states(const at::Tensor& q, const at::Tensor& v, int64_t n, const OptT& S0, const OptT& z0,
                  const OptT& kpm, int64_t S) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t H = q.size(2), F = 2 * q.size(3), Dv = v.size(3);
  TORCH_CHECK(has(S0) == has(z0), "S0 and z0 come together");
  check_opt(S0, "S0", acc, n * H * F * Dv);
  check_opt(z0, "z0", acc, n * H * F);
  if (has(kpm)) {
    TORCH_CHECK(kpm->device().is_cpu() && kpm->scalar_type() == at::kBool && kpm->is_contiguous(),
                "key_padding_mask: contiguous bool");
    TORCH_CHECK(kpm->numel() == q.size(0) * S, "key_padding_mask must be [B, S]");
  }
}


// An output buffer allocated by the caller (attention/cpu.py, with torch.empty: under the tests
// those come NaN-filled, so an element a kernel forgets to write shows up): a contiguous CPU
// tensor of exactly this shape and dtype, not overlapping an input. Every element is written.
inline void check_out(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape,
               std::initializer_list<const at::Tensor*> ins) {
  TORCH_CHECK(t.defined(), "leap_attention cpu kernels: the output ", name, " is missing");
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "leap_attention cpu kernels: the output ", name,
              " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "leap_attention cpu kernels: the output ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "leap_attention cpu kernels: the output ", name, " must have shape ", shape,
              ", got ", t.sizes());
  for (const at::Tensor* in : ins) {
    if (in == nullptr || !in->defined() || in->numel() == 0 || t.numel() == 0) continue;
    TORCH_CHECK(!t.is_alias_of(*in), "leap_attention cpu kernels: the output ", name, " shares memory with an input");
  }
}
// The micro-kernels of path `isa` (common/isa.h; kAuto: the best this CPU supports). A path that
// this build or this CPU lacks is refused (ValueError), never silently replaced.
inline const Kernels* kernels_for(int64_t isa) {
  if (isa == kAuto) return kernels_table(best_isa());
  TORCH_CHECK_VALUE(isa >= kGeneric && isa <= kAvx512, "leap_attention cpu kernels: unknown instruction-set path ", isa);
  TORCH_CHECK_VALUE(isa_available((int)isa), "leap_attention cpu kernels: the ", isa_name((int)isa),
                    " path is not available on this CPU or in this build (available: generic",
                    isa_available(kAvx2) ? ", avx2" : "", isa_available(kAvx512) ? ", avx512" : "", ")");
  return kernels_table((int)isa);
}

inline void check_mode(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "leap_attention cpu kernels: mode must be 0 (automatic), 1 (sequential "
                    "over chunks) or 2 (across chunks), got ", mode);
}

}  // namespace attn
}  // namespace lk
