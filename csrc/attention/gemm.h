// The small GEMMs of the drivers (the micro-kernels of micro_impl.h for this unit's instruction
// set, inlined), the staircase variants that skip fully masked tiles, and a tiled transpose.
//
// A fragment of the per-ISA kernel units: included only by kernels_isa.h, inside the namespace of
// one instruction-set path (no includes of its own; kernels_prelude.h has them).
#pragma once

// C[i*ldc + j] += sum_k A[i*sai + k*sak] * B[k*ldb + j]   (i < M, j < N, k < K)
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak,
                 const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#if defined(LK_HAVE_AVX2)
  gemm_vec<T>(M, N, K, A, sai, sak, B, ldb, C, ldc);
#else
  gemm_portable<T>(M, N, K, A, sai, sak, B, ldb, C, ldc);
#endif
}

// The intra-chunk products only need the visible part: row i of the scores sees the keys
// s < nv[i] (nv non-decreasing in i: causal and block-causal visibility is a staircase), so
// fully masked tiles are skipped. Rows go in blocks of 6 (the micro-kernels' height).
constexpr int64_t RB = 6;

// C[i][j] += ..., for j < nv[i] at least (columns rounded up to 16, at most N)
template <typename T>
void gemm_prefix_n(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak,
                   const T* B, int64_t ldb, T* C, int64_t ldc, const int64_t* nv) {
  for (int64_t i0 = 0; i0 < M; i0 += RB) {
    const int64_t i1 = std::min(M, i0 + RB);
    const int64_t n = std::min(N, (nv[i1 - 1] + 15) / 16 * 16);
    if (n > 0) gemm<T>(i1 - i0, n, K, A + i0 * sai, sai, sak, B, ldb, C + i0 * ldc, ldc);
  }
}

// row i sums over k < nv[i] only (the A entries beyond are zero)
template <typename T>
void gemm_prefix_k(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak,
                   const T* B, int64_t ldb, T* C, int64_t ldc, const int64_t* nv) {
  for (int64_t i0 = 0; i0 < M; i0 += RB) {
    const int64_t i1 = std::min(M, i0 + RB);
    const int64_t kk = std::min(K, nv[i1 - 1]);
    if (kk > 0) gemm<T>(i1 - i0, N, kk, A + i0 * sai, sai, sak, B, ldb, C + i0 * ldc, ldc);
  }
}

// row i sums over k >= ks[i] only (ks non-decreasing; the A entries before are zero)
template <typename T>
void gemm_suffix_k(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak,
                   const T* B, int64_t ldb, T* C, int64_t ldc, const int64_t* ks) {
  for (int64_t i0 = 0; i0 < M; i0 += RB) {
    const int64_t i1 = std::min(M, i0 + RB);
    const int64_t k0 = std::max<int64_t>(0, ks[i0]);
    if (k0 < K)
      gemm<T>(i1 - i0, N, K - k0, A + i0 * sai + k0 * sak, sai, sak, B + k0 * ldb, ldb, C + i0 * ldc, ldc);
  }
}

