// LeaP attention (CPU): the drivers. Two with bitwise identical results (the same per-chunk
// functions, the same summation order): per (sequence, head) sequentially over chunks (the state
// stays in cache), or across chunks in phases (chunk-local states, a prefix over chunk states,
// then outputs; the backward adds a suffix over chunk state-gradients) so that few heads with
// long sequences use every core. Every output element is written by exactly one task and every
// sum has a fixed order: deterministic, whatever the number of threads.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// ---------------- drivers ----------------
template <typename scalar_t>
bool Leap<scalar_t>::use_chunks(int64_t items) const {
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
  (void)items;
  // across chunks only when one (sequence, head) would dominate the makespan: fewer items than
  // threads, or one sequence much longer than an even share (the chunk driver costs extra passes)
  return mx * 4 * nt > 5 * total && mx >= 4;
}

template <typename scalar_t>
typename Leap<scalar_t>::ChunkTable Leap<scalar_t>::chunk_table() const {
  const int64_t items = (int64_t)N * H;
  ChunkTable tb;
  tb.off.assign(items + 1, 0);
  tb.gbs.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    const Item it = item(n);
    groups(it, tb.gbs[n]);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t idx = (int64_t)n * H + h;
      tb.off[idx + 1] = tb.off[idx] + it.NK + 1;
      for (int64_t j = 0; j <= it.NK; ++j) tb.tasks.emplace_back(idx, j);
    }
  }
  tb.slot = (int64_t)F * Dv + F;
  return tb;
}

// X slot j of item idx <- S0 + the states of chunks < j (chunk-local states in parallel over
// all (item, chunk) tasks, then a prefix per item).
template <typename scalar_t>
void Leap<scalar_t>::prefix_states(const ChunkTable& tb, std::vector<acc_t>& X, const acc_t* S0, const acc_t* z0) const {
  auto XS = [&](int64_t idx, int64_t j) { return X.data() + (tb.off[idx] + j) * tb.slot; };
  auto Xz = [&](int64_t idx, int64_t j) { return X.data() + (tb.off[idx] + j) * tb.slot + (int64_t)F * Dv; };
  parallel<Scratch>((int64_t)tb.tasks.size(), [&] { return make_scratch(); }, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tb.tasks[ti].first;
    const int64_t j = tb.tasks[ti].second;
    const Item it = item(idx / H);
    if (j >= it.NK) return;
    load_keys(it, idx % H, j, sc);
    chunk_state(sc, XS(idx, j + 1), Xz(idx, j + 1));
  });
  parallel<int64_t>((int64_t)N * H, [] { return 0; }, [&](int64_t idx, int64_t&) {
    const int64_t n = (int64_t)(idx / H), h = (int64_t)(idx % H);
    const Item it = item(n);
    init_state(XS(idx, 0), Xz(idx, 0), state_ptr(S0, n, h), zstate_ptr(z0, n, h));
    for (int64_t j = 1; j <= it.NK; ++j) add_state(XS(idx, j), Xz(idx, j), XS(idx, j - 1), Xz(idx, j - 1));
  });
}

