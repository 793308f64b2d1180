// LeaP attention (CPU): loading one key chunk or one query sub-block into the task's scratch and
// building the re-weighted features x~ = [relu(x) sin(theta), relu(x) cos(theta)] there (never
// stored for the whole sequence); the state of one key chunk.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// ---------------- feature builders ----------------
// Loads key chunk j of item (n, h) unless it is the one loaded (a driver's visit and chunk-state
// steps share a load); `transposed`: also KbT, VT (the intra-chunk products of queries).
template <typename scalar_t>
void Leap<scalar_t>::load_keys(const Item& it, int64_t h, int64_t j, Scratch& sc, bool transposed) const {
  const int64_t item_id = it.n * H + h;
  if (sc.key_item != item_id || sc.key_j != j) {
    const int64_t hk = h / G;
    const int64_t s0 = j * CH;
    const int64_t nk = std::min(CH, it.Sn - s0);
    sc.nk = nk;
    const int64_t gs0 = (int64_t)it.b * S + it.ko + s0;
    const scalar_t* k0 = kR.at(gs0, hk);
    const scalar_t* v0 = vR.at(gs0, hk);
    const int64_t ks = kR.stride(), vs = vR.stride();
    prefetch_rows(k0, ks, nk, Dk);
    prefetch_rows(v0, vs, nk, Dv);
    const int64_t jn = j + sc.dir;  // the next chunk of the sweep
    if (sc.dir != 0 && jn >= 0 && jn < it.NK) {
      const int64_t gn = (int64_t)it.b * S + it.ko + jn * CH, nn = std::min(CH, it.Sn - jn * CH);
      prefetch_rows(kR.at(gn, hk), ks, nn, Dk);
      prefetch_rows(vR.at(gn, hk), vs, nn, Dv);
    }
    for (int64_t s = 0; s < nk; ++s) {
      const int64_t gs = gs0 + s;
      // a padded key is selected to 0 where loaded (k, pk and v: NaN or Inf there reach nothing)
      const bool pad = kpm && kpm[gs];
      const acc_t sn = pad ? acc_t(0) : sk_[gs * Hkv + hk], cs = pad ? acc_t(0) : ck_[gs * Hkv + hk];
      sc.sk[s] = sn;
      sc.ck[s] = cs;
      sc.msk[s] = pad ? acc_t(0) : acc_t(1);
      const scalar_t* kr = k0 + s * ks;
      acc_t* kb = sc.Kb.data() + (int64_t)s * Dk;
      acc_t* kf = sc.Kf.data() + (int64_t)s * F;
      for (int64_t d = 0; d < Dk; ++d) {
        const acc_t x = pad ? acc_t(0) : relu(static_cast<acc_t>(kr[d]));
        kb[d] = x;
        kf[d] = x * sn;
        kf[Dk + d] = x * cs;
      }
      const scalar_t* vr = v0 + s * vs;
      acc_t* vv = sc.V.data() + (int64_t)s * Dv;
      for (int64_t e = 0; e < Dv; ++e) vv[e] = pad ? acc_t(0) : static_cast<acc_t>(vr[e]);
    }
    sc.key_item = item_id;
    sc.key_j = j;
    sc.key_T = false;
  }
  if (transposed && !sc.key_T) {
    transpose(sc.nk, Dk, sc.Kb.data(), Dk, sc.KbT.data(), CH);
    transpose(sc.nk, Dv, sc.V.data(), Dv, sc.VT.data(), CH);
    sc.key_T = true;
  }
}

template <typename scalar_t>
void Leap<scalar_t>::load_queries(const Item& it, int64_t h, int64_t t0, int64_t nq, Scratch& sc) const {
  const int64_t gt0 = (int64_t)it.b * T + it.qo + t0;
  const scalar_t* q0 = qR.at(gt0, h);
  const int64_t qs = qR.stride();
  prefetch_rows(q0, qs, nq, Dk);
  if (sc.dir > 0 && t0 + nq < it.Tn)  // the next block of the sweep
    prefetch_rows(q0 + nq * qs, qs, std::min(QB, it.Tn - t0 - nq), Dk);
  else if (sc.dir < 0 && t0 > 0)
    prefetch_rows(q0 - std::min(QB, t0) * qs, qs, std::min(QB, t0), Dk);
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t gt = gt0 + i;
    const acc_t sn = sq_[gt * H + h], cs = cq_[gt * H + h];
    sc.sq[i] = sn;
    sc.cq[i] = cs;
    const scalar_t* qr = q0 + i * qs;
    acc_t* qa = sc.Qa.data() + (int64_t)i * Dk;
    acc_t* qf = sc.Qf.data() + (int64_t)i * F;
    for (int64_t d = 0; d < Dk; ++d) {
      const acc_t x = relu(static_cast<acc_t>(qr[d]));
      qa[d] = x;
      qf[d] = x * sn;
      qf[Dk + d] = x * cs;
    }
  }
}

// dz = sum_s Kf_s over the loaded key chunk (zero first; rows in order: deterministic)
template <typename scalar_t>
void Leap<scalar_t>::key_feature_sum(const Scratch& sc, acc_t* dz) const {
  for (int64_t f = 0; f < F; ++f) dz[f] = 0;
  for (int64_t s = 0; s < sc.nk; ++s) {
    const acc_t* kf = sc.Kf.data() + (int64_t)s * F;
    for (int64_t f = 0; f < F; ++f) dz[f] += kf[f];
  }
}

// dS = Kf^T V, dz = sum_s Kf_s over the loaded key chunk (zero first)
template <typename scalar_t>
void Leap<scalar_t>::chunk_state(const Scratch& sc, acc_t* dS, acc_t* dz) const {
  std::fill(dS, dS + (size_t)F * Dv, acc_t(0));
  gemm<acc_t>(F, Dv, sc.nk, sc.Kf.data(), 1, F, sc.V.data(), Dv, dS, Dv);
  key_feature_sum(sc, dz);
}

// The same state transposed: dST = V^T Kf (Dv x F), dz as above (the backward's query pass reads
// the state as S^T: no transpose per chunk)
template <typename scalar_t>
void Leap<scalar_t>::chunk_state_T(const Scratch& sc, acc_t* dST, acc_t* dz) const {
  std::fill(dST, dST + (size_t)F * Dv, acc_t(0));
  gemm<acc_t>(Dv, F, sc.nk, sc.V.data(), 1, Dv, sc.Kf.data(), F, dST, F);
  key_feature_sum(sc, dz);
}