template <typename T>
inline void transpose(int64_t R, int64_t Cc, const T* src, int64_t lds, T* dst, int64_t ldd) {  // dst[c][r] = src[r][c]
  constexpr int64_t TB = 8;  // tiles keep both sides within a few cache lines
  for (int64_t r0 = 0; r0 < R; r0 += TB) {
    const int64_t r1 = std::min(R, r0 + TB);
    for (int64_t c0 = 0; c0 < Cc; c0 += TB) {
      const int64_t c1 = std::min(Cc, c0 + TB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

// Sums in a fixed order that vectorises without -ffast-math: 16 running lanes (element i goes to
// lane i % 16), combined by a fixed tree, then the tail. A plain `s += x[i]` loop is a chain of
// dependent scalar adds (the compiler may not reorder it); this is several times faster and as
// deterministic (the order depends on n only).
constexpr int kLanes = 16;

template <typename T>
inline T lanes_total(T* part, T tail) {
#pragma GCC unroll 4
  for (int w = kLanes / 2; w > 0; w /= 2)
#pragma GCC unroll 8
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0] + tail;
}

// sum_i a[i] * b[i]
template <typename T>
inline T dotp(const T* __restrict a, const T* __restrict b, int64_t n) {
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return lanes_total(part, tail);
}

// sum_i a[i]
template <typename T>
inline T sump(const T* __restrict a, int64_t n) {
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l];
  T tail = 0;
  for (; i < n; ++i) tail += a[i];
  return lanes_total(part, tail);
}

// The rows of one head are strided by H * D in q, k, v, do: touched once per pass, they come from
// L3 or memory, so every row of a block is prefetched before the first is read (the misses overlap).
// prefetch_rows_w: rows about to be written (a strided store that misses stalls once the store
// queue is full).
template <typename X>
inline void prefetch_rows(const X* p, int64_t stride, int64_t rows, int64_t row_len) {
  const int64_t bytes = row_len * (int64_t)sizeof(X);
  for (int64_t r = 0; r < rows; ++r) {
    const char* c = reinterpret_cast<const char*>(p + r * stride);
    for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(c + x);
  }
}
template <typename X>
inline void prefetch_rows_w(X* p, int64_t stride, int64_t rows, int64_t row_len) {
  const int64_t bytes = row_len * (int64_t)sizeof(X);
  for (int64_t r = 0; r < rows; ++r) {
    char* c = reinterpret_cast<char*>(p + r * stride);
    for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(c + x, 1);
  }
}

// The element-wise loops of the per-chunk pieces, as functions with restrict pointers so that they
// vectorise (the scratch rows are all acc_t: without restrict the compiler must assume they alias).

// a[s] = P[s] cos(theta_q - theta_k,s) on visible keys (s < n_vis), else 0
template <typename T>
inline void vis_scores(T* __restrict a, const T* __restrict p, const T* __restrict sk, const T* __restrict ck, T sn,
                       T cs, int64_t n_vis, int64_t nk) {
  for (int64_t s = 0; s < nk; ++s) a[s] = s < n_vis ? p[s] * (sn * sk[s] + cs * ck[s]) : T(0);
}

// The intra-chunk score gradient of one query row: dA = W r + dden on visible keys; E = dA times the
// cosine weight; X = dA P (sin(tq) cos(tk) - cos(tq) sin(tk)) returned in w (W in), added to xk.
template <typename T>
inline void intra_grad(T* __restrict E, T* __restrict w, T* __restrict xk, const T* __restrict p,
                       const T* __restrict sk, const T* __restrict ck, T sn, T cs, T r, T ddv, int64_t n_vis,
                       int64_t nk) {
  for (int64_t s = 0; s < nk; ++s) {
    const T dav = s < n_vis ? w[s] * r + ddv : T(0);
    E[s] = dav * (sn * sk[s] + cs * ck[s]);
    const T x = dav * p[s] * (sn * ck[s] - cs * sk[s]);
    w[s] = x;
    xk[s] += x;
  }
}

// From dL/dx~ (g = [g_s, g_c], plus an optional bias zb added to g): da = g_s sin + g_c cos, and
// tt = g_s cos - g_c sin (the theta terms, dotted with relu(x) by the caller)
template <typename T>
inline void feat_grad(T* __restrict da, T* __restrict tt, const T* __restrict g, const T* __restrict zb, T sn, T cs,
                      int64_t Dk) {
  for (int64_t d = 0; d < Dk; ++d) {
    const T gs = zb ? g[d] + zb[d] : g[d], gc = zb ? g[Dk + d] + zb[Dk + d] : g[Dk + d];
    da[d] = gs * sn + gc * cs;
    tt[d] = gs * cs - gc * sn;
  }
}

// g = g r + ddv z (the normalisation of the inter-chunk query gradient); x *= r
template <typename T>
inline void scale_bias(T* __restrict g, const T* __restrict z, T r, T ddv, int64_t n) {
  for (int64_t f = 0; f < n; ++f) g[f] = g[f] * r + ddv * z[f];
}
template <typename T>
inline void scale(T* __restrict x, T r, int64_t n) {
  for (int64_t f = 0; f < n; ++f) x[f] *= r;
}

// out[d] = where(keep and a[d] > 0, x[d] (+ add[d]), 0): the relu mask of a gradient row (a is relu(x) or x
// itself: the same test), in the output dtype
template <typename O, typename T>
inline void masked_row(O* __restrict out, const T* __restrict x, const T* __restrict a, bool keep, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<O>(keep && a[d] > T(0) ? x[d] : T(0));
}
template <typename T>
inline void keep_row(T* __restrict out, const T* __restrict x, bool keep, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = keep ? x[d] : T(0);
}
// x += y
template <typename T>
inline void add_to(T* __restrict x, const T* __restrict y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) x[d] += y[d];
}