template <typename scalar_t>
void Leap<scalar_t>::forward(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const {
  const int64_t items = (int64_t)N * H;
  if (!use_chunks(items)) {
    parallel<Scratch>(items, [&] { return make_scratch(); }, [&](int64_t idx, Scratch& sc) {
      const int64_t n = (int64_t)(idx / H), h = (int64_t)(idx % H);
      const Item it = item(n);
      groups(it, sc.gb);
      init_state(sc.S.data(), sc.z.data(), state_ptr(S0, n, h), zstate_ptr(z0, n, h));
      for (int64_t j = 0; j <= it.NK; ++j) {
        if (j < it.NK) load_keys(it, h, j, sc);
        out_group(it, h, j, sc.gb[j], sc.gb[j + 1], sc.S.data(), sc.z.data(), sc, o);
        if (j < it.NK) {
          chunk_state(sc, sc.dS.data(), sc.dz.data());
          add_state(sc.S.data(), sc.z.data(), sc.dS.data(), sc.dz.data());
        }
      }
      if (Sout) {
        std::memcpy(Sout + ((int64_t)n * H + h) * F * Dv, sc.S.data(), sizeof(acc_t) * (size_t)F * Dv);
        std::memcpy(zout + ((int64_t)n * H + h) * F, sc.z.data(), sizeof(acc_t) * F);
      }
    });
    return;
  }
  // across chunks
  const ChunkTable tb = chunk_table();
  const std::vector<int64_t>& off = tb.off;
  const std::vector<std::pair<int64_t, int64_t>>& tasks = tb.tasks;
  const std::vector<std::vector<int64_t>>& gbs = tb.gbs;
  const int64_t slot = tb.slot;
  std::vector<acc_t> X((size_t)off[items] * slot);
  auto XS = [&](int64_t idx, int64_t j) { return X.data() + (off[idx] + j) * slot; };
  auto Xz = [&](int64_t idx, int64_t j) { return X.data() + (off[idx] + j) * slot + (int64_t)F * Dv; };
  // phases 1-2: chunk-local states, then the prefix over them
  prefix_states(tb, X, S0, z0);
  if (Sout) {
    for (int64_t idx = 0; idx < items; ++idx) {
      const int64_t n = idx / H, h = idx % H, NK = item(n).NK;
      std::memcpy(Sout + ((int64_t)n * H + h) * F * Dv, XS(idx, NK), sizeof(acc_t) * (size_t)F * Dv);
      std::memcpy(zout + ((int64_t)n * H + h) * F, Xz(idx, NK), sizeof(acc_t) * F);
    }
  }
  // phase 3: outputs
  parallel<Scratch>((int64_t)tasks.size(), [&] { return make_scratch(); }, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tasks[ti].first;
    const int64_t j = tasks[ti].second;
    const int64_t h = idx % H;
    const Item it = item(idx / H);
    const std::vector<int64_t>& gbv = gbs[idx / H];
    if (gbv[j] >= gbv[j + 1]) return;
    if (j < it.NK) load_keys(it, h, j, sc);
    out_group(it, h, j, gbv[j], gbv[j + 1], XS(idx, j), Xz(idx, j), sc, o);
  });
}

