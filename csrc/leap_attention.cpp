// LeaPformer attention: chunkwise C++/OpenMP kernels for the "cpu" backend.
//
// Math (DESIGN section 2): with a = relu(x), theta = pi/2 * p, the re-weighted feature is
// x~ = [a sin(theta), a cos(theta)] (2*Dk, never stored for the whole sequence: built per
// chunk in thread-local buffers). o_t = num_t / max(den_t, eps) with
// num_t = q~_t S0 + sum_{s visible} A_ts v_s, den_t = q~_t z0 + sum A_ts, A_ts = q~_t . k~_s
// = (a_t . b_s) cos(theta_t - theta_s) (the intra-chunk scores use this Dk-sized form).
//
// Visibility is always a prefix of the keys: query t sees keys s < lim(t) (causal: t+1,
// block-causal: the end of t's block, non-causal: S, monotone cross-attention: the caller's
// num_visible_keys n[b, t]), minus padded keys. Keys are cut into chunks of CH; query t belongs
// to "group" j(t) = lim(t)/CH (or NK when lim(t) = S): it reads the state of all chunks < j plus
// a partial (masked) part of chunk j. lim is non-decreasing in t, so groups partition the queries
// into contiguous ranges (a group may be empty, or hold many queries).
//
// Monotone cross-attention (T != S allowed) is this scheme with lim(t) = n[b, t]: the forward
// sweeps the keys in order carrying the state, each group reading it at its chunk boundary and
// adding masked scores over the one chunk its limits cut; the backward's reverse sweep hands each
// key chunk the state gradient accumulated from the groups above it (q~^T dnum, q~^T dden) plus
// the masked-pair terms of its own group. Every query touches one partial chunk whatever the
// rate: O(CH (T + S)) work per (sequence, head), no T x S buffer.
//
// Two drivers with bitwise identical results (the same per-chunk functions, the same
// summation order): per (sequence, head) sequentially over chunks (the state stays in
// cache), or across chunks in phases (chunk-local states, a prefix over chunk states, then
// outputs; the backward adds a suffix over chunk state-gradients) so that few heads with int64_t
// sequences use every core. Parallelism is at::parallel_for with a task counter; every
// output element is written by exactly one task and every sum has a fixed order: the
// results are deterministic and independent of the number of threads.
//
// Hardening (DESIGN section 6): sizes fit in int (checked; refused, never truncated) and every
// offset or product is int64_t (never `long`, 32-bit on Windows); block_size is int64 and any
// value >= the sequence length is one block; cu_seqlens is checked here (it is a CPU tensor, and
// the Python-side value checks are skipped under torch.compile); relu keeps NaN; a padded key is
// selected to 0 where loaded (k, pk, v) and its dk, dv, dpk are exactly 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int CH = 64;  // key chunk length
constexpr int QB = 64;  // query sub-block length
int g_mode = 0;         // 0 automatic, 1 sequential per (sequence, head), 2 across chunks

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// ---------------------------------------------------------------------------------------
// Small GEMM: C[i*ldc + j] += sum_k A[i*sai + k*sak] * B[k*ldb + j]   (i < M, j < N, k < K)
// Register-blocked MR x NR tiles accumulate over the whole K in registers (fixed order:
// k ascending), then add into C. Results depend on the shapes only (deterministic).
// ---------------------------------------------------------------------------------------
template <typename T, int MR, int NR>
inline void micro(int K, const T* __restrict A, int64_t sai, int64_t sak, const T* __restrict B, int64_t ldb,
                  T* __restrict C, int64_t ldc) {
  T acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) acc[r][c] = T(0);
  for (int k = 0; k < K; ++k) {
    const T* b = B + (int64_t)k * ldb;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * sai + (int64_t)k * sak];
#pragma GCC unroll 16
      for (int c = 0; c < NR; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) C[r * ldc + c] += acc[r][c];
}

