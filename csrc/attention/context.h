// The kernel context of LeaP attention on the CPU: sizes, flags, pointers, the call's configuration,
// the (sequence, head) items and their query groups, the per-task scratch. The member functions
// are defined by topic: features.h (chunk loads, feature build), chunk_ops.h (the per-chunk
// forward and backward pieces), sweep.h (the two drivers), step.h (the decode step).
//
// Visibility is always a prefix of the keys: query t sees keys s < lim(t) (causal: t+1,
// block-causal: the end of t's block, non-causal: S, monotone cross-attention: the caller's
// num_visible_keys n[b, t]), minus padded keys. Keys are cut into chunks of CH; query t belongs
// to "group" j(t) = lim(t)/CH (or NK when lim(t) = S): it reads the state of all chunks < j plus
// a partial (masked) part of chunk j. lim is non-decreasing in t, so groups partition the queries
// into contiguous ranges (a group may be empty, or hold many queries).
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

constexpr int64_t CH = lk::attn::kChunk;  // key chunk length
constexpr int64_t QB = 64;  // query sub-block length

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename scalar_t>
struct Leap {
  using acc_t = typename AccOf<scalar_t>::type;
  static constexpr double HALF_PI = 1.57079632679489661923;

  // Sizes, indices and offsets are int64_t. W: the block size clamped to [0, max(T, S)] (0 = not
  // block-causal; any block_size >= the sequence length is one block).
  int64_t B = 0, T = 0, S = 0, H = 0, Hkv = 0, G = 1, Dk = 0, Dv = 0, F = 0, N = 0;
  int64_t W = 0;
  // The call's configuration (arguments of the entry points, no globals): the driver (0 automatic,
  // 1 sequential over chunks per (sequence, head), 2 across chunks), the work estimate (multiply-
  // adds: small calls run on the calling thread, common/task_runner.h).
  int64_t mode = 0;
  double work = 1e30;
  template <typename Sc, typename Make, typename Fn>
  void parallel(int64_t n, const Make& make, const Fn& fn, int64_t block = 1) const {
    run_tasks<Sc>(n, work, make, fn, block);
  }
  bool causal = true, normalize = true;
  acc_t eps = 0;
  const int64_t* cu = nullptr;
  // monotone cross-attention (num_visible_keys, [B, T]): query t of batch b sees keys
  // s < nvk[b*T + t] (checked: in [0, S], non-decreasing along t; only with causal=false, no
  // cu_seqlens, no block size). Null otherwise.
  const int64_t* nvk = nullptr;
  const bool* kpm = nullptr;
  const scalar_t *q = nullptr, *k = nullptr, *v = nullptr;
  const acc_t *pq = nullptr, *pk = nullptr;

  static inline acc_t relu(acc_t x) { return x < acc_t(0) ? acc_t(0) : x; }
  // sin(pi/2 p) and the cosine half as sin(pi/2 (1 - p)): exact 0 at p = 1 and p = 0
  // (attention/features.py: every backend builds the features this way)
  static inline void sincos_p(acc_t p, acc_t& sn, acc_t& cs) {
    sn = std::sin(acc_t(HALF_PI) * p);
    cs = std::sin(acc_t(HALF_PI) * (acc_t(1) - p));
  }

