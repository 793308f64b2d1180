// LeaP attention (CPU): the drivers. One sweep (Leap::sweep) serves the forward and both passes of
// the backward: a state carried over the chunk boundaries of every (sequence, head) item, in key
// order (dir = +1: S_j = init + the states of chunks < j) or in reverse (dir = -1: the state
// gradient Y_j = init + the contributions of query groups > j), each boundary visited with the
// state there. It runs in one of two ways with bitwise identical results (the same per-chunk
// functions, the same summation order): per item sequentially over chunks (the state stays in
// cache), or across chunks in phases (chunk-local contributions in parallel, a prefix / suffix per
// item, then the visits in parallel) so that few heads with long sequences use every core. Every
// output element is written by exactly one task and every sum has a fixed order: deterministic,
// whatever the number of threads.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// ---------------- drivers ----------------
template <typename scalar_t>
bool Leap<scalar_t>::use_chunks() const {
  if (mode == 1) return false;
  if (mode == 2) return true;
  const int64_t nt = at::get_num_threads();
  if (nt <= 1) return false;
  int64_t total = 0, mx = 0;
  for (int64_t n = 0; n < N; ++n) {
    const Item it = item(n);
    total += (int64_t)(it.NK + 1) * H;
    mx = std::max<int64_t>(mx, it.NK + 1);
  }
  // across chunks only when one (sequence, head) would dominate the makespan: fewer items than
  // threads, or one sequence much longer than an even share (the chunk driver costs extra passes)
  return mx * 4 * nt > 5 * total && mx >= 4;
}

// query group boundaries per sequence (the same for every head): gbs[n][j] = first query of group j
template <typename scalar_t>
std::vector<std::vector<int64_t>> Leap<scalar_t>::group_table() const {
  std::vector<std::vector<int64_t>> gbs(N);
  for (int64_t n = 0; n < N; ++n) groups(item(n), gbs[n]);
  return gbs;
}

// The sweep over the chunk boundaries j = 0..NK of every item idx = n*H + h, with an (F*Dv + F)
// state (the layout is the callers': S, S^T or a state gradient), given as one object `P` with:
//   init(n, h, S, z)            the state before the first boundary visited
//   local(it, h, j, sc, dS, dz) the contribution of boundary j (dir > 0: chunk j's keys, j < NK;
//                               dir < 0: group j's queries, every j), written whole
//   visit(it, h, j, sc, S, z)   uses the state at boundary j (contributions before j in the
//                               sweep's order, not j's own)
//   fin(n, h, S, z)             the state after every contribution (may be a no-op)
template <typename Init, typename Local, typename Visit, typename Final>
struct Pass {
  int dir;
  const Init& init;
  const Local& local;
  const Visit& visit;
  const Final& fin;
};
template <typename Init, typename Local, typename Visit, typename Final>
Pass<Init, Local, Visit, Final> make_pass(int dir, const Init& i, const Local& l, const Visit& v, const Final& f) {
  return Pass<Init, Local, Visit, Final>{dir, i, l, v, f};
}

// Sequentially over the chunks of one item (the state in the task's scratch).
template <typename scalar_t>
template <typename P>
void Leap<scalar_t>::sweep_item(const P& p, int64_t idx, Scratch& sc) const {
  const int64_t n = idx / H, h = idx % H;
  const Item it = item(n);
  sc.dir = p.dir;
  p.init(n, h, sc.S.data(), sc.z.data());
  for (int64_t x = 0; x <= it.NK; ++x) {
    const int64_t j = p.dir > 0 ? x : it.NK - x;
    p.visit(it, h, j, sc, sc.S.data(), sc.z.data());
    if (p.dir < 0 || j < it.NK) {
      p.local(it, h, j, sc, sc.dS.data(), sc.dz.data());
      add_state(sc.S.data(), sc.z.data(), sc.dS.data(), sc.dz.data());
    }
  }
  p.fin(n, h, sc.S.data(), sc.z.data());
}

