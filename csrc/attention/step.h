// LeaP attention (CPU): the decode step, t new tokens (causal among them) on top of a state; one
// sweep over the state per (sequence, head), vectorised through the micro-kernel table for one
// float32 token.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// Decode step: t new tokens, causal among them, on top of (S0, z0); one sweep over the state.
// One task per (sequence, head); tasks are handed out in blocks of consecutive items (equal work,
// and consecutive items' states are adjacent in memory: each thread streams through a range).
template <typename scalar_t>
void Leap<scalar_t>::step(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const {
  const int64_t items = (int64_t)B * H;
  const int64_t t = T;
  const size_t len = (size_t)t * (2 * F + 2 * Dv + 1);
  auto scratch = [len] { return std::vector<acc_t>(len); };
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(1, items / (4 * nt));  // about 4 claims per thread
  parallel<std::vector<acc_t>>(items, scratch, [&](int64_t idx, std::vector<acc_t>& buf) {
    const int64_t b = (int64_t)(idx / H), h = (int64_t)(idx % H), hk = h / G;
    acc_t* qf = buf.data();
    acc_t* kf = qf + (size_t)t * F;
    acc_t* vv = kf + (size_t)t * F;
    acc_t* num = vv + (size_t)t * Dv;
    acc_t* den = num + (size_t)t * Dv;
    // the features of the new tokens, and v in the state dtype (read in place when it already is,
    // for one token)
    const acc_t* vr0 = vv;
    for (int64_t i = 0; i < t; ++i) {
      const int64_t gt = (int64_t)b * T + i;
      feature_row(q + (gt * H + h) * Dk, pq[gt * H + h], qf + (int64_t)i * F);
      feature_row(k + (gt * Hkv + hk) * Dk, pk[gt * Hkv + hk], kf + (int64_t)i * F);
      const scalar_t* vr = v + (gt * Hkv + hk) * Dv;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (t == 1) {
          vr0 = vr;
          continue;
        }
      }
      for (int64_t e = 0; e < Dv; ++e) vv[(int64_t)i * Dv + e] = static_cast<acc_t>(vr[e]);
    }
    const acc_t* Sin = S0 ? S0 + idx * F * Dv : nullptr;
    const acc_t* zin = z0 ? z0 + idx * F : nullptr;
    acc_t* So = Sout + idx * F * Dv;
    acc_t* zo = zout + idx * F;
    bool swept = false;
#if defined(LK_HAVE_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (t == 1 && Dv % 8 == 0) {  // one token: the vectorised sweep (micro_impl.h; writes all of num)
        step_rows(F, Dv, Sin, So, kf, qf, vr0, num);
        if (zin)
          for (int64_t f = 0; f < F; ++f) zo[f] = zin[f] + kf[f];
        else
          for (int64_t f = 0; f < F; ++f) zo[f] = acc_t(0) + kf[f];
        den[0] = dotp(qf, zo, F);
        swept = true;
      }
    }
#endif
    if (!swept) {  // general t (and float64, or Dv not a multiple of 8): scalar rows
      std::fill(num, num + (size_t)t * Dv, acc_t(0));
      std::fill(den, den + t, acc_t(0));
      for (int64_t f = 0; f < F; ++f) {
        acc_t* srow = So + (int64_t)f * Dv;
        if (Sin) std::memcpy(srow, Sin + (int64_t)f * Dv, sizeof(acc_t) * Dv);
        else std::fill(srow, srow + Dv, acc_t(0));
        acc_t zf = zin ? zin[f] : acc_t(0);
        for (int64_t i = 0; i < t; ++i) {
          const acc_t kv = kf[(int64_t)i * F + f], qv = qf[(int64_t)i * F + f];
          const acc_t* vr = vr0 + (int64_t)i * Dv;
          acc_t* nm = num + (int64_t)i * Dv;
          for (int64_t e = 0; e < Dv; ++e) {
            const acc_t s = srow[e] + kv * vr[e];
            srow[e] = s;
            nm[e] += qv * s;
          }
          zf += kv;
          den[i] += qv * zf;
        }
        zo[f] = zf;
      }
    }
    for (int64_t i = 0; i < t; ++i) {
      const int64_t gt = (int64_t)b * T + i;
      out_row(num + (int64_t)i * Dv, den[i], o + (gt * H + h) * Dv);
    }
  }, block);
}

// x~ = [relu(x) sin(pi/2 p), relu(x) cos(pi/2 p)] of one row of Dk (the step's features; the
// chunked kernels build theirs per chunk in features.h, with the same arithmetic)
template <typename scalar_t>
inline void Leap<scalar_t>::feature_row(const scalar_t* __restrict x, acc_t p, acc_t* __restrict out) const {
  acc_t sn, cs;
  sincos_p(p, sn, cs);
  acc_t* __restrict lo = out;
  acc_t* __restrict hi = out + Dk;
  for (int64_t d = 0; d < Dk; ++d) {
    const acc_t a = relu(static_cast<acc_t>(x[d]));
    lo[d] = a * sn;
    hi[d] = a * cs;
  }
}

// o = num / max(den, eps) (normalize) or num, in the output dtype: one row of Dv
template <typename scalar_t>
inline void Leap<scalar_t>::out_row(const acc_t* __restrict nm, acc_t den, scalar_t* __restrict orow) const {
  if (normalize) {
    const acc_t dd = std::max(den, eps);
    for (int64_t e = 0; e < Dv; ++e) orow[e] = static_cast<scalar_t>(nm[e] / dd);
  } else {
    for (int64_t e = 0; e < Dv; ++e) orow[e] = static_cast<scalar_t>(nm[e]);
  }
}
