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
  for (int64_t i = 0; i < nq; ++i) sc.den[i] = dotp(sc.Qf.data() + (int64_t)i * F, z_, F);
  if (j >= it.NK) return;
  const int64_t nk = sc.nk;
  for (int64_t i = 0; i < nq; ++i) sc.nv[i] = std::max<int64_t>(0, std::min(nk, lim(it, t0 + i) - j * CH));
  std::fill(sc.P.begin(), sc.P.begin() + (size_t)nq * CH, acc_t(0));
  gemm_prefix_n<acc_t>(nq, nk, Dk, sc.Qa.data(), Dk, 1, sc.KbT.data(), CH, sc.P.data(), CH, sc.nv.data());
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t n_vis = sc.nv[i];
    const acc_t* p = sc.P.data() + (int64_t)i * CH;
    acc_t* a = sc.A.data() + (int64_t)i * CH;
    vis_scores(a, p, sc.sk.data(), sc.ck.data(), sc.sq[i], sc.cq[i], n_vis, nk);
    sc.den[i] += sump(a, nk);
  }
  gemm_prefix_k<acc_t>(nq, Dv, nk, sc.A.data(), CH, 1, sc.V.data(), Dv, sc.num.data(), Dv, sc.nv.data());
}

template <typename scalar_t>
void Leap<scalar_t>::out_group(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* S_, const acc_t* z_, Scratch& sc,
    scalar_t* o) const {
  for (int64_t t0 = ta; t0 < tb; t0 += QB) {
    const int64_t nq = std::min(QB, tb - t0);
    load_queries(it, h, t0, nq, sc);
    prefetch_rows_w(o + (((int64_t)it.b * T + it.qo + t0) * H + h) * Dv, H * Dv, nq, Dv);
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
//
// The query pass of group j, from the state at its chunk boundary held transposed (ST = S^T,
// Dv x F) and z. num and den are not recomputed as such: with g = dL/do,
//   U = g S^T (the inter-chunk part of dL/dq~ before normalisation),   W = g V^T (masked)
//   den = q~ . z + sum_s A_s,   g . num = q~ . U + sum_s A_s W_s
// give dnum = g / dd and dden = -(g . num) / dd^2 (dd = max(den, eps); 0 where clamped). Writes
// dq, dpq, the workspace, and, for j < NK, the intra-chunk part of the key gradients of chunk j
// (only group-j queries see a part of it): raw (unmasked, without pi/2) into the rows of dkh, dvh,
// dpkh, which kv_chunk completes.
template <typename scalar_t>
void Leap<scalar_t>::bwd_q_group(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* ST,
    const acc_t* z_, Scratch& sc, const scalar_t* dout, acc_t* wdn, acc_t* wdd, scalar_t* dq, acc_t* dpq,
    acc_t* dkh, acc_t* dvh, acc_t* dpkh) const {
  const bool part = j < it.NK;
  const int64_t nk = part ? std::min(CH, it.Sn - j * CH) : 0;
  if (part) {
    std::fill(sc.dbi.begin(), sc.dbi.begin() + (size_t)nk * Dk, acc_t(0));
    std::fill(sc.dvi.begin(), sc.dvi.begin() + (size_t)nk * Dv, acc_t(0));
    std::fill(sc.dthi.begin(), sc.dthi.begin() + nk, acc_t(0));
  }
  for (int64_t t0 = ta; t0 < tb; t0 += QB) {
    const int64_t nq = std::min(QB, tb - t0);
    const int64_t gt0 = (int64_t)it.b * T + it.qo + t0;
    const scalar_t* do0 = doR.at(gt0, h);
    const int64_t dos = doR.stride();
    prefetch_rows(do0, dos, nq, Dv);
    prefetch_rows_w(dq + (gt0 * H + h) * Dk, H * Dk, nq, Dk);
    if (t0 + nq < it.Tn)  // the next block (the query pass runs in key order)
      prefetch_rows(do0 + nq * dos, dos, std::min(QB, it.Tn - t0 - nq), Dv);
    load_queries(it, h, t0, nq, sc);
    for (int64_t i = 0; i < nq; ++i) {  // g -> sc.dn (scaled in place below)
      const scalar_t* dor = do0 + i * dos;
      acc_t* dn = sc.dn.data() + (int64_t)i * Dv;
      for (int64_t e = 0; e < Dv; ++e) dn[e] = static_cast<acc_t>(dor[e]);
    }
    // U = g S^T (nq x F) -> sc.g
    std::fill(sc.g.begin(), sc.g.begin() + (size_t)nq * F, acc_t(0));
    gemm<acc_t>(nq, F, Dv, sc.dn.data(), Dv, 1, ST, F, sc.g.data(), F);
    for (int64_t i = 0; i < nq; ++i) {
      const acc_t* qf = sc.Qf.data() + (int64_t)i * F;
      sc.den[i] = dotp(qf, z_, F);
      sc.dth[i] = dotp(qf, sc.g.data() + (int64_t)i * F, F);  // g . num so far (dth is set below)
    }
    if (part) {
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
        const acc_t* w = sc.dA.data() + (int64_t)i * CH;
        acc_t* a = sc.A.data() + (int64_t)i * CH;
        vis_scores(a, p, sc.sk.data(), sc.ck.data(), sc.sq[i], sc.cq[i], n_vis, nk);
        sc.den[i] += sump(a, nk);
        sc.dth[i] += dotp(a, w, nk);
      }
    }
    // normalisation: dnum = g r, dden (r = 1 / dd); then dL/dq~ (inter part) = U r + dden z
    for (int64_t i = 0; i < nq; ++i) {
      acc_t r = 1, ddv = 0;
      if (normalize) {
        const acc_t den = sc.den[i];
        const acc_t dd = std::max(den, eps);
        r = acc_t(1) / dd;
        ddv = den >= eps ? -(sc.dth[i] * r) * r : acc_t(0);
      }
      sc.dd[i] = ddv;
      sc.den[i] = r;  // den now holds r
      acc_t* dn = sc.dn.data() + (int64_t)i * Dv;
      scale(dn, r, Dv);
      const int64_t w = sc.wn ? t0 + i : ((int64_t)it.b * H + h) * T + it.qo + t0 + i;
      std::memcpy((sc.wn ? sc.wn : wdn) + w * Dv, dn, sizeof(acc_t) * Dv);
      (sc.wd ? sc.wd : wdd)[w] = ddv;
      acc_t* g = sc.g.data() + (int64_t)i * F;
      scale_bias(g, z_, r, ddv, F);
      feat_grad<acc_t>(sc.da.data() + (int64_t)i * Dk, sc.tmp.data(), g, nullptr, sc.sq[i], sc.cq[i], Dk);
      sc.dth[i] = dotp(sc.Qa.data() + (int64_t)i * Dk, sc.tmp.data(), Dk);
    }
    if (part) {
      // dA = W r + dden on visible pairs; E = dA cos-weight (for da and the keys' db); the theta terms
      // X = dA P (sin(tq) cos(tk) - cos(tq) sin(tk)): -sum_s X to the query, +sum_i X to the key
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t n_vis = sc.nv[i];
        acc_t* w = sc.dA.data() + (int64_t)i * CH;  // W in, the theta terms X out
        intra_grad(sc.E.data() + (int64_t)i * CH, w, sc.dthi.data(), sc.P.data() + (int64_t)i * CH, sc.sk.data(),
                   sc.ck.data(), sc.sq[i], sc.cq[i], sc.den[i], sc.dd[i], n_vis, nk);
        sc.dth[i] -= sump(w, nk);
      }
      gemm_prefix_k<acc_t>(nq, Dk, nk, sc.E.data(), CH, 1, sc.Kb.data(), Dk, sc.da.data(), Dk, sc.nv.data());
      gemm_suffix_k<acc_t>(nk, Dv, nq, sc.A.data(), 1, CH, sc.dn.data(), Dv, sc.dvi.data(), Dv, sc.ks.data());
      gemm_suffix_k<acc_t>(nk, Dk, nq, sc.E.data(), 1, CH, sc.Qa.data(), Dk, sc.dbi.data(), Dk, sc.ks.data());
    }
    for (int64_t i = 0; i < nq; ++i) {  // relu(q) > 0 exactly where q > 0
      const int64_t gt = gt0 + i;
      masked_row(dq + (gt * H + h) * Dk, sc.da.data() + (int64_t)i * Dk, sc.Qa.data() + (int64_t)i * Dk, true, Dk);
      dpq[gt * H + h] = acc_t(HALF_PI) * sc.dth[i];
    }
  }
  if (part) {  // chunk j's intra part (zero where group j is empty)
    if (sc.ik) {  // the item's own workspace: contiguous
      std::memcpy(sc.ik + j * CH * Dk, sc.dbi.data(), sizeof(acc_t) * (size_t)(nk * Dk));
      std::memcpy(sc.iv + j * CH * Dv, sc.dvi.data(), sizeof(acc_t) * (size_t)(nk * Dv));
      std::memcpy(sc.ip + j * CH, sc.dthi.data(), sizeof(acc_t) * (size_t)nk);
    } else {
      for (int64_t s = 0; s < nk; ++s) {
        const int64_t row = ((int64_t)it.b * S + it.ko + j * CH + s) * H + h;
        std::memcpy(dkh + row * Dk, sc.dbi.data() + (int64_t)s * Dk, sizeof(acc_t) * Dk);
        std::memcpy(dvh + row * Dv, sc.dvi.data() + (int64_t)s * Dv, sizeof(acc_t) * Dv);
        dpkh[row] = sc.dthi[s];
      }
    }
  }
}

