// LeaP attention (CPU): the decode step, t new tokens (causal among them) on top of a state; one
// sweep over the state per (sequence, head), vectorised through the micro-kernel table for one
// float32 token.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// Decode step: t new tokens, causal among them, on top of (S0, z0); one sweep over the state.
template <typename scalar_t>
void Leap<scalar_t>::step(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const {
  const int64_t items = (int64_t)B * H;
  const int64_t t = T;
  auto scratch = [&] {
    std::vector<acc_t> buf((size_t)t * (2 * F + 2 * Dv + 1));
    return buf;
  };
  parallel<std::vector<acc_t>>(items, scratch, [&](int64_t idx, std::vector<acc_t>& buf) {
    const int64_t b = (int64_t)(idx / H), h = (int64_t)(idx % H), hk = h / G;
    acc_t* qf = buf.data();
    acc_t* kf = qf + (size_t)t * F;
    acc_t* vv = kf + (size_t)t * F;
    acc_t* num = vv + (size_t)t * Dv;
    acc_t* den = num + (size_t)t * Dv;
    for (int64_t i = 0; i < t; ++i) {
      const int64_t gt = (int64_t)b * T + i;
      acc_t sn, cs;
      sincos_p(pq[gt * H + h], sn, cs);
      const scalar_t* qr = q + (gt * H + h) * Dk;
      for (int64_t d = 0; d < Dk; ++d) {
        const acc_t x = relu(static_cast<acc_t>(qr[d]));
        qf[(int64_t)i * F + d] = x * sn;
        qf[(int64_t)i * F + Dk + d] = x * cs;
      }
      sincos_p(pk[gt * Hkv + hk], sn, cs);
      const scalar_t* kr = k + (gt * Hkv + hk) * Dk;
      for (int64_t d = 0; d < Dk; ++d) {
        const acc_t x = relu(static_cast<acc_t>(kr[d]));
        kf[(int64_t)i * F + d] = x * sn;
        kf[(int64_t)i * F + Dk + d] = x * cs;
      }
      const scalar_t* vr = v + (gt * Hkv + hk) * Dv;
      for (int64_t e = 0; e < Dv; ++e) vv[(int64_t)i * Dv + e] = static_cast<acc_t>(vr[e]);
      den[i] = 0;
    }
    std::fill(num, num + (size_t)t * Dv, acc_t(0));
    const acc_t* Sin = S0 ? S0 + idx * F * Dv : nullptr;
    const acc_t* zin = z0 ? z0 + idx * F : nullptr;
    acc_t* So = Sout + idx * F * Dv;
    acc_t* zo = zout + idx * F;
    bool swept = false;
#if defined(LK_HAVE_AVX2)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (t == 1 && Dv % 8 == 0) {  // one token: the vectorised sweep (micro_impl.h), then z and den
        step_rows(F, Dv, Sin, So, kf, qf, vv, num);
        for (int64_t f = 0; f < F; ++f) zo[f] = (zin ? zin[f] : acc_t(0)) + kf[f];
        den[0] = dotp(qf, zo, F);
        swept = true;
      }
    }
#endif
    if (!swept) {  // general t (and float64, or Dv not a multiple of 8): scalar rows
      for (int64_t f = 0; f < F; ++f) {
        acc_t* srow = So + (int64_t)f * Dv;
        if (Sin) std::memcpy(srow, Sin + (int64_t)f * Dv, sizeof(acc_t) * Dv);
        else std::fill(srow, srow + Dv, acc_t(0));
        acc_t zf = zin ? zin[f] : acc_t(0);
        for (int64_t i = 0; i < t; ++i) {
          const acc_t kv = kf[(int64_t)i * F + f], qv = qf[(int64_t)i * F + f];
          const acc_t* vr = vv + (int64_t)i * Dv;
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
      scalar_t* orow = o + (gt * H + h) * Dv;
      const acc_t dd = normalize ? std::max(den[i], eps) : acc_t(1);
      for (int64_t e = 0; e < Dv; ++e)
        orow[e] = static_cast<scalar_t>(normalize ? num[(int64_t)i * Dv + e] / dd : num[(int64_t)i * Dv + e]);
    }
  });
}
