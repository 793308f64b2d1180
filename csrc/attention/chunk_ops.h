// LeaP attention (CPU): the per-chunk pieces shared by both drivers (sweep.h). Forward: the
// outputs of one query group from the state at its chunk boundary plus the masked scores of its
// partial chunk. Backward: dq, dpq of a group (and its dnum, dden kept in a workspace), the
// state gradient of a group, and dk, dv, dpk of a key chunk.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// num, den of queries [t0, t0+nq) of group j from state (S, z) and, for j < NK, the
// visible part of the loaded key chunk j; leaves P (raw scores) in sc.P, A in sc.A.
template <typename scalar_t>
void Leap<scalar_t>::attend(const Item& it, int64_t j, int64_t t0, int64_t nq, const acc_t* S_, const acc_t* z_, Scratch& sc) const {
  std::fill(sc.num.begin(), sc.num.begin() + (size_t)nq * Dv, acc_t(0));
  gemm<acc_t>(nq, Dv, F, sc.Qf.data(), F, 1, S_, Dv, sc.num.data(), Dv);
  for (int64_t i = 0; i < nq; ++i) {
    const acc_t* qf = sc.Qf.data() + (int64_t)i * F;
    acc_t d = 0;
    for (int64_t f = 0; f < F; ++f) d += qf[f] * z_[f];
    sc.den[i] = d;
  }
  if (j >= it.NK) return;
  const int64_t nk = sc.nk;
  for (int64_t i = 0; i < nq; ++i) sc.nv[i] = std::max<int64_t>(0, std::min(nk, lim(it, t0 + i) - j * CH));
  std::fill(sc.P.begin(), sc.P.begin() + (size_t)nq * CH, acc_t(0));
  gemm_prefix_n<acc_t>(nq, nk, Dk, sc.Qa.data(), Dk, 1, sc.KbT.data(), CH, sc.P.data(), CH, sc.nv.data());
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t n_vis = sc.nv[i];
    const acc_t* p = sc.P.data() + (int64_t)i * CH;
    acc_t* a = sc.A.data() + (int64_t)i * CH;
    const acc_t sn = sc.sq[i], cs = sc.cq[i];
    acc_t rs = 0;
    for (int64_t s = 0; s < nk; ++s) {
      const acc_t val = s < n_vis ? p[s] * (sn * sc.sk[s] + cs * sc.ck[s]) : acc_t(0);
      a[s] = val;
      rs += val;
    }
    sc.den[i] += rs;
  }
  gemm_prefix_k<acc_t>(nq, Dv, nk, sc.A.data(), CH, 1, sc.V.data(), Dv, sc.num.data(), Dv, sc.nv.data());
}

template <typename scalar_t>
void Leap<scalar_t>::out_group(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* S_, const acc_t* z_, Scratch& sc,
    scalar_t* o) const {
  for (int64_t t0 = ta; t0 < tb; t0 += QB) {
    const int64_t nq = std::min(QB, tb - t0);
    load_queries(it, h, t0, nq, sc);
    attend(it, j, t0, nq, S_, z_, sc);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
      scalar_t* orow = o + (gt * H + h) * Dv;
      const acc_t* nm = sc.num.data() + (int64_t)i * Dv;
      if (normalize) {
        const acc_t dd = std::max(sc.den[i], eps);
        for (int64_t e = 0; e < Dv; ++e) orow[e] = static_cast<scalar_t>(nm[e] / dd);
      } else {
        for (int64_t e = 0; e < Dv; ++e) orow[e] = static_cast<scalar_t>(nm[e]);
      }
    }
  }
}