// Across chunks: one slot per boundary, first the local contributions (all (item, boundary) tasks
// in parallel), then per item, in the sweep's order, each slot becomes the state at its boundary,
// then the visits (all tasks in parallel). The same sums in the same order as sweep_item.
template <typename scalar_t>
template <typename P>
void Leap<scalar_t>::sweep_chunks(const P& p) const {
  const int dir = p.dir;
  const int64_t items = (int64_t)N * H;
  const int64_t sz = (int64_t)F * Dv + F;
  auto has_local = [&](const Item& it, int64_t j) { return dir < 0 || j < it.NK; };
  auto make = [&] {
    Scratch sc = make_scratch();
    sc.dir = dir;
    return sc;
  };
  std::vector<int64_t> off(items + 1, 0);
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t idx = 0; idx < items; ++idx) {
    const Item it = item(idx / H);
    off[idx + 1] = off[idx] + it.NK + 1;
    for (int64_t j = 0; j <= it.NK; ++j) tasks.emplace_back(idx, j);
  }
  std::vector<acc_t> X((size_t)off[items] * sz);
  auto slot = [&](int64_t idx, int64_t j) { return X.data() + (off[idx] + j) * sz; };
  const int64_t nt = (int64_t)tasks.size();
  parallel<Scratch>(nt, make, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tasks[ti].first, j = tasks[ti].second;
    const Item it = item(idx / H);
    if (has_local(it, j)) p.local(it, idx % H, j, sc, slot(idx, j), slot(idx, j) + (int64_t)F * Dv);
  });
  parallel<Scratch>(items, make, [&](int64_t idx, Scratch& sc) {
    const int64_t n = idx / H, h = idx % H;
    const Item it = item(n);
    acc_t *r = sc.S.data(), *rz = sc.z.data();
    p.init(n, h, r, rz);
    for (int64_t x = 0; x <= it.NK; ++x) {
      const int64_t j = dir > 0 ? x : it.NK - x;
      acc_t* X_ = slot(idx, j);
      std::memcpy(sc.dS.data(), X_, sizeof(acc_t) * (size_t)F * Dv);
      std::memcpy(sc.dz.data(), X_ + (int64_t)F * Dv, sizeof(acc_t) * F);
      std::memcpy(X_, r, sizeof(acc_t) * (size_t)F * Dv);
      std::memcpy(X_ + (int64_t)F * Dv, rz, sizeof(acc_t) * F);
      if (has_local(it, j)) add_state(r, rz, sc.dS.data(), sc.dz.data());
    }
    p.fin(n, h, r, rz);
  });
  parallel<Scratch>(nt, make, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tasks[ti].first, j = tasks[ti].second;
    p.visit(item(idx / H), idx % H, j, sc, slot(idx, j), slot(idx, j) + (int64_t)F * Dv);
  });
}

// Passes p1, then p2 (if given): with the sequential driver both run in one task per item (one
// parallel region; p2 of an item needs only p1 of the same item; setup(sc) prepares each thread's
// scratch), else each across chunks.
template <typename scalar_t>
template <typename P1, typename P2, typename Setup>
void Leap<scalar_t>::sweep(const P1& p1, const P2* p2, const Setup& setup) const {
  if (!use_chunks()) {
    auto make = [&] {
      Scratch sc = make_scratch();
      setup(sc);
      return sc;
    };
    parallel<Scratch>((int64_t)N * H, make, [&](int64_t idx, Scratch& sc) {
      sweep_item(p1, idx, sc);
      if (p2) sweep_item(*p2, idx, sc);
    });
    return;
  }
  sweep_chunks(p1);
  if (p2) sweep_chunks(*p2);
}