  // Row access of the per-head inputs: a [Bn, L, Hn, D] tensor, or its head-major copy [Bn, Hn, L, D]
  // (made in prepare). A head's rows are H*D apart in the input: every row a fresh cache line and,
  // for long sequences, a fresh page, so each pass over them waits on memory; in the copy they are
  // contiguous (made in one pass that reads the input in order).
  struct Rows {
    const scalar_t* p = nullptr;
    int64_t L = 0, Hn = 0, D = 0;
    bool packed = false;
    // the row of head hh at global row gr = b*L + t; the rows of t, t+1, ... (same b) are stride() apart
    const scalar_t* at(int64_t gr, int64_t hh) const {
      return packed ? p + (((gr / L) * Hn + hh) * L + gr % L) * D : p + (gr * Hn + hh) * D;
    }
    int64_t stride() const { return packed ? D : Hn * D; }
  };
  Rows qR, kR, vR, doR;
  std::unique_ptr<scalar_t[]> qbuf, kbuf, vbuf, dobuf;
  // the head-major copy where it pays (several heads, more than a cache's worth): its buffer now,
  // its rows filled by copy_row
  Rows rows_of(const scalar_t* src, int64_t Bn, int64_t L, int64_t Hn, int64_t D, std::unique_ptr<scalar_t[]>& buf) {
    Rows r;
    r.p = src;
    r.L = L;
    r.Hn = Hn;
    r.D = D;
    if (!src || Hn <= 1 || (double)Bn * L * Hn * D * sizeof(scalar_t) < double(1 << 21)) return r;
    buf.reset(new scalar_t[(size_t)(Bn * L * Hn * D)]);
    r.p = buf.get();
    r.packed = true;
    return r;
  }
  static void copy_row(const Rows& r, const scalar_t* src, int64_t gr) {
    if (!r.packed) return;
    const int64_t b = gr / r.L, t = gr % r.L;
    scalar_t* dst = const_cast<scalar_t*>(r.p);
    for (int64_t hh = 0; hh < r.Hn; ++hh)
      std::memcpy(dst + ((b * r.Hn + hh) * r.L + t) * r.D, src + (gr * r.Hn + hh) * r.D, sizeof(scalar_t) * (size_t)r.D);
  }

  // sin / cosine-half of every proportion, computed once per call (T*H + S*Hkv scalars)
  std::vector<acc_t> sqv, cqv, skv, ckv;
  const acc_t *sq_ = nullptr, *cq_ = nullptr, *sk_ = nullptr, *ck_ = nullptr;
  // also sets the work estimate of forward / backward, and makes the head-major copies of q, k, v
  // (and of dout, for the backward): one parallel pass over the rows
  void prepare(const scalar_t* dout = nullptr) {
    work = (double)B * std::max(T, S) * H * (double)F * (Dv + CH);
    const int64_t nq = (int64_t)B * T, nk = (int64_t)B * S;
    sqv.resize(nq * H);
    cqv.resize(nq * H);
    skv.resize(nk * Hkv);
    ckv.resize(nk * Hkv);
    qR = rows_of(q, B, T, H, Dk, qbuf);
    kR = rows_of(k, B, S, Hkv, Dk, kbuf);
    vR = rows_of(v, B, S, Hkv, Dv, vbuf);
    doR = rows_of(dout, B, T, H, Dv, dobuf);
    at::parallel_for(0, nq + nk, 256, [&](int64_t a, int64_t e) {
      for (int64_t r = a; r < e; ++r) {
        if (r < nq) {
          for (int64_t hh = 0; hh < H; ++hh) sincos_p(pq[r * H + hh], sqv[r * H + hh], cqv[r * H + hh]);
          copy_row(qR, q, r);
          if (dout) copy_row(doR, dout, r);
        } else {
          const int64_t rr = r - nq;
          for (int64_t hh = 0; hh < Hkv; ++hh) sincos_p(pk[rr * Hkv + hh], skv[rr * Hkv + hh], ckv[rr * Hkv + hh]);
          copy_row(kR, k, rr);
          copy_row(vR, v, rr);
        }
      }
    });
    sq_ = sqv.data();
    cq_ = cqv.data();
    sk_ = skv.data();
    ck_ = ckv.data();
  }

  struct Item {
    int64_t b, n, qo, ko, Tn, Sn, NK;
  };

  Item item(int64_t n) const {
    Item it;
    it.n = n;
    if (cu) {
      it.b = 0;
      it.qo = it.ko = (int64_t)cu[n];
      it.Tn = it.Sn = (int64_t)(cu[n + 1] - cu[n]);
    } else {
      it.b = n;
      it.qo = it.ko = 0;
      it.Tn = T;
      it.Sn = S;
    }
    it.NK = (it.Sn + CH - 1) / CH;
    return it;
  }