// ---------------- backward pieces ----------------
// Workspace of dL/dnum (Dv) and dL/dden per query: index ((b*H + h)*T + t).
// Queries of group j: recompute num/den, store dnum/dden, write dq and dpq.
template <typename scalar_t>
void Leap<scalar_t>::bwd_q_group(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* S_, const acc_t* z_,
    const acc_t* ST, Scratch& sc, const scalar_t* dout, acc_t* wdn, acc_t* wdd, scalar_t* dq,
    acc_t* dpq) const {
  for (int64_t t0 = ta; t0 < tb; t0 += QB) {
    const int64_t nq = std::min(QB, tb - t0);
    load_queries(it, h, t0, nq, sc);
    attend(it, j, t0, nq, S_, z_, sc);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
      const scalar_t* dor = dout + (gt * H + h) * Dv;
      const acc_t* nm = sc.num.data() + (int64_t)i * Dv;
      acc_t* dn = sc.dn.data() + (int64_t)i * Dv;
      acc_t ddv = 0;
      if (normalize) {
        const acc_t den = sc.den[i];
        const acc_t dd = std::max(den, eps);
        acc_t dot = 0;
        for (int64_t e = 0; e < Dv; ++e) {
          const acc_t g = static_cast<acc_t>(dor[e]);
          dn[e] = g / dd;
          dot += g * (nm[e] / dd);
        }
        ddv = den >= eps ? -dot / dd : acc_t(0);
      } else {
        for (int64_t e = 0; e < Dv; ++e) dn[e] = static_cast<acc_t>(dor[e]);
      }
      sc.dd[i] = ddv;
      const int64_t w = ((int64_t)it.b * H + h) * T + it.qo + t0 + i;
      std::memcpy(wdn + w * Dv, dn, sizeof(acc_t) * Dv);
      wdd[w] = ddv;
    }
    // inter: g = dn S^T + dd z^T  (nq x F)
    std::fill(sc.g.begin(), sc.g.begin() + (size_t)nq * F, acc_t(0));
    gemm<acc_t>(nq, F, Dv, sc.dn.data(), Dv, 1, ST, F, sc.g.data(), F);
    for (int64_t i = 0; i < nq; ++i) {
      acc_t* g = sc.g.data() + (int64_t)i * F;
      const acc_t ddv = sc.dd[i];
      for (int64_t f = 0; f < F; ++f) g[f] += ddv * z_[f];
      const acc_t* qa = sc.Qa.data() + (int64_t)i * Dk;
      acc_t* da = sc.da.data() + (int64_t)i * Dk;
      const acc_t sn = sc.sq[i], cs = sc.cq[i];
      acc_t th = 0;
      for (int64_t d = 0; d < Dk; ++d) {
        da[d] = g[d] * sn + g[Dk + d] * cs;
        th += qa[d] * (g[d] * cs - g[Dk + d] * sn);
      }
      sc.dth[i] = th;
    }
    if (j < it.NK) {
      const int64_t nk = sc.nk;
      std::fill(sc.dA.begin(), sc.dA.begin() + (size_t)nq * CH, acc_t(0));
      gemm_prefix_n<acc_t>(nq, nk, Dv, sc.dn.data(), Dv, 1, sc.VT.data(), CH, sc.dA.data(), CH, sc.nv.data());
      for (int64_t i = 0; i < nq; ++i) {
        acc_t* dA = sc.dA.data() + (int64_t)i * CH;
        acc_t* E = sc.E.data() + (int64_t)i * CH;
        const acc_t* p = sc.P.data() + (int64_t)i * CH;
        const int64_t n_vis = sc.nv[i];
        const acc_t sn = sc.sq[i], cs = sc.cq[i], ddv = sc.dd[i];
        acc_t th = 0;
        for (int64_t s = 0; s < nk; ++s) {
          const acc_t dav = s < n_vis ? dA[s] + ddv : acc_t(0);
          dA[s] = dav;
          E[s] = dav * (sn * sc.sk[s] + cs * sc.ck[s]);
          th -= dav * p[s] * (sn * sc.ck[s] - cs * sc.sk[s]);
        }
        sc.dth[i] += th;
      }
      gemm_prefix_k<acc_t>(nq, Dk, nk, sc.E.data(), CH, 1, sc.Kb.data(), Dk, sc.da.data(), Dk, sc.nv.data());
    }
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
      const scalar_t* qr = q + (gt * H + h) * Dk;
      scalar_t* dqr = dq + (gt * H + h) * Dk;
      const acc_t* da = sc.da.data() + (int64_t)i * Dk;
      for (int64_t d = 0; d < Dk; ++d)
        dqr[d] = static_cast<scalar_t>(static_cast<acc_t>(qr[d]) > acc_t(0) ? da[d] : acc_t(0));
      dpq[gt * H + h] = acc_t(HALF_PI) * sc.dth[i];
    }
  }
}