template <typename scalar_t>
void Leap<scalar_t>::load_dn(const Item& it, int64_t h, int64_t t0, int64_t nq, Scratch& sc, const acc_t* wdn, const acc_t* wdd) const {
  const int64_t w = sc.wn ? t0 : ((int64_t)it.b * H + h) * T + it.qo + t0;
  std::memcpy(sc.dn.data(), (sc.wn ? sc.wn : wdn) + w * Dv, sizeof(acc_t) * (size_t)nq * Dv);
  std::memcpy(sc.dd.data(), (sc.wd ? sc.wd : wdd) + w, sizeof(acc_t) * (size_t)nq);
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

// Gradients of the keys / values of the loaded chunk j: the inter-chunk part from the state
// gradient (dSt, its transpose dStT, dzt: everything that sees the whole chunk), plus the intra-chunk
// part the query pass left in the rows (bwd_q_group). Writes per query head: dkh [B, S, H, Dk],
// dvh [B, S, H, Dv], dpkh [B, S, H].
template <typename scalar_t>
void Leap<scalar_t>::kv_chunk(const Item& it, int64_t h, int64_t j, const acc_t* dSt, const acc_t* dzt,
    const acc_t* dStT, Scratch& sc, acc_t* dkh, acc_t* dvh, acc_t* dpkh) const {
  const int64_t nk = sc.nk;
  const int64_t gs0 = (int64_t)it.b * S + it.ko + j * CH;
  prefetch_rows_w(dkh + (gs0 * H + h) * Dk, H * Dk, nk, Dk);
  prefetch_rows_w(dvh + (gs0 * H + h) * Dv, H * Dv, nk, Dv);
  std::fill(sc.dKf.begin(), sc.dKf.begin() + (size_t)nk * F, acc_t(0));
  gemm<acc_t>(nk, F, Dv, sc.V.data(), Dv, 1, dStT, F, sc.dKf.data(), F);
  std::fill(sc.dvv.begin(), sc.dvv.begin() + (size_t)nk * Dv, acc_t(0));
  gemm<acc_t>(nk, Dv, F, sc.Kf.data(), F, 1, dSt, Dv, sc.dvv.data(), Dv);
  for (int64_t s = 0; s < nk; ++s) {
    const int64_t gs = gs0 + s;
    const int64_t row = gs * H + h;
    const bool keep = sc.msk[s] != acc_t(0);
    acc_t* db = sc.db.data() + (int64_t)s * Dk;
    feat_grad(db, sc.tmp.data(), sc.dKf.data() + (int64_t)s * F, dzt, sc.sk[s], sc.ck[s], Dk);
    const acc_t th = dotp(sc.Kb.data() + (int64_t)s * Dk, sc.tmp.data(), Dk);
    acc_t* dkr = dkh + row * Dk;
    acc_t* dvr = dvh + row * Dv;
    const int64_t sl = j * CH + s;  // the key's row in the item's workspace
    add_to(db, sc.ik ? sc.ik + sl * Dk : dkr, Dk);  // + the intra-chunk part
    masked_row(dkr, db, sc.Kb.data() + (int64_t)s * Dk, keep, Dk);  // relu(k) > 0 exactly where k > 0
    add_to(sc.dvv.data() + (int64_t)s * Dv, sc.iv ? sc.iv + sl * Dv : dvr, Dv);
    keep_row(dvr, sc.dvv.data() + (int64_t)s * Dv, keep, Dv);  // exactly 0 for a padded key
    dpkh[row] = keep ? acc_t(HALF_PI) * (th + (sc.ip ? sc.ip[sl] : dpkh[row])) : acc_t(0);
  }
}