  int64_t lim(const Item& it, int64_t t) const {
    if (nvk) return (int64_t)nvk[(int64_t)it.b * T + t];  // in [0, S] (check_visible_keys)
    if (!causal) return it.Sn;
    if (W <= 0) return t + 1;
    const int64_t e = ((int64_t)t / W + 1) * W;  // W <= max(T, S): no overflow
    return (int64_t)std::min<int64_t>(e, it.Sn);
  }
  int64_t group_of(const Item& it, int64_t t) const {
    int64_t l = lim(it, t);
    return l >= it.Sn ? it.NK : l / CH;
  }
  // gb[j] = first query of group j (j = 0..NK), gb[NK+1] = Tn
  void groups(const Item& it, std::vector<int64_t>& gb) const {
    gb.assign(it.NK + 2, it.Tn);
    int64_t t = 0;
    for (int64_t j = 0; j <= it.NK; ++j) {
      while (t < it.Tn && group_of(it, t) < j) ++t;
      gb[j] = t;
    }
  }

  // ---------------- scratch ----------------
  struct Scratch {
    // keys of one chunk
    std::vector<acc_t> Kb, KbT, sk, ck, Kf, V, VT, msk;
    int64_t nk = 0;
    // which chunk is loaded (item n*H + h, chunk j; -1: none) and whether KbT, VT are built:
    // a driver's visit and chunk-state steps share one load
    int64_t key_item = -1, key_j = -1;
    bool key_T = false;
    // The backward's per-item workspace with the sequential driver (null: the call-wide one, rows of
    // dkh / dvh / dpkh for the intra-chunk key part): dnum [Tn, Dv], dden [Tn], the intra-chunk key
    // gradients [Sn, Dk], [Sn, Dv], [Sn] of the item in the task, in the thread's own buffer (stays in
    // cache between the two passes).
    std::unique_ptr<acc_t[]> ws;
    acc_t *wn = nullptr, *wd = nullptr, *ik = nullptr, *iv = nullptr, *ip = nullptr;
    // the sweep's direction (+1 in key order, -1 in reverse, 0 none): the loads prefetch the
    // rows of the next chunk / query block in that direction while the current one is worked on
    int dir = 0;
    // queries of one sub-block
    std::vector<acc_t> Qa, sq, cq, Qf, num, den, P, A, E, dA, dn, dd, g, da, dth;
    std::vector<int64_t> nv, ks;
    std::vector<acc_t> tmp;  // one row of terms to sum (dotp / sump)
    // states
    std::vector<acc_t> S, z, dS, dz, ST;
    // key gradients of one chunk (inter-chunk part; the intra-chunk part of the backward's query
    // pass: dbi, dvi, dthi)
    std::vector<acc_t> dKf, dvv, db, dbi, dvi, dthi;
  };
  Scratch make_scratch() const {
    Scratch s;
    s.Kb.resize((size_t)CH * Dk);
    s.KbT.resize((size_t)Dk * CH);
    s.sk.resize(CH);
    s.ck.resize(CH);
    s.msk.resize(CH);
    s.Kf.resize((size_t)CH * F);
    s.V.resize((size_t)CH * Dv);
    s.VT.resize((size_t)Dv * CH);
    s.Qa.resize((size_t)QB * Dk);
    s.sq.resize(QB);
    s.cq.resize(QB);
    s.Qf.resize((size_t)QB * F);
    s.num.resize((size_t)QB * Dv);
    s.den.resize(QB);
    s.P.resize((size_t)QB * CH);
    s.A.resize((size_t)QB * CH);
    s.E.resize((size_t)QB * CH);
    s.dA.resize((size_t)QB * CH);
    s.dn.resize((size_t)QB * Dv);
    s.dd.resize(QB);
    s.g.resize((size_t)QB * F);
    s.da.resize((size_t)QB * Dk);
    s.dth.resize(QB);
    s.nv.resize(QB);
    s.tmp.resize((size_t)std::max<int64_t>({F, CH, Dv}));
    s.ks.resize(CH);
    s.S.resize((size_t)F * Dv);
    s.z.resize(F);
    s.dS.resize((size_t)F * Dv);
    s.dz.resize(F);
    s.ST.resize((size_t)Dv * F);
    s.dKf.resize((size_t)CH * F);
    s.dvv.resize((size_t)CH * Dv);
    s.db.resize((size_t)CH * Dk);
    s.dbi.resize((size_t)CH * Dk);
    s.dvi.resize((size_t)CH * Dv);
    s.dthi.resize(CH);
    return s;
  }