template <typename scalar_t>
void Leap<scalar_t>::load_dn(const Item& it, int64_t h, int64_t t0, int64_t nq, Scratch& sc, const acc_t* wdn, const acc_t* wdd) const {
  const int64_t w = ((int64_t)it.b * H + h) * T + it.qo + t0;
  std::memcpy(sc.dn.data(), wdn + w * Dv, sizeof(acc_t) * (size_t)nq * Dv);
  std::memcpy(sc.dd.data(), wdd + w, sizeof(acc_t) * (size_t)nq);
}

// dS_j = sum over group-j queries of q~ dnum^T, dz_j = sum q~ dden (zero first)
template <typename scalar_t>
void Leap<scalar_t>::group_dstate(const Item& it, int64_t h, int64_t ta, int64_t tb, Scratch& sc, const acc_t* wdn, const acc_t* wdd,
    acc_t* dS, acc_t* dz) const {
  std::fill(dS, dS + (size_t)F * Dv, acc_t(0));
  for (int64_t f = 0; f < F; ++f) dz[f] = 0;
  for (int64_t t0 = ta; t0 < tb; t0 += QB) {
    const int64_t nq = std::min(QB, tb - t0);
    load_queries(it, h, t0, nq, sc);
    load_dn(it, h, t0, nq, sc, wdn, wdd);
    gemm<acc_t>(F, Dv, nq, sc.Qf.data(), 1, F, sc.dn.data(), Dv, dS, Dv);
    for (int64_t i = 0; i < nq; ++i) {
      const acc_t* qf = sc.Qf.data() + (int64_t)i * F;
      const acc_t ddv = sc.dd[i];
      for (int64_t f = 0; f < F; ++f) dz[f] += qf[f] * ddv;
    }
  }
}