template <typename scalar_t>
void Leap<scalar_t>::forward(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const {
  const auto gbs = group_table();
  auto init = [&](int64_t n, int64_t h, acc_t* S_, acc_t* z_) {
    init_state(S_, z_, state_ptr(S0, n, h), zstate_ptr(z0, n, h));
  };
  auto local = [&](const Item& it, int64_t h, int64_t j, Scratch& sc, acc_t* dS, acc_t* dz) {
    load_keys(it, h, j, sc, false);
    chunk_state(sc, dS, dz);
  };
  auto visit = [&](const Item& it, int64_t h, int64_t j, Scratch& sc, const acc_t* S_, const acc_t* z_) {
    const std::vector<int64_t>& gb = gbs[it.n];
    if (gb[j] >= gb[j + 1]) return;
    if (j < it.NK) load_keys(it, h, j, sc);
    out_group(it, h, j, gb[j], gb[j + 1], S_, z_, sc, o);
  };
  auto fin = [&](int64_t n, int64_t h, const acc_t* S_, const acc_t* z_) {
    if (!Sout) return;
    std::memcpy(Sout + ((int64_t)n * H + h) * F * Dv, S_, sizeof(acc_t) * (size_t)F * Dv);
    std::memcpy(zout + ((int64_t)n * H + h) * F, z_, sizeof(acc_t) * F);
  };
  const auto p = make_pass(+1, init, local, visit, fin);
  sweep(p, (const decltype(p)*)nullptr, [](Scratch&) {});
}

// Two passes: in key order with the state held transposed (the query pass: dq, dpq, dnum / dden
// into the workspace, the intra-chunk part of the key gradients), then in reverse with the state
// gradient (the key pass: dk, dv, dpk; dS0, dz0 at the end).
template <typename scalar_t>
void Leap<scalar_t>::backward(const scalar_t* dout, const acc_t* dSin, const acc_t* dzin, const acc_t* S0, const acc_t* z0,
    scalar_t* dq, acc_t* dpq, acc_t* dkh, acc_t* dvh, acc_t* dpkh, acc_t* dS0, acc_t* dz0) const {
  const auto gbs = group_table();
  // dnum / dden per query and the intra-chunk key part: per item in the thread's scratch with the
  // sequential driver (setup), else call-wide (the dkh / dvh / dpkh rows hold the key part)
  std::unique_ptr<acc_t[]> wdn_, wdd_;
  int64_t Tmax = 0, Smax = 0;
  for (int64_t n = 0; n < N; ++n) {
    Tmax = std::max(Tmax, item(n).Tn);
    Smax = std::max(Smax, item(n).Sn);
  }
  if (use_chunks()) {
    wdn_.reset(new acc_t[(size_t)(B * H * T * Dv)]);
    wdd_.reset(new acc_t[(size_t)(B * H * T)]);
  }
  auto setup = [&](Scratch& sc) {
    sc.ws.reset(new acc_t[(size_t)(Tmax * (Dv + 1) + Smax * (Dk + Dv + 1))]);
    sc.wn = sc.ws.get();
    sc.wd = sc.wn + Tmax * Dv;
    sc.ik = sc.wd + Tmax;
    sc.iv = sc.ik + Smax * Dk;
    sc.ip = sc.iv + Smax * Dv;
  };
  struct {
    acc_t* p;
    acc_t* data() const { return p; }
  } wdn{wdn_.get()}, wdd{wdd_.get()};
  auto q_init = [&](int64_t n, int64_t h, acc_t* ST, acc_t* z_) {
    const acc_t* s0 = state_ptr(S0, n, h);
    if (s0) transpose(F, Dv, s0, Dv, ST, F);
    else std::fill(ST, ST + (size_t)F * Dv, acc_t(0));
    const acc_t* zz = zstate_ptr(z0, n, h);
    for (int64_t f = 0; f < F; ++f) z_[f] = zz ? zz[f] : acc_t(0);
  };
  auto q_local = [&](const Item& it, int64_t h, int64_t j, Scratch& sc, acc_t* dST, acc_t* dz) {
    load_keys(it, h, j, sc, false);
    chunk_state_T(sc, dST, dz);
  };
  auto q_visit = [&](const Item& it, int64_t h, int64_t j, Scratch& sc, const acc_t* ST, const acc_t* z_) {
    const std::vector<int64_t>& gb = gbs[it.n];
    if (j < it.NK && gb[j] < gb[j + 1]) load_keys(it, h, j, sc);
    bwd_q_group(it, h, j, gb[j], gb[j + 1], ST, z_, sc, dout, wdn.data(), wdd.data(), dq, dpq, dkh, dvh, dpkh);
  };
  auto q_fin = [](int64_t, int64_t, const acc_t*, const acc_t*) {};
  auto k_init = [&](int64_t n, int64_t h, acc_t* Y, acc_t* yz) {
    init_state(Y, yz, state_ptr(dSin, n, h), zstate_ptr(dzin, n, h));
  };
  auto k_local = [&](const Item& it, int64_t h, int64_t j, Scratch& sc, acc_t* dS, acc_t* dz) {
    const std::vector<int64_t>& gb = gbs[it.n];
    group_dstate(it, h, gb[j], gb[j + 1], sc, wdn.data(), wdd.data(), dS, dz);
  };
  auto k_visit = [&](const Item& it, int64_t h, int64_t j, Scratch& sc, const acc_t* Y, const acc_t* yz) {
    if (j >= it.NK) return;
    load_keys(it, h, j, sc, false);
    transpose(F, Dv, Y, Dv, sc.ST.data(), F);
    kv_chunk(it, h, j, Y, yz, sc.ST.data(), sc, dkh, dvh, dpkh);
  };
  auto k_fin = [&](int64_t n, int64_t h, const acc_t* Y, const acc_t* yz) {
    if (!dS0) return;
    std::memcpy(dS0 + ((int64_t)n * H + h) * F * Dv, Y, sizeof(acc_t) * (size_t)F * Dv);
    std::memcpy(dz0 + ((int64_t)n * H + h) * F, yz, sizeof(acc_t) * F);
  };
  const auto pq_ = make_pass(+1, q_init, q_local, q_visit, q_fin);
  const auto pk_ = make_pass(-1, k_init, k_local, k_visit, k_fin);
  sweep(pq_, &pk_, setup);
}