  const acc_t* state_ptr(const acc_t* base, int64_t n, int64_t h) const {
    return base ? base + ((int64_t)n * H + h) * F * Dv : nullptr;
  }
  const acc_t* zstate_ptr(const acc_t* base, int64_t n, int64_t h) const {
    return base ? base + ((int64_t)n * H + h) * F : nullptr;
  }
  void init_state(acc_t* S_, acc_t* z_, const acc_t* S0, const acc_t* z0) const {
    if (S0) std::memcpy(S_, S0, sizeof(acc_t) * (size_t)F * Dv);
    else std::fill(S_, S_ + (size_t)F * Dv, acc_t(0));
    if (z0) std::memcpy(z_, z0, sizeof(acc_t) * F);
    else std::fill(z_, z_ + F, acc_t(0));
  }
  void add_state(acc_t* S_, acc_t* z_, const acc_t* dS, const acc_t* dz) const {  // S = S + dS
    const size_t n = (size_t)F * Dv;
    for (size_t x = 0; x < n; ++x) S_[x] = S_[x] + dS[x];
    for (int64_t f = 0; f < F; ++f) z_[f] = z_[f] + dz[f];
  }

  // ---------------- defined in features.h, chunk_ops.h, sweep.h, step.h ----------------
  void load_keys(const Item& it, int64_t h, int64_t j, Scratch& sc, bool transposed = true) const;
  void load_queries(const Item& it, int64_t h, int64_t t0, int64_t nq, Scratch& sc) const;
  void key_feature_sum(const Scratch& sc, acc_t* dz) const;
  void chunk_state(const Scratch& sc, acc_t* dS, acc_t* dz) const;
  void chunk_state_T(const Scratch& sc, acc_t* dST, acc_t* dz) const;
  void attend(const Item& it, int64_t j, int64_t t0, int64_t nq, const acc_t* S_, const acc_t* z_, Scratch& sc) const;
  void out_group(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* S_, const acc_t* z_, Scratch& sc,
                 scalar_t* o) const;
  void bwd_q_group(const Item& it, int64_t h, int64_t j, int64_t ta, int64_t tb, const acc_t* ST, const acc_t* z_,
                   Scratch& sc, const scalar_t* dout, acc_t* wdn, acc_t* wdd, scalar_t* dq, acc_t* dpq, acc_t* dkh,
                   acc_t* dvh, acc_t* dpkh) const;
  void load_dn(const Item& it, int64_t h, int64_t t0, int64_t nq, Scratch& sc, const acc_t* wdn, const acc_t* wdd) const;
  void group_dstate(const Item& it, int64_t h, int64_t ta, int64_t tb, Scratch& sc, const acc_t* wdn, const acc_t* wdd,
                    acc_t* dS, acc_t* dz) const;
  void kv_chunk(const Item& it, int64_t h, int64_t j, const acc_t* dSt, const acc_t* dzt, const acc_t* dStT, Scratch& sc,
                acc_t* dkh, acc_t* dvh, acc_t* dpkh) const;
  bool use_chunks() const;
  std::vector<std::vector<int64_t>> group_table() const;
  template <typename P>
  void sweep_item(const P& p, int64_t idx, Scratch& sc) const;
  template <typename P>
  void sweep_chunks(const P& p) const;
  template <typename P1, typename P2, typename Setup>
  void sweep(const P1& p1, const P2* p2, const Setup& setup) const;
  void forward(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const;
  void backward(const scalar_t* dout, const acc_t* dSin, const acc_t* dzin, const acc_t* S0, const acc_t* z0,
                scalar_t* dq, acc_t* dpq, acc_t* dkh, acc_t* dvh, acc_t* dpkh, acc_t* dS0, acc_t* dz0) const;
  void step(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const;
  void feature_row(const scalar_t* x, acc_t p, acc_t* out) const;
  void out_row(const acc_t* nm, acc_t den, scalar_t* orow) const;
};