// Gradients of the keys / values of the loaded chunk j, from the state gradient (dSt, dzt:
// everything that sees the whole chunk) and the group-j queries (partial visibility).
// Writes per query head: dkh [B, S, H, Dk], dvh [B, S, H, Dv], dpkh [B, S, H].
template <typename scalar_t>
void Leap<scalar_t>::kv_chunk(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* dSt, const acc_t* dzt,
    const acc_t* dStT, Scratch& sc, const acc_t* wdn, const acc_t* wdd, acc_t* dkh, acc_t* dvh,
    acc_t* dpkh) const {
  const int64_t nk = sc.nk;
  std::fill(sc.dKf.begin(), sc.dKf.begin() + (size_t)nk * F, acc_t(0));
  gemm<acc_t>(nk, F, Dv, sc.V.data(), Dv, 1, dStT, F, sc.dKf.data(), F);
  std::fill(sc.dvv.begin(), sc.dvv.begin() + (size_t)nk * Dv, acc_t(0));
  gemm<acc_t>(nk, Dv, F, sc.Kf.data(), F, 1, dSt, Dv, sc.dvv.data(), Dv);
  for (int64_t s = 0; s < nk; ++s) {
    acc_t* g = sc.dKf.data() + (int64_t)s * F;
    for (int64_t f = 0; f < F; ++f) g[f] += dzt[f];
    const acc_t* kb = sc.Kb.data() + (int64_t)s * Dk;
    acc_t* db = sc.db.data() + (int64_t)s * Dk;
    const acc_t sn = sc.sk[s], cs = sc.ck[s];
    acc_t th = 0;
    for (int64_t d = 0; d < Dk; ++d) {
      db[d] = g[d] * sn + g[Dk + d] * cs;
      th += kb[d] * (g[d] * cs - g[Dk + d] * sn);
    }
    sc.dthk[s] = th;
  }
  for (int64_t t0 = ta; t0 < tb; t0 += QB) {
    const int64_t nq = std::min(QB, tb - t0);
    load_queries(it, h, t0, nq, sc);
    load_dn(it, h, t0, nq, sc, wdn, wdd);
    for (int64_t i = 0; i < nq; ++i) sc.nv[i] = std::max<int64_t>(0, std::min(nk, lim(it, t0 + i) - j * CH));
    for (int64_t s = 0, i = 0; s < nk; ++s) {  // first query that sees key s
      while (i < nq && sc.nv[i] <= s) ++i;
      sc.ks[s] = i;
    }
    std::fill(sc.P.begin(), sc.P.begin() + (size_t)nq * CH, acc_t(0));
    gemm_prefix_n<acc_t>(nq, nk, Dk, sc.Qa.data(), Dk, 1, sc.KbT.data(), CH, sc.P.data(), CH, sc.nv.data());
    std::fill(sc.dA.begin(), sc.dA.begin() + (size_t)nq * CH, acc_t(0));
    gemm_prefix_n<acc_t>(nq, nk, Dv, sc.dn.data(), Dv, 1, sc.VT.data(), CH, sc.dA.data(), CH, sc.nv.data());
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t n_vis = sc.nv[i];
      const acc_t* p = sc.P.data() + (int64_t)i * CH;
      acc_t* a = sc.A.data() + (int64_t)i * CH;
      acc_t* dA = sc.dA.data() + (int64_t)i * CH;
      acc_t* E = sc.E.data() + (int64_t)i * CH;
      const acc_t sn = sc.sq[i], cs = sc.cq[i], ddv = sc.dd[i];
      for (int64_t s = 0; s < nk; ++s) {
        const bool vis = s < n_vis;
        const acc_t wv = sn * sc.sk[s] + cs * sc.ck[s];
        const acc_t dav = vis ? dA[s] + ddv : acc_t(0);
        a[s] = vis ? p[s] * wv : acc_t(0);
        dA[s] = dav * p[s] * (sn * sc.ck[s] - cs * sc.sk[s]);  // theta_k part
        E[s] = dav * wv;
      }
    }
    gemm_suffix_k<acc_t>(nk, Dv, nq, sc.A.data(), 1, CH, sc.dn.data(), Dv, sc.dvv.data(), Dv, sc.ks.data());
    gemm_suffix_k<acc_t>(nk, Dk, nq, sc.E.data(), 1, CH, sc.Qa.data(), Dk, sc.db.data(), Dk, sc.ks.data());
    for (int64_t s = 0; s < nk; ++s) {
      acc_t th = 0;
      for (int64_t i = 0; i < nq; ++i) th += sc.dA[(int64_t)i * CH + s];
      sc.dthk[s] += th;
    }
  }
  for (int64_t s = 0; s < nk; ++s) {
    const int64_t gs = (int64_t)it.b * S + it.ko + j * CH + s;
    const int64_t row = gs * H + h;
    const int64_t hk = h / G;
    const scalar_t* kr = k + (gs * Hkv + hk) * Dk;
    const bool keep = sc.msk[s] != acc_t(0);
    const acc_t* db = sc.db.data() + (int64_t)s * Dk;
    acc_t* dkr = dkh + row * Dk;
    for (int64_t d = 0; d < Dk; ++d) dkr[d] = keep && static_cast<acc_t>(kr[d]) > acc_t(0) ? db[d] : acc_t(0);
    const acc_t* dvs = sc.dvv.data() + (int64_t)s * Dv;
    acc_t* dvr = dvh + row * Dv;
    for (int64_t e = 0; e < Dv; ++e) dvr[e] = keep ? dvs[e] : acc_t(0);  // exactly 0 for a padded key
    dpkh[row] = keep ? acc_t(HALF_PI) * sc.dthk[s] : acc_t(0);
  }
}