template <typename scalar_t>
void Leap<scalar_t>::backward(const scalar_t* dout, const acc_t* dSin, const acc_t* dzin, const acc_t* S0, const acc_t* z0,
    scalar_t* dq, acc_t* dpq, acc_t* dkh, acc_t* dvh, acc_t* dpkh, acc_t* dS0, acc_t* dz0) const {
  const int64_t items = (int64_t)N * H;
  std::vector<acc_t> wdn((size_t)B * H * T * Dv), wdd((size_t)B * H * T);
  if (!use_chunks(items)) {
    parallel<Scratch>(items, [&] { return make_scratch(); }, [&](int64_t idx, Scratch& sc) {
      const int64_t n = (int64_t)(idx / H), h = (int64_t)(idx % H);
      const Item it = item(n);
      groups(it, sc.gb);
      init_state(sc.S.data(), sc.z.data(), state_ptr(S0, n, h), zstate_ptr(z0, n, h));
      for (int64_t j = 0; j <= it.NK; ++j) {
        if (j < it.NK) load_keys(it, h, j, sc);
        if (sc.gb[j] < sc.gb[j + 1]) {
          transpose(F, Dv, sc.S.data(), Dv, sc.ST.data(), F);
          bwd_q_group(it, h, j, sc.gb[j], sc.gb[j + 1], sc.S.data(), sc.z.data(), sc.ST.data(), sc, dout,
                      wdn.data(), wdd.data(), dq, dpq);
        }
        if (j < it.NK) {
          chunk_state(sc, sc.dS.data(), sc.dz.data());
          add_state(sc.S.data(), sc.z.data(), sc.dS.data(), sc.dz.data());
        }
      }
      // reverse: S, z now hold the state gradient
      init_state(sc.S.data(), sc.z.data(), state_ptr(dSin, n, h), zstate_ptr(dzin, n, h));
      for (int64_t j = it.NK; j >= 0; --j) {
        if (j < it.NK) {
          load_keys(it, h, j, sc);
          transpose(F, Dv, sc.S.data(), Dv, sc.ST.data(), F);
          kv_chunk(it, h, j, sc.gb[j], sc.gb[j + 1], sc.S.data(), sc.z.data(), sc.ST.data(), sc, wdn.data(),
                   wdd.data(), dkh, dvh, dpkh);
        }
        group_dstate(it, h, sc.gb[j], sc.gb[j + 1], sc, wdn.data(), wdd.data(), sc.dS.data(), sc.dz.data());
        add_state(sc.S.data(), sc.z.data(), sc.dS.data(), sc.dz.data());
      }
      if (dS0) {
        std::memcpy(dS0 + ((int64_t)n * H + h) * F * Dv, sc.S.data(), sizeof(acc_t) * (size_t)F * Dv);
        std::memcpy(dz0 + ((int64_t)n * H + h) * F, sc.z.data(), sizeof(acc_t) * F);
      }
    });
    return;
  }
  const ChunkTable tb = chunk_table();
  const std::vector<int64_t>& off = tb.off;
  const std::vector<std::pair<int64_t, int64_t>>& tasks = tb.tasks;
  const std::vector<std::vector<int64_t>>& gbs = tb.gbs;
  const int64_t slot = tb.slot;
  std::vector<acc_t> X((size_t)off[items] * slot), Y((size_t)off[items] * slot);
  auto XS = [&](int64_t idx, int64_t j) { return X.data() + (off[idx] + j) * slot; };
  auto Xz = [&](int64_t idx, int64_t j) { return X.data() + (off[idx] + j) * slot + (int64_t)F * Dv; };
  auto YS = [&](int64_t idx, int64_t j) { return Y.data() + (off[idx] + j) * slot; };
  auto Yz = [&](int64_t idx, int64_t j) { return Y.data() + (off[idx] + j) * slot + (int64_t)F * Dv; };
  auto scratch = [&] { return make_scratch(); };
  const int64_t nt = (int64_t)tasks.size();
  prefix_states(tb, X, S0, z0);  // recomputed, as in the forward
  parallel<Scratch>(nt, scratch, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tasks[ti].first;
    const int64_t j = tasks[ti].second;
    const int64_t h = idx % H;
    const Item it = item(idx / H);
    const std::vector<int64_t>& gbv = gbs[idx / H];
    if (gbv[j] >= gbv[j + 1]) return;
    if (j < it.NK) load_keys(it, h, j, sc);
    transpose(F, Dv, XS(idx, j), Dv, sc.ST.data(), F);
    bwd_q_group(it, h, j, gbv[j], gbv[j + 1], XS(idx, j), Xz(idx, j), sc.ST.data(), sc, dout, wdn.data(),
                wdd.data(), dq, dpq);
  });
  parallel<Scratch>(nt, scratch, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tasks[ti].first;
    const int64_t j = tasks[ti].second;
    const Item it = item(idx / H);
    const std::vector<int64_t>& gbv = gbs[idx / H];
    group_dstate(it, idx % H, gbv[j], gbv[j + 1], sc, wdn.data(), wdd.data(), YS(idx, j), Yz(idx, j));
  });
  // suffix: Y[j] <- dS_in + sum_{j' > j} dS_{j'}; the state gradient dS0 = that plus dS_0
  parallel<Scratch>(items, scratch, [&](int64_t idx, Scratch& sc) {
    const int64_t n = (int64_t)(idx / H), h = (int64_t)(idx % H);
    const Item it = item(n);
    acc_t* r = sc.S.data();
    acc_t* rz = sc.z.data();
    init_state(r, rz, state_ptr(dSin, n, h), zstate_ptr(dzin, n, h));
    for (int64_t j = it.NK; j >= 0; --j) {
      std::memcpy(sc.dS.data(), YS(idx, j), sizeof(acc_t) * (size_t)F * Dv);
      std::memcpy(sc.dz.data(), Yz(idx, j), sizeof(acc_t) * F);
      std::memcpy(YS(idx, j), r, sizeof(acc_t) * (size_t)F * Dv);
      std::memcpy(Yz(idx, j), rz, sizeof(acc_t) * F);
      add_state(r, rz, sc.dS.data(), sc.dz.data());
    }
    if (dS0) {
      std::memcpy(dS0 + ((int64_t)n * H + h) * F * Dv, r, sizeof(acc_t) * (size_t)F * Dv);
      std::memcpy(dz0 + ((int64_t)n * H + h) * F, rz, sizeof(acc_t) * F);
    }
  });
  parallel<Scratch>(nt, scratch, [&](int64_t ti, Scratch& sc) {
    const int64_t idx = tasks[ti].first;
    const int64_t j = tasks[ti].second;
    const int64_t h = idx % H;
    const Item it = item(idx / H);
    if (j >= it.NK) return;
    const std::vector<int64_t>& gbv = gbs[idx / H];
    load_keys(it, h, j, sc);
    transpose(F, Dv, YS(idx, j), Dv, sc.ST.data(), F);
    kv_chunk(it, h, j, gbv[j], gbv[j + 1], YS(idx, j), Yz(idx, j), sc.ST.data(), sc, wdn.data(), wdd.data(),
             dkh, dvh, dpkh);
  });
}