template <typename T>
inline void gemm_edge(int M, int N, int K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
                      int64_t ldc) {
  for (int i = 0; i < M; ++i) {
    T* c = C + (int64_t)i * ldc;
    for (int k = 0; k < K; ++k) {
      const T a = A[i * sai + (int64_t)k * sak];
      const T* b = B + (int64_t)k * ldb;
      for (int j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T, int NR>
inline void gemm_cols(int M, int K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int MR = 4;
  int i = 0;
  for (; i + MR <= M; i += MR) micro<T, MR, NR>(K, A + i * sai, sai, sak, B, ldb, C + (int64_t)i * ldc, ldc);
  for (; i < M; ++i) micro<T, 1, NR>(K, A + i * sai, sai, sak, B, ldb, C + (int64_t)i * ldc, ldc);
}

#if defined(__AVX2__) && defined(__FMA__)
// float32 micro-kernel with explicit AVX2/FMA: MR rows x NV*8 columns in ymm accumulators
// (6 x 16: 12 accumulators, about 70% of the FMA peak on the 2-core Zen 3 test machine).
template <int MR, int NV>
inline void micro_f32(int K, const float* __restrict A, int64_t sai, int64_t sak, const float* __restrict B,
                      int64_t ldb, float* __restrict C, int64_t ldc) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int k = 0; k < K; ++k) {
    const float* b = B + (int64_t)k * ldb;
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = _mm256_loadu_ps(b + 8 * c);
    const float* a = A + (int64_t)k * sak;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * sai);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_fmadd_ps(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      float* cp = C + r * ldc + 8 * c;
      _mm256_storeu_ps(cp, _mm256_add_ps(_mm256_loadu_ps(cp), acc[r][c]));
    }
}

template <int NV>
inline void gemm_cols_f32(int M, int K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb, float* C,
                          int64_t ldc) {
  int i = 0;
  for (; i + 6 <= M; i += 6) micro_f32<6, NV>(K, A + i * sai, sai, sak, B, ldb, C + (int64_t)i * ldc, ldc);
  for (; i + 4 <= M; i += 4) micro_f32<4, NV>(K, A + i * sai, sai, sak, B, ldb, C + (int64_t)i * ldc, ldc);
  for (; i < M; ++i) micro_f32<1, NV>(K, A + i * sai, sai, sak, B, ldb, C + (int64_t)i * ldc, ldc);
}

inline void gemm_f32(int M, int N, int K, const float* A, int64_t sai, int64_t sak, const float* B, int64_t ldb,
                     float* C, int64_t ldc) {
  int j = 0;
  for (; j + 16 <= N; j += 16) gemm_cols_f32<2>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
  if (N - j >= 8) {
    gemm_cols_f32<1>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
    j += 8;
  }
  if (j < N) gemm_edge<float>(M, N - j, K, A, sai, sak, B + j, ldb, C + j, ldc);
}
#define LEAP_HAVE_F32_KERNEL 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
// Decode-step sweep over one (sequence, head) float32 state for one token, columns
// [0, 8*NV): S'[f] = S[f] + k~_f v and num += q~_f S'[f], f ascending. One read of S and one
// write of S' per element; v and num stay in ymm registers.
template <int NV>
inline void step_cols_f32(int F, int64_t ld, const float* __restrict Sin, float* __restrict So,
                          const float* __restrict kf, const float* __restrict qf, const float* __restrict v,
                          float* __restrict num) {
  __m256 vv[NV], nm[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    vv[c] = _mm256_loadu_ps(v + 8 * c);
    nm[c] = _mm256_setzero_ps();
  }
  for (int f = 0; f < F; ++f) {
    const __m256 kv = _mm256_broadcast_ss(kf + f), qv = _mm256_broadcast_ss(qf + f);
    float* so = So + (int64_t)f * ld;
    const float* si = Sin ? Sin + (int64_t)f * ld : nullptr;
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      const __m256 s = si ? _mm256_fmadd_ps(kv, vv[c], _mm256_loadu_ps(si + 8 * c)) : _mm256_mul_ps(kv, vv[c]);
      _mm256_storeu_ps(so + 8 * c, s);
      nm[c] = _mm256_fmadd_ps(qv, s, nm[c]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) _mm256_storeu_ps(num + 8 * c, nm[c]);
}

// The whole row width Dv (a multiple of 8) in blocks of up to 32 columns.
inline void step_rows_f32(int F, int Dv, const float* Sin, float* So, const float* kf, const float* qf,
                          const float* v, float* num) {
  int e = 0;
  for (; e + 32 <= Dv; e += 32) step_cols_f32<4>(F, Dv, Sin ? Sin + e : nullptr, So + e, kf, qf, v + e, num + e);
  for (; e < Dv; e += 8) step_cols_f32<1>(F, Dv, Sin ? Sin + e : nullptr, So + e, kf, qf, v + e, num + e);
}
#define LEAP_HAVE_F32_STEP 1
#endif

template <typename T>
void gemm(int M, int N, int K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#ifdef LEAP_HAVE_F32_KERNEL
  if constexpr (std::is_same_v<T, float>) {
    gemm_f32(M, N, K, A, sai, sak, B, ldb, C, ldc);
    return;
  }
#endif
  constexpr int NR = sizeof(T) == 4 ? 16 : 8;
  int j = 0;
  for (; j + NR <= N; j += NR) gemm_cols<T, NR>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
  if (N - j >= NR / 2) {
    gemm_cols<T, NR / 2>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
    j += NR / 2;
  }
  if (j < N) gemm_edge<T>(M, N - j, K, A, sai, sak, B + j, ldb, C + j, ldc);
}

// The intra-chunk products only need the visible part: row i of the scores sees the keys
// s < nv[i] (nv non-decreasing in i: causal and block-causal visibility is a staircase), so
// fully masked tiles are skipped. Rows go in blocks of 6 (the micro-kernel's height).
constexpr int RB = 6;

// C[i][j] += ..., for j < nv[i] at least (columns rounded up to 16, at most N)
template <typename T>
void gemm_prefix_n(int M, int N, int K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
                   int64_t ldc, const int* nv) {
  for (int i0 = 0; i0 < M; i0 += RB) {
    const int i1 = std::min(M, i0 + RB);
    const int n = std::min(N, (nv[i1 - 1] + 15) / 16 * 16);
    if (n > 0) gemm<T>(i1 - i0, n, K, A + i0 * sai, sai, sak, B, ldb, C + (int64_t)i0 * ldc, ldc);
  }
}

// row i sums over k < nv[i] only (the A entries beyond are zero)
template <typename T>
void gemm_prefix_k(int M, int N, int K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
                   int64_t ldc, const int* nv) {
  for (int i0 = 0; i0 < M; i0 += RB) {
    const int i1 = std::min(M, i0 + RB);
    const int kk = std::min(K, nv[i1 - 1]);
    if (kk > 0) gemm<T>(i1 - i0, N, kk, A + i0 * sai, sai, sak, B, ldb, C + (int64_t)i0 * ldc, ldc);
  }
}

// row i sums over k >= ks[i] only (ks non-decreasing; the A entries before are zero)
template <typename T>
void gemm_suffix_k(int M, int N, int K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
                   int64_t ldc, const int* ks) {
  for (int i0 = 0; i0 < M; i0 += RB) {
    const int i1 = std::min(M, i0 + RB);
    const int k0 = std::max(0, ks[i0]);
    if (k0 < K)
      gemm<T>(i1 - i0, N, K - k0, A + i0 * sai + (int64_t)k0 * sak, sai, sak, B + (int64_t)k0 * ldb, ldb,
              C + (int64_t)i0 * ldc, ldc);
  }
}

template <typename T>
inline void transpose(int R, int Cc, const T* src, int64_t lds, T* dst, int64_t ldd) {  // dst[c][r] = src[r][c]
  constexpr int TB = 8;  // tiles keep both sides within a few cache lines
  for (int r0 = 0; r0 < R; r0 += TB) {
    const int r1 = std::min(R, r0 + TB);
    for (int c0 = 0; c0 < Cc; c0 += TB) {
      const int c1 = std::min(Cc, c0 + TB);
      for (int c = c0; c < c1; ++c)
        for (int r = r0; r < r1; ++r) dst[(int64_t)c * ldd + r] = src[(int64_t)r * lds + c];
    }
  }
}

// Runs fn(task, scratch) for task in [0, n) on all threads; a shared counter hands tasks out
// (load balance only: each task's result does not depend on the thread that runs it).
// Calls whose whole work is below this many multiply-adds run on the calling thread: a parallel
// region costs more than it saves there (and much more on a loaded machine).
constexpr double kSerialWork = 1 << 21;
thread_local double g_call_work = 1e30;  // work estimate of the running call

template <typename Scratch, typename MakeScratch, typename Fn>
void run_tasks(int64_t n, const MakeScratch& make, const Fn& fn) {
  if (n <= 0) return;
  int nt = std::max(1, at::get_num_threads());
  if (nt == 1 || n == 1 || at::in_parallel_region() || g_call_work < kSerialWork) {
    Scratch sc = make();
    for (int64_t i = 0; i < n; ++i) fn(i, sc);
    return;
  }
  std::atomic<int64_t> next(0);
  at::parallel_for(0, std::min<int64_t>(nt, n), 1, [&](int64_t, int64_t) {
    Scratch sc = make();
    for (;;) {
      int64_t i = next.fetch_add(1);
      if (i >= n) break;
      fn(i, sc);
    }
  });
}

// ---------------------------------------------------------------------------------------
// The kernel context: sizes, flags, pointers.
// ---------------------------------------------------------------------------------------
template <typename scalar_t>
struct Leap {
  using acc_t = typename AccOf<scalar_t>::type;
  static constexpr double HALF_PI = 1.57079632679489661923;

  // sizes fit in int (checked by make_ctx); offsets and products are formed in int64_t.
  // W: the block size clamped to [0, max(T, S)] (0 = not block-causal; any block_size >= the
  // sequence length is one block), so that no caller's int64 block size is truncated.
  int B = 0, T = 0, S = 0, H = 0, Hkv = 0, G = 1, Dk = 0, Dv = 0, F = 0, N = 0;
  int64_t W = 0;
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

  // sin / cosine-half of every proportion, computed once per call (T*H + S*Hkv scalars)
  std::vector<acc_t> sqv, cqv, skv, ckv;
  const acc_t *sq_ = nullptr, *cq_ = nullptr, *sk_ = nullptr, *ck_ = nullptr;
  void prepare() {
    const int64_t nq = (int64_t)B * T * H, nk = (int64_t)B * S * Hkv;
    g_call_work = (double)B * std::max(T, S) * H * (double)F * (Dv + CH);
    sqv.resize(nq);
    cqv.resize(nq);
    skv.resize(nk);
    ckv.resize(nk);
    at::parallel_for(0, nq + nk, 1 << 15, [&](int64_t a, int64_t e) {
      for (int64_t i = a; i < e; ++i) {
        if (i < nq) sincos_p(pq[i], sqv[i], cqv[i]);
        else sincos_p(pk[i - nq], skv[i - nq], ckv[i - nq]);
      }
    });
    sq_ = sqv.data();
    cq_ = cqv.data();
    sk_ = skv.data();
    ck_ = ckv.data();
  }

  struct Item {
    int b, n, qo, ko, Tn, Sn, NK;
  };

  Item item(int n) const {
    Item it;
    it.n = n;
    if (cu) {
      it.b = 0;
      it.qo = it.ko = (int)cu[n];
      it.Tn = it.Sn = (int)(cu[n + 1] - cu[n]);
    } else {
      it.b = n;
      it.qo = it.ko = 0;
      it.Tn = T;
      it.Sn = S;
    }
    it.NK = (it.Sn + CH - 1) / CH;
    return it;
  }

  int lim(const Item& it, int t) const {
    if (nvk) return (int)nvk[(int64_t)it.b * T + t];  // in [0, S] (check_visible_keys)
    if (!causal) return it.Sn;
    if (W <= 0) return t + 1;
    const int64_t e = ((int64_t)t / W + 1) * W;  // W <= max(T, S): no overflow
    return (int)std::min<int64_t>(e, it.Sn);
  }
  int group_of(const Item& it, int t) const {
    int l = lim(it, t);
    return l >= it.Sn ? it.NK : l / CH;
  }
  // gb[j] = first query of group j (j = 0..NK), gb[NK+1] = Tn
  void groups(const Item& it, std::vector<int>& gb) const {
    gb.assign(it.NK + 2, it.Tn);
    int t = 0;
    for (int j = 0; j <= it.NK; ++j) {
      while (t < it.Tn && group_of(it, t) < j) ++t;
      gb[j] = t;
    }
  }

  // ---------------- scratch ----------------
  struct Scratch {
    // keys of one chunk
    std::vector<acc_t> Kb, KbT, sk, ck, Kf, V, VT, msk;
    int nk = 0;
    // queries of one sub-block
    std::vector<acc_t> Qa, sq, cq, Qf, num, den, P, A, E, dA, dn, dd, g, da, dth;
    std::vector<int> nv, ks;
    // states
    std::vector<acc_t> S, z, dS, dz, ST;
    // key gradients of one chunk
    std::vector<acc_t> dKf, dvv, db, dthk;
    std::vector<int> gb;
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
    s.ks.resize(CH);
    s.S.resize((size_t)F * Dv);
    s.z.resize(F);
    s.dS.resize((size_t)F * Dv);
    s.dz.resize(F);
    s.ST.resize((size_t)Dv * F);
    s.dKf.resize((size_t)CH * F);
    s.dvv.resize((size_t)CH * Dv);
    s.db.resize((size_t)CH * Dk);
    s.dthk.resize(CH);
    return s;
  }



  // ---------------- feature builders ----------------
  void load_keys(const Item& it, int h, int j, Scratch& sc) const {
    const int hk = h / G;
    const int s0 = j * CH;
    const int nk = std::min(CH, it.Sn - s0);
    sc.nk = nk;
    for (int s = 0; s < nk; ++s) {
      const int64_t gs = (int64_t)it.b * S + it.ko + s0 + s;
      // a padded key is selected to 0 where loaded (k, pk and v: NaN or Inf there reach nothing)
      const bool pad = kpm && kpm[gs];
      const acc_t sn = pad ? acc_t(0) : sk_[gs * Hkv + hk], cs = pad ? acc_t(0) : ck_[gs * Hkv + hk];
      sc.sk[s] = sn;
      sc.ck[s] = cs;
      sc.msk[s] = pad ? acc_t(0) : acc_t(1);
      const scalar_t* kr = k + (gs * Hkv + hk) * Dk;
      acc_t* kb = sc.Kb.data() + (int64_t)s * Dk;
      acc_t* kf = sc.Kf.data() + (int64_t)s * F;
      for (int d = 0; d < Dk; ++d) {
        const acc_t x = pad ? acc_t(0) : relu(static_cast<acc_t>(kr[d]));
        kb[d] = x;
        kf[d] = x * sn;
        kf[Dk + d] = x * cs;
      }
      const scalar_t* vr = v + (gs * Hkv + hk) * Dv;
      acc_t* vv = sc.V.data() + (int64_t)s * Dv;
      for (int e = 0; e < Dv; ++e) vv[e] = pad ? acc_t(0) : static_cast<acc_t>(vr[e]);
    }
    transpose(nk, Dk, sc.Kb.data(), Dk, sc.KbT.data(), CH);
    transpose(nk, Dv, sc.V.data(), Dv, sc.VT.data(), CH);
  }

  void load_queries(const Item& it, int h, int t0, int nq, Scratch& sc) const {
    for (int i = 0; i < nq; ++i) {
      const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
      const acc_t sn = sq_[gt * H + h], cs = cq_[gt * H + h];
      sc.sq[i] = sn;
      sc.cq[i] = cs;
      const scalar_t* qr = q + (gt * H + h) * Dk;
      acc_t* qa = sc.Qa.data() + (int64_t)i * Dk;
      acc_t* qf = sc.Qf.data() + (int64_t)i * F;
      for (int d = 0; d < Dk; ++d) {
        const acc_t x = relu(static_cast<acc_t>(qr[d]));
        qa[d] = x;
        qf[d] = x * sn;
        qf[Dk + d] = x * cs;
      }
    }
  }

  // dS = Kf^T V, dz = sum_s Kf_s over the loaded key chunk (zero first)
  void chunk_state(const Scratch& sc, acc_t* dS, acc_t* dz) const {
    std::fill(dS, dS + (size_t)F * Dv, acc_t(0));
    gemm<acc_t>(F, Dv, sc.nk, sc.Kf.data(), 1, F, sc.V.data(), Dv, dS, Dv);
    for (int f = 0; f < F; ++f) dz[f] = 0;
    for (int s = 0; s < sc.nk; ++s) {
      const acc_t* kf = sc.Kf.data() + (int64_t)s * F;
      for (int f = 0; f < F; ++f) dz[f] += kf[f];
    }
  }

  // num, den of queries [t0, t0+nq) of group j from state (S, z) and, for j < NK, the
  // visible part of the loaded key chunk j; leaves P (raw scores) in sc.P, A in sc.A.
  void attend(const Item& it, int j, int t0, int nq, const acc_t* S_, const acc_t* z_, Scratch& sc) const {
    std::fill(sc.num.begin(), sc.num.begin() + (size_t)nq * Dv, acc_t(0));
    gemm<acc_t>(nq, Dv, F, sc.Qf.data(), F, 1, S_, Dv, sc.num.data(), Dv);
    for (int i = 0; i < nq; ++i) {
      const acc_t* qf = sc.Qf.data() + (int64_t)i * F;
      acc_t d = 0;
      for (int f = 0; f < F; ++f) d += qf[f] * z_[f];
      sc.den[i] = d;
    }
    if (j >= it.NK) return;
    const int nk = sc.nk;
    for (int i = 0; i < nq; ++i) sc.nv[i] = std::max(0, std::min(nk, lim(it, t0 + i) - j * CH));
    std::fill(sc.P.begin(), sc.P.begin() + (size_t)nq * CH, acc_t(0));
    gemm_prefix_n<acc_t>(nq, nk, Dk, sc.Qa.data(), Dk, 1, sc.KbT.data(), CH, sc.P.data(), CH, sc.nv.data());
    for (int i = 0; i < nq; ++i) {
      const int n_vis = sc.nv[i];
      const acc_t* p = sc.P.data() + (int64_t)i * CH;
      acc_t* a = sc.A.data() + (int64_t)i * CH;
      const acc_t sn = sc.sq[i], cs = sc.cq[i];
      acc_t rs = 0;
      for (int s = 0; s < nk; ++s) {
        const acc_t val = s < n_vis ? p[s] * (sn * sc.sk[s] + cs * sc.ck[s]) : acc_t(0);
        a[s] = val;
        rs += val;
      }
      sc.den[i] += rs;
    }
    gemm_prefix_k<acc_t>(nq, Dv, nk, sc.A.data(), CH, 1, sc.V.data(), Dv, sc.num.data(), Dv, sc.nv.data());
  }

  void out_group(const Item& it, int h, int j, int ta, int tb, const acc_t* S_, const acc_t* z_, Scratch& sc,
                 scalar_t* o) const {
    for (int t0 = ta; t0 < tb; t0 += QB) {
      const int nq = std::min(QB, tb - t0);
      load_queries(it, h, t0, nq, sc);
      attend(it, j, t0, nq, S_, z_, sc);
      for (int i = 0; i < nq; ++i) {
        const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
        scalar_t* orow = o + (gt * H + h) * Dv;
        const acc_t* nm = sc.num.data() + (int64_t)i * Dv;
        if (normalize) {
          const acc_t dd = std::max(sc.den[i], eps);
          for (int e = 0; e < Dv; ++e) orow[e] = static_cast<scalar_t>(nm[e] / dd);
        } else {
          for (int e = 0; e < Dv; ++e) orow[e] = static_cast<scalar_t>(nm[e]);
        }
      }
    }
  }

  // ---------------- backward pieces ----------------
  // Workspace of dL/dnum (Dv) and dL/dden per query: index ((b*H + h)*T + t).
  // Queries of group j: recompute num/den, store dnum/dden, write dq and dpq.
  void bwd_q_group(const Item& it, int h, int j, int ta, int tb, const acc_t* S_, const acc_t* z_,
                   const acc_t* ST, Scratch& sc, const scalar_t* dout, acc_t* wdn, acc_t* wdd, scalar_t* dq,
                   acc_t* dpq) const {
    for (int t0 = ta; t0 < tb; t0 += QB) {
      const int nq = std::min(QB, tb - t0);
      load_queries(it, h, t0, nq, sc);
      attend(it, j, t0, nq, S_, z_, sc);
      for (int i = 0; i < nq; ++i) {
        const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
        const scalar_t* dor = dout + (gt * H + h) * Dv;
        const acc_t* nm = sc.num.data() + (int64_t)i * Dv;
        acc_t* dn = sc.dn.data() + (int64_t)i * Dv;
        acc_t ddv = 0;
        if (normalize) {
          const acc_t den = sc.den[i];
          const acc_t dd = std::max(den, eps);
          acc_t dot = 0;
          for (int e = 0; e < Dv; ++e) {
            const acc_t g = static_cast<acc_t>(dor[e]);
            dn[e] = g / dd;
            dot += g * (nm[e] / dd);
          }
          ddv = den >= eps ? -dot / dd : acc_t(0);
        } else {
          for (int e = 0; e < Dv; ++e) dn[e] = static_cast<acc_t>(dor[e]);
        }
        sc.dd[i] = ddv;
        const int64_t w = ((int64_t)it.b * H + h) * T + it.qo + t0 + i;
        std::memcpy(wdn + w * Dv, dn, sizeof(acc_t) * Dv);
        wdd[w] = ddv;
      }
      // inter: g = dn S^T + dd z^T  (nq x F)
      std::fill(sc.g.begin(), sc.g.begin() + (size_t)nq * F, acc_t(0));
      gemm<acc_t>(nq, F, Dv, sc.dn.data(), Dv, 1, ST, F, sc.g.data(), F);
      for (int i = 0; i < nq; ++i) {
        acc_t* g = sc.g.data() + (int64_t)i * F;
        const acc_t ddv = sc.dd[i];
        for (int f = 0; f < F; ++f) g[f] += ddv * z_[f];
        const acc_t* qa = sc.Qa.data() + (int64_t)i * Dk;
        acc_t* da = sc.da.data() + (int64_t)i * Dk;
        const acc_t sn = sc.sq[i], cs = sc.cq[i];
        acc_t th = 0;
        for (int d = 0; d < Dk; ++d) {
          da[d] = g[d] * sn + g[Dk + d] * cs;
          th += qa[d] * (g[d] * cs - g[Dk + d] * sn);
        }
        sc.dth[i] = th;
      }
      if (j < it.NK) {
        const int nk = sc.nk;
        std::fill(sc.dA.begin(), sc.dA.begin() + (size_t)nq * CH, acc_t(0));
        gemm_prefix_n<acc_t>(nq, nk, Dv, sc.dn.data(), Dv, 1, sc.VT.data(), CH, sc.dA.data(), CH, sc.nv.data());
        for (int i = 0; i < nq; ++i) {
          acc_t* dA = sc.dA.data() + (int64_t)i * CH;
          acc_t* E = sc.E.data() + (int64_t)i * CH;
          const acc_t* p = sc.P.data() + (int64_t)i * CH;
          const int n_vis = sc.nv[i];
          const acc_t sn = sc.sq[i], cs = sc.cq[i], ddv = sc.dd[i];
          acc_t th = 0;
          for (int s = 0; s < nk; ++s) {
            const acc_t dav = s < n_vis ? dA[s] + ddv : acc_t(0);
            dA[s] = dav;
            E[s] = dav * (sn * sc.sk[s] + cs * sc.ck[s]);
            th -= dav * p[s] * (sn * sc.ck[s] - cs * sc.sk[s]);
          }
          sc.dth[i] += th;
        }
        gemm_prefix_k<acc_t>(nq, Dk, nk, sc.E.data(), CH, 1, sc.Kb.data(), Dk, sc.da.data(), Dk, sc.nv.data());
      }
      for (int i = 0; i < nq; ++i) {
        const int64_t gt = (int64_t)it.b * T + it.qo + t0 + i;
        const scalar_t* qr = q + (gt * H + h) * Dk;
        scalar_t* dqr = dq + (gt * H + h) * Dk;
        const acc_t* da = sc.da.data() + (int64_t)i * Dk;
        for (int d = 0; d < Dk; ++d)
          dqr[d] = static_cast<scalar_t>(static_cast<acc_t>(qr[d]) > acc_t(0) ? da[d] : acc_t(0));
        dpq[gt * H + h] = acc_t(HALF_PI) * sc.dth[i];
      }
    }
  }

  void load_dn(const Item& it, int h, int t0, int nq, Scratch& sc, const acc_t* wdn, const acc_t* wdd) const {
    const int64_t w = ((int64_t)it.b * H + h) * T + it.qo + t0;
    std::memcpy(sc.dn.data(), wdn + w * Dv, sizeof(acc_t) * (size_t)nq * Dv);
    std::memcpy(sc.dd.data(), wdd + w, sizeof(acc_t) * (size_t)nq);
  }

  // dS_j = sum over group-j queries of q~ dnum^T, dz_j = sum q~ dden (zero first)
  void group_dstate(const Item& it, int h, int ta, int tb, Scratch& sc, const acc_t* wdn, const acc_t* wdd,
                    acc_t* dS, acc_t* dz) const {
    std::fill(dS, dS + (size_t)F * Dv, acc_t(0));
    for (int f = 0; f < F; ++f) dz[f] = 0;
    for (int t0 = ta; t0 < tb; t0 += QB) {
      const int nq = std::min(QB, tb - t0);
      load_queries(it, h, t0, nq, sc);
      load_dn(it, h, t0, nq, sc, wdn, wdd);
      gemm<acc_t>(F, Dv, nq, sc.Qf.data(), 1, F, sc.dn.data(), Dv, dS, Dv);
      for (int i = 0; i < nq; ++i) {
        const acc_t* qf = sc.Qf.data() + (int64_t)i * F;
        const acc_t ddv = sc.dd[i];
        for (int f = 0; f < F; ++f) dz[f] += qf[f] * ddv;
      }
    }
  }

  // Gradients of the keys / values of the loaded chunk j, from the state gradient (dSt, dzt:
  // everything that sees the whole chunk) and the group-j queries (partial visibility).
  // Writes per query head: dkh [B, S, H, Dk], dvh [B, S, H, Dv], dpkh [B, S, H].
  void kv_chunk(const Item& it, int h, int j, int ta, int tb, const acc_t* dSt, const acc_t* dzt,
                const acc_t* dStT, Scratch& sc, const acc_t* wdn, const acc_t* wdd, acc_t* dkh, acc_t* dvh,
                acc_t* dpkh) const {
    const int nk = sc.nk;
    std::fill(sc.dKf.begin(), sc.dKf.begin() + (size_t)nk * F, acc_t(0));
    gemm<acc_t>(nk, F, Dv, sc.V.data(), Dv, 1, dStT, F, sc.dKf.data(), F);
    std::fill(sc.dvv.begin(), sc.dvv.begin() + (size_t)nk * Dv, acc_t(0));
    gemm<acc_t>(nk, Dv, F, sc.Kf.data(), F, 1, dSt, Dv, sc.dvv.data(), Dv);
    for (int s = 0; s < nk; ++s) {
      acc_t* g = sc.dKf.data() + (int64_t)s * F;
      for (int f = 0; f < F; ++f) g[f] += dzt[f];
      const acc_t* kb = sc.Kb.data() + (int64_t)s * Dk;
      acc_t* db = sc.db.data() + (int64_t)s * Dk;
      const acc_t sn = sc.sk[s], cs = sc.ck[s];
      acc_t th = 0;
      for (int d = 0; d < Dk; ++d) {
        db[d] = g[d] * sn + g[Dk + d] * cs;
        th += kb[d] * (g[d] * cs - g[Dk + d] * sn);
      }
      sc.dthk[s] = th;
    }
    for (int t0 = ta; t0 < tb; t0 += QB) {
      const int nq = std::min(QB, tb - t0);
      load_queries(it, h, t0, nq, sc);
      load_dn(it, h, t0, nq, sc, wdn, wdd);
      for (int i = 0; i < nq; ++i) sc.nv[i] = std::max(0, std::min(nk, lim(it, t0 + i) - j * CH));
      for (int s = 0, i = 0; s < nk; ++s) {  // first query that sees key s
        while (i < nq && sc.nv[i] <= s) ++i;
        sc.ks[s] = i;
      }
      std::fill(sc.P.begin(), sc.P.begin() + (size_t)nq * CH, acc_t(0));
      gemm_prefix_n<acc_t>(nq, nk, Dk, sc.Qa.data(), Dk, 1, sc.KbT.data(), CH, sc.P.data(), CH, sc.nv.data());
      std::fill(sc.dA.begin(), sc.dA.begin() + (size_t)nq * CH, acc_t(0));
      gemm_prefix_n<acc_t>(nq, nk, Dv, sc.dn.data(), Dv, 1, sc.VT.data(), CH, sc.dA.data(), CH, sc.nv.data());
      for (int i = 0; i < nq; ++i) {
        const int n_vis = sc.nv[i];
        const acc_t* p = sc.P.data() + (int64_t)i * CH;
        acc_t* a = sc.A.data() + (int64_t)i * CH;
        acc_t* dA = sc.dA.data() + (int64_t)i * CH;
        acc_t* E = sc.E.data() + (int64_t)i * CH;
        const acc_t sn = sc.sq[i], cs = sc.cq[i], ddv = sc.dd[i];
        for (int s = 0; s < nk; ++s) {
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
      for (int s = 0; s < nk; ++s) {
        acc_t th = 0;
        for (int i = 0; i < nq; ++i) th += sc.dA[(int64_t)i * CH + s];
        sc.dthk[s] += th;
      }
    }
    for (int s = 0; s < nk; ++s) {
      const int64_t gs = (int64_t)it.b * S + it.ko + j * CH + s;
      const int64_t row = gs * H + h;
      const int hk = h / G;
      const scalar_t* kr = k + (gs * Hkv + hk) * Dk;
      const bool keep = sc.msk[s] != acc_t(0);
      const acc_t* db = sc.db.data() + (int64_t)s * Dk;
      acc_t* dkr = dkh + row * Dk;
      for (int d = 0; d < Dk; ++d) dkr[d] = keep && static_cast<acc_t>(kr[d]) > acc_t(0) ? db[d] : acc_t(0);
      const acc_t* dvs = sc.dvv.data() + (int64_t)s * Dv;
      acc_t* dvr = dvh + row * Dv;
      for (int e = 0; e < Dv; ++e) dvr[e] = keep ? dvs[e] : acc_t(0);  // exactly 0 for a padded key
      dpkh[row] = keep ? acc_t(HALF_PI) * sc.dthk[s] : acc_t(0);
    }
  }

  // ---------------- drivers ----------------
  bool use_chunks(int items) const {
    if (g_mode == 1) return false;
    if (g_mode == 2) return true;
    const int nt = at::get_num_threads();
    if (nt <= 1) return false;
    int64_t total = 0, mx = 0;
    for (int n = 0; n < N; ++n) {
      const Item it = item(n);
      total += (int64_t)(it.NK + 1) * H;
      mx = std::max<int64_t>(mx, it.NK + 1);
    }
    (void)items;
    // across chunks only when one (sequence, head) would dominate the makespan: fewer items than
    // threads, or one sequence much longer than an even share (the chunk driver costs extra passes)
    return mx * 4 * nt > 5 * total && mx >= 4;
  }

  const acc_t* state_ptr(const acc_t* base, int n, int h) const {
    return base ? base + ((int64_t)n * H + h) * F * Dv : nullptr;
  }
  const acc_t* zstate_ptr(const acc_t* base, int n, int h) const {
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
    for (int f = 0; f < F; ++f) z_[f] = z_[f] + dz[f];
  }

  // ---------------- across-chunks layout ----------------
  // One (S, z) slot per chunk boundary j = 0..NK of every (sequence, head) item.
  struct ChunkTable {
    std::vector<int64_t> off;                   // first slot of item idx; off[items] = all slots
    std::vector<std::pair<int64_t, int>> tasks;  // (item, j) for j = 0..NK
    std::vector<std::vector<int>> gbs;       // query group boundaries per sequence (same for every head)
    int64_t slot = 0;                           // F * Dv + F values per slot
  };
  ChunkTable chunk_table() const {
    const int64_t items = (int64_t)N * H;
    ChunkTable tb;
    tb.off.assign(items + 1, 0);
    tb.gbs.resize(N);
    for (int n = 0; n < N; ++n) {
      const Item it = item(n);
      groups(it, tb.gbs[n]);
      for (int h = 0; h < H; ++h) {
        const int64_t idx = (int64_t)n * H + h;
        tb.off[idx + 1] = tb.off[idx] + it.NK + 1;
        for (int j = 0; j <= it.NK; ++j) tb.tasks.emplace_back(idx, j);
      }
    }
    tb.slot = (int64_t)F * Dv + F;
    return tb;
  }
  // X slot j of item idx <- S0 + the states of chunks < j (chunk-local states in parallel over
  // all (item, chunk) tasks, then a prefix per item).
  void prefix_states(const ChunkTable& tb, std::vector<acc_t>& X, const acc_t* S0, const acc_t* z0) const {
    auto XS = [&](int64_t idx, int j) { return X.data() + (tb.off[idx] + j) * tb.slot; };
    auto Xz = [&](int64_t idx, int j) { return X.data() + (tb.off[idx] + j) * tb.slot + (int64_t)F * Dv; };
    run_tasks<Scratch>((int64_t)tb.tasks.size(), [&] { return make_scratch(); }, [&](int64_t ti, Scratch& sc) {
      const int64_t idx = tb.tasks[ti].first;
      const int j = tb.tasks[ti].second;
      const Item it = item(idx / H);
      if (j >= it.NK) return;
      load_keys(it, idx % H, j, sc);
      chunk_state(sc, XS(idx, j + 1), Xz(idx, j + 1));
    });
    run_tasks<int>((int64_t)N * H, [] { return 0; }, [&](int64_t idx, int&) {
      const int n = (int)(idx / H), h = (int)(idx % H);
      const Item it = item(n);
      init_state(XS(idx, 0), Xz(idx, 0), state_ptr(S0, n, h), zstate_ptr(z0, n, h));
      for (int j = 1; j <= it.NK; ++j) add_state(XS(idx, j), Xz(idx, j), XS(idx, j - 1), Xz(idx, j - 1));
    });
  }

  void forward(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const {
    const int64_t items = (int64_t)N * H;
    if (!use_chunks(items)) {
      run_tasks<Scratch>(items, [&] { return make_scratch(); }, [&](int64_t idx, Scratch& sc) {
        const int n = (int)(idx / H), h = (int)(idx % H);
        const Item it = item(n);
        groups(it, sc.gb);
        init_state(sc.S.data(), sc.z.data(), state_ptr(S0, n, h), zstate_ptr(z0, n, h));
        for (int j = 0; j <= it.NK; ++j) {
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
    const std::vector<std::pair<int64_t, int>>& tasks = tb.tasks;
    const std::vector<std::vector<int>>& gbs = tb.gbs;
    const int64_t slot = tb.slot;
    std::vector<acc_t> X((size_t)off[items] * slot);
    auto XS = [&](int64_t idx, int j) { return X.data() + (off[idx] + j) * slot; };
    auto Xz = [&](int64_t idx, int j) { return X.data() + (off[idx] + j) * slot + (int64_t)F * Dv; };
    // phases 1-2: chunk-local states, then the prefix over them
    prefix_states(tb, X, S0, z0);
    if (Sout) {
      for (int64_t idx = 0; idx < items; ++idx) {
        const int n = idx / H, h = idx % H, NK = item(n).NK;
        std::memcpy(Sout + ((int64_t)n * H + h) * F * Dv, XS(idx, NK), sizeof(acc_t) * (size_t)F * Dv);
        std::memcpy(zout + ((int64_t)n * H + h) * F, Xz(idx, NK), sizeof(acc_t) * F);
      }
    }
    // phase 3: outputs
    run_tasks<Scratch>((int64_t)tasks.size(), [&] { return make_scratch(); }, [&](int64_t ti, Scratch& sc) {
      const int64_t idx = tasks[ti].first;
      const int j = tasks[ti].second;
      const int h = idx % H;
      const Item it = item(idx / H);
      const std::vector<int>& gbv = gbs[idx / H];
      if (gbv[j] >= gbv[j + 1]) return;
      if (j < it.NK) load_keys(it, h, j, sc);
      out_group(it, h, j, gbv[j], gbv[j + 1], XS(idx, j), Xz(idx, j), sc, o);
    });
  }

  void backward(const scalar_t* dout, const acc_t* dSin, const acc_t* dzin, const acc_t* S0, const acc_t* z0,
                scalar_t* dq, acc_t* dpq, acc_t* dkh, acc_t* dvh, acc_t* dpkh, acc_t* dS0, acc_t* dz0) const {
    const int64_t items = (int64_t)N * H;
    std::vector<acc_t> wdn((size_t)B * H * T * Dv), wdd((size_t)B * H * T);
    if (!use_chunks(items)) {
      run_tasks<Scratch>(items, [&] { return make_scratch(); }, [&](int64_t idx, Scratch& sc) {
        const int n = (int)(idx / H), h = (int)(idx % H);
        const Item it = item(n);
        groups(it, sc.gb);
        init_state(sc.S.data(), sc.z.data(), state_ptr(S0, n, h), zstate_ptr(z0, n, h));
        for (int j = 0; j <= it.NK; ++j) {
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
        for (int j = it.NK; j >= 0; --j) {
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
    const std::vector<std::pair<int64_t, int>>& tasks = tb.tasks;
    const std::vector<std::vector<int>>& gbs = tb.gbs;
    const int64_t slot = tb.slot;
    std::vector<acc_t> X((size_t)off[items] * slot), Y((size_t)off[items] * slot);
    auto XS = [&](int64_t idx, int j) { return X.data() + (off[idx] + j) * slot; };
    auto Xz = [&](int64_t idx, int j) { return X.data() + (off[idx] + j) * slot + (int64_t)F * Dv; };
    auto YS = [&](int64_t idx, int j) { return Y.data() + (off[idx] + j) * slot; };
    auto Yz = [&](int64_t idx, int j) { return Y.data() + (off[idx] + j) * slot + (int64_t)F * Dv; };
    auto mk = [&] { return make_scratch(); };
    const int64_t nt = (int64_t)tasks.size();
    prefix_states(tb, X, S0, z0);  // recomputed, as in the forward
    run_tasks<Scratch>(nt, mk, [&](int64_t ti, Scratch& sc) {
      const int64_t idx = tasks[ti].first;
      const int j = tasks[ti].second;
      const int h = idx % H;
      const Item it = item(idx / H);
      const std::vector<int>& gbv = gbs[idx / H];
      if (gbv[j] >= gbv[j + 1]) return;
      if (j < it.NK) load_keys(it, h, j, sc);
      transpose(F, Dv, XS(idx, j), Dv, sc.ST.data(), F);
      bwd_q_group(it, h, j, gbv[j], gbv[j + 1], XS(idx, j), Xz(idx, j), sc.ST.data(), sc, dout, wdn.data(),
                  wdd.data(), dq, dpq);
    });
    run_tasks<Scratch>(nt, mk, [&](int64_t ti, Scratch& sc) {
      const int64_t idx = tasks[ti].first;
      const int j = tasks[ti].second;
      const Item it = item(idx / H);
      const std::vector<int>& gbv = gbs[idx / H];
      group_dstate(it, idx % H, gbv[j], gbv[j + 1], sc, wdn.data(), wdd.data(), YS(idx, j), Yz(idx, j));
    });
    // suffix: Y[j] <- dS_in + sum_{j' > j} dS_{j'}; the state gradient dS0 = that plus dS_0
    run_tasks<Scratch>(items, mk, [&](int64_t idx, Scratch& sc) {
      const int n = (int)(idx / H), h = (int)(idx % H);
      const Item it = item(n);
      acc_t* r = sc.S.data();
      acc_t* rz = sc.z.data();
      init_state(r, rz, state_ptr(dSin, n, h), zstate_ptr(dzin, n, h));
      for (int j = it.NK; j >= 0; --j) {
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
    run_tasks<Scratch>(nt, mk, [&](int64_t ti, Scratch& sc) {
      const int64_t idx = tasks[ti].first;
      const int j = tasks[ti].second;
      const int h = idx % H;
      const Item it = item(idx / H);
      if (j >= it.NK) return;
      const std::vector<int>& gbv = gbs[idx / H];
      load_keys(it, h, j, sc);
      transpose(F, Dv, YS(idx, j), Dv, sc.ST.data(), F);
      kv_chunk(it, h, j, gbv[j], gbv[j + 1], YS(idx, j), Yz(idx, j), sc.ST.data(), sc, wdn.data(), wdd.data(),
               dkh, dvh, dpkh);
    });
  }

  // Decode step: t new tokens, causal among them, on top of (S0, z0); one sweep over the state.
  void step(const acc_t* S0, const acc_t* z0, scalar_t* o, acc_t* Sout, acc_t* zout) const {
    const int64_t items = (int64_t)B * H;
    g_call_work = 4.0 * B * H * (double)F * Dv * (T + 1);  // memory-bound: weigh bytes
    const int t = T;
    auto mk = [&] {
      std::vector<acc_t> buf((size_t)t * (2 * F + 2 * Dv + 1));
      return buf;
    };
    run_tasks<std::vector<acc_t>>(items, mk, [&](int64_t idx, std::vector<acc_t>& buf) {
      const int b = (int)(idx / H), h = (int)(idx % H), hk = h / G;
      acc_t* qf = buf.data();
      acc_t* kf = qf + (size_t)t * F;
      acc_t* vv = kf + (size_t)t * F;
      acc_t* num = vv + (size_t)t * Dv;
      acc_t* den = num + (size_t)t * Dv;
      for (int i = 0; i < t; ++i) {
        const int64_t gt = (int64_t)b * T + i;
        acc_t sn, cs;
        sincos_p(pq[gt * H + h], sn, cs);
        const scalar_t* qr = q + (gt * H + h) * Dk;
        for (int d = 0; d < Dk; ++d) {
          const acc_t x = relu(static_cast<acc_t>(qr[d]));
          qf[(int64_t)i * F + d] = x * sn;
          qf[(int64_t)i * F + Dk + d] = x * cs;
        }
        sincos_p(pk[gt * Hkv + hk], sn, cs);
        const scalar_t* kr = k + (gt * Hkv + hk) * Dk;
        for (int d = 0; d < Dk; ++d) {
          const acc_t x = relu(static_cast<acc_t>(kr[d]));
          kf[(int64_t)i * F + d] = x * sn;
          kf[(int64_t)i * F + Dk + d] = x * cs;
        }
        const scalar_t* vr = v + (gt * Hkv + hk) * Dv;
        for (int e = 0; e < Dv; ++e) vv[(int64_t)i * Dv + e] = static_cast<acc_t>(vr[e]);
        den[i] = 0;
      }
      std::fill(num, num + (size_t)t * Dv, acc_t(0));
      const acc_t* Sin = S0 ? S0 + idx * F * Dv : nullptr;
      const acc_t* zin = z0 ? z0 + idx * F : nullptr;
      acc_t* So = Sout + idx * F * Dv;
      acc_t* zo = zout + idx * F;
      bool swept = false;
#ifdef LEAP_HAVE_F32_STEP
      if constexpr (std::is_same_v<acc_t, float>) {
        if (t == 1 && Dv % 8 == 0) {  // one token: the vectorised sweep, then z and den
          step_rows_f32(F, Dv, Sin, So, kf, qf, vv, num);
          acc_t dn = 0;
          for (int f = 0; f < F; ++f) {
            const acc_t zf = (zin ? zin[f] : acc_t(0)) + kf[f];
            zo[f] = zf;
            dn += qf[f] * zf;
          }
          den[0] = dn;
          swept = true;
        }
      }
#endif
      if (!swept) {  // general t (and float64, or Dv not a multiple of 8): scalar rows
        for (int f = 0; f < F; ++f) {
          acc_t* srow = So + (int64_t)f * Dv;
          if (Sin) std::memcpy(srow, Sin + (int64_t)f * Dv, sizeof(acc_t) * Dv);
          else std::fill(srow, srow + Dv, acc_t(0));
          acc_t zf = zin ? zin[f] : acc_t(0);
          for (int i = 0; i < t; ++i) {
            const acc_t kv = kf[(int64_t)i * F + f], qv = qf[(int64_t)i * F + f];
            const acc_t* vr = vv + (int64_t)i * Dv;
            acc_t* nm = num + (int64_t)i * Dv;
            for (int e = 0; e < Dv; ++e) {
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
      for (int i = 0; i < t; ++i) {
        const int64_t gt = (int64_t)b * T + i;
        scalar_t* orow = o + (gt * H + h) * Dv;
        const acc_t dd = normalize ? std::max(den[i], eps) : acc_t(1);
        for (int e = 0; e < Dv; ++e)
          orow[e] = static_cast<scalar_t>(normalize ? num[(int64_t)i * Dv + e] / dd : num[(int64_t)i * Dv + e]);
      }
    });
  }
};

// ---------------------------------------------------------------------------------------
// Python bindings. Every entry point writes into output tensors that the caller allocated
// (attention/cpu.py, with torch.empty) and checks them (CPU, contiguous, exact shape and dtype,
// no alias of an input); none allocates an output itself. Every element of an output is
// written (the tests poison fresh buffers with NaN to prove it).
// ---------------------------------------------------------------------------------------
using OptT = c10::optional<at::Tensor>;

inline bool has(const OptT& t) { return t.has_value() && t->defined(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq,
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
void check_cu_seqlens(const at::Tensor& cu, int64_t B, int64_t T, int64_t S) {
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
void check_visible_keys(const at::Tensor& n, int64_t B, int64_t T, int64_t S, bool causal, bool varlen,
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
void check_opt(const OptT& t, const char* name, at::ScalarType dt, int64_t numel, bool contiguous = true) {
  if (!has(t)) return;
  TORCH_CHECK(t->device().is_cpu() && (t->is_contiguous() || !contiguous) && t->scalar_type() == dt, name,
              ": a contiguous CPU tensor in the state dtype");
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " elements, expected ", numel);
}

int64_t num_seqs(const at::Tensor& q, const at::Tensor& k, const OptT& cu) {
  if (!has(cu)) return q.size(0);
  check_cu_seqlens(*cu, q.size(0), q.size(1), k.size(1));
  return cu->numel() - 1;
}

void check_states(const at::Tensor& q, const at::Tensor& v, int64_t n, const OptT& S0, const OptT& z0,
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

template <typename scalar_t>
Leap<scalar_t> make_ctx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq,
                        const at::Tensor& pk, const OptT& kpm, const OptT& cu, const OptT& nvk, bool causal,
                        int64_t block_size, double eps, bool normalize) {
  Leap<scalar_t> L;
  L.B = (int)q.size(0);
  L.T = (int)q.size(1);
  L.H = (int)q.size(2);
  L.Dk = (int)q.size(3);
  L.S = (int)k.size(1);
  L.Hkv = (int)k.size(2);
  L.Dv = (int)v.size(3);
  L.G = L.H / L.Hkv;
  L.F = 2 * L.Dk;
  // any block_size >= the longest sequence is one block: clamp (64-bit, never truncated)
  L.W = block_size <= 0 ? 0 : std::min<int64_t>(block_size, std::max<int64_t>({L.T, L.S, 1}));
  L.causal = causal;
  L.normalize = normalize;
  using acc_ty = typename Leap<scalar_t>::acc_t;
  // at least the smallest normal number (as _validate.effective_eps): eps=0 gives 0, not 0/0
  L.eps = std::max(static_cast<acc_ty>(eps), std::numeric_limits<acc_ty>::min());
  L.q = q.data_ptr<scalar_t>();
  L.k = k.data_ptr<scalar_t>();
  L.v = v.data_ptr<scalar_t>();
  using acc_t = typename Leap<scalar_t>::acc_t;
  L.pq = pq.data_ptr<acc_t>();
  L.pk = pk.data_ptr<acc_t>();
  if (has(kpm)) L.kpm = kpm->data_ptr<bool>();  // checked by check_states
  if (has(nvk)) L.nvk = nvk->data_ptr<int64_t>();  // checked by check_visible_keys
  if (has(cu)) {  // checked by num_seqs
    L.cu = cu->data_ptr<int64_t>();
    L.N = (int)(cu->numel() - 1);
  } else {
    L.N = L.B;
  }
  return L;
}

template <typename T>
const T* opt_ptr(const OptT& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}
template <typename T>
T* opt_out(const OptT& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}

// An output buffer allocated by the caller (attention/cpu.py, with torch.empty: under the tests
// those come NaN-filled, so an element a kernel forgets to write shows up): a contiguous CPU
// tensor of exactly this shape and dtype, not overlapping an input. Every element is written.
void check_out(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape,
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

// fwd(q, k, v, pq, pk, S0, z0, kpm, cu, nvk, causal, block_size, eps, normalize, o, S, z): writes o
// [B, T, H, Dv] (q's dtype) and, when S and z are given (output_final_state), the final states S
// [N, H, 2*Dk, Dv], z [N, H, 2*Dk] (state dtype; N = B, or the number of cu_seqlens sequences).
// nvk: num_visible_keys (None, or int64 [B, T]: monotone cross-attention; the final state is that
// of all S keys).
void fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pq, const at::Tensor& pk,
         const OptT& S0, const OptT& z0, const OptT& kpm, const OptT& cu, const OptT& nvk, bool causal,
         int64_t block_size, double eps, bool normalize, const at::Tensor& o, const OptT& S, const OptT& z) {
  check_inputs(q, k, v, pq, pk);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "leap_fwd", [&] {
    using acc_t = typename Leap<scalar_t>::acc_t;
    auto L = make_ctx<scalar_t>(q, k, v, pq, pk, kpm, cu, nvk, causal, block_size, eps, normalize);
    L.prepare();
    L.forward(opt_ptr<acc_t>(S0), opt_ptr<acc_t>(z0), o.data_ptr<scalar_t>(), opt_out<acc_t>(S), opt_out<acc_t>(z));
  });
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
         const OptT& dpkh_in) {
  check_inputs(q, k, v, pq, pk);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "leap_bwd", [&] {
    using acc_t = typename Leap<scalar_t>::acc_t;
    auto L = make_ctx<scalar_t>(q, k, v, pq, pk, kpm, cu, nvk, causal, block_size, eps, normalize);
    L.prepare();
    L.backward(dout.data_ptr<scalar_t>(), dSc.defined() ? dSc.data_ptr<acc_t>() : nullptr,
               dzc.defined() ? dzc.data_ptr<acc_t>() : nullptr, opt_ptr<acc_t>(S0), opt_ptr<acc_t>(z0),
               dq.data_ptr<scalar_t>(), dpq.data_ptr<acc_t>(), dkh.data_ptr<acc_t>(), dvh.data_ptr<acc_t>(),
               dpkh.data_ptr<acc_t>(), opt_out<acc_t>(dS0), opt_out<acc_t>(dz0));
  });
  if (kv_direct && p_direct) return;
  // reduce over the GQA group (fixed order) and cast to the output dtype
  const int64_t G = H / Hkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "leap_bwd_reduce", [&] {
    using acc_t = typename Leap<scalar_t>::acc_t;
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
          const at::Tensor& z) {
  check_inputs(q, k, v, pq, pk);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "leap_step", [&] {
    using acc_t = typename Leap<scalar_t>::acc_t;
    auto L = make_ctx<scalar_t>(q, k, v, pq, pk, c10::nullopt, c10::nullopt, c10::nullopt, true, 0, eps,
                                normalize);
    L.step(opt_ptr<acc_t>(S0), opt_ptr<acc_t>(z0), o.data_ptr<scalar_t>(), S.data_ptr<acc_t>(), z.data_ptr<acc_t>());
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LeaPformer attention: chunkwise C++ CPU kernels (forward, backward, decode step)";
  // every entry point writes into output tensors the caller allocated (attention/cpu.py)
  m.def("fwd", &fwd, "LeaP attention forward: writes o (and S, z when given)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("pq"), py::arg("pk"), py::arg("S0"), py::arg("z0"), py::arg("key_padding_mask"),
        py::arg("cu_seqlens"), py::arg("num_visible_keys"), py::arg("causal"), py::arg("block_size"), py::arg("eps"),
        py::arg("normalize"), py::arg("o"), py::arg("S"), py::arg("z"));
  m.def("bwd", &bwd, "LeaP attention backward: writes dq, dk, dv, dpq, dpk (and dS0, dz0 when given)",
        py::arg("do"), py::arg("dS"), py::arg("dz"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pq"),
        py::arg("pk"), py::arg("S0"), py::arg("z0"), py::arg("key_padding_mask"), py::arg("cu_seqlens"),
        py::arg("num_visible_keys"), py::arg("causal"), py::arg("block_size"), py::arg("eps"), py::arg("normalize"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dpq"), py::arg("dpk"), py::arg("dS0"), py::arg("dz0"),
        py::arg("dkh"), py::arg("dvh"), py::arg("dpkh"));
  m.def("step", &step, "LeaP attention decode step: writes o, S, z", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("pq"), py::arg("pk"), py::arg("S0"), py::arg("z0"), py::arg("eps"), py::arg("normalize"),
        py::arg("o"), py::arg("S"), py::arg("z"));
  m.def("set_mode", [](int mode) { g_mode = mode; },
        "0: automatic, 1: sequential over chunks per (sequence, head), 2: parallel across chunks");
  m.def("get_mode", [] { return g_mode; });
  m.attr("CHUNK") = CH;
}
