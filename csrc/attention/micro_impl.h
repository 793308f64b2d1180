// The micro-kernels, written once and compiled per instruction-set path (a fragment of
// kernels_isa.h: LK_HAVE_AVX2 / LK_HAVE_AVX512 say which vector types the unit's target has).
//
// Small GEMM: C[i*ldc + j] += sum_k A[i*sai + k*sak] * B[k*ldb + j]. Register-blocked MR x NR
// tiles accumulate over the whole K in registers (fixed order: k ascending), then add into C:
// results depend on the shapes only (deterministic).

#pragma once

// ---------------------------------------------------------------- portable (any ISA)
template <typename T, int MR, int NR>
inline void micro(int64_t K, const T* __restrict A, int64_t sai, int64_t sak, const T* __restrict B, int64_t ldb,
                  T* __restrict C, int64_t ldc) {
  T acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NR; ++c) acc[r][c] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * sai + k * sak];
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
inline void gemm_edge(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb,
                      T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[i * sai + k * sak];
      const T* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T, int NR>
inline void gemm_cols(int64_t M, int64_t K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
                      int64_t ldc) {
  constexpr int MR = 4;
  int64_t i = 0;
  for (; i + MR <= M; i += MR) micro<T, MR, NR>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) micro<T, 1, NR>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc);
}

template <typename T>
void gemm_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb,
                   T* C, int64_t ldc) {
  constexpr int NR = sizeof(T) == 4 ? 16 : 8;
  int64_t j = 0;
  for (; j + NR <= N; j += NR) gemm_cols<T, NR>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
  if (N - j >= NR / 2) {
    gemm_cols<T, NR / 2>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
    j += NR / 2;
  }
  if (j < N) gemm_edge<T>(M, N - j, K, A, sai, sak, B + j, ldb, C + j, ldc);
}

// ---------------------------------------------------------------- explicit vectors
#if defined(LK_HAVE_AVX2)
struct VF8 {  // 8 floats (ymm)
  using R = __m256;
  static constexpr int W = 8;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static R zero() { return _mm256_setzero_ps(); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
};
struct VD4 {  // 4 doubles (ymm)
  using R = __m256d;
  static constexpr int W = 4;
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static R zero() { return _mm256_setzero_pd(); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
};
#endif
#if defined(LK_HAVE_AVX512)
struct VF16 {  // 16 floats (zmm)
  using R = __m512;
  static constexpr int W = 16;
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R bcast(const float* p) { return _mm512_set1_ps(*p); }
  static R zero() { return _mm512_setzero_ps(); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
};
struct VD8 {  // 8 doubles (zmm)
  using R = __m512d;
  static constexpr int W = 8;
  static R load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  static R bcast(const double* p) { return _mm512_set1_pd(*p); }
  static R zero() { return _mm512_setzero_pd(); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
};
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = VF16; };
template <> struct VecOf<double> { using type = VD8; };
constexpr int kNvMax = 4;  // 32 zmm registers: 6 x 4 accumulators + 4 rows of B
#elif defined(LK_HAVE_AVX2)
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = VF8; };
template <> struct VecOf<double> { using type = VD4; };
constexpr int kNvMax = 2;  // 16 ymm registers: 6 x 2 accumulators + 2 rows of B
#endif

#if defined(LK_HAVE_AVX2)
// MR rows x NV vectors of columns, accumulated in registers over the whole K.
template <typename V, int MR, int NV, typename T>
inline void micro_vec(int64_t K, const T* __restrict A, int64_t sai, int64_t sak, const T* __restrict B, int64_t ldb,
                      T* __restrict C, int64_t ldc) {
  typename V::R acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) acc[r][c] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    typename V::R bv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) bv[c] = V::load(b + V::W * c);
    const T* a = A + k * sak;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const typename V::R av = V::bcast(a + r * sai);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) acc[r][c] = V::fma(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) {
      T* cp = C + r * ldc + V::W * c;
      V::store(cp, V::add(V::load(cp), acc[r][c]));
    }
}

template <typename V, int NV, typename T>
inline void gemm_cols_vec(int64_t M, int64_t K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
                          int64_t ldc) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) micro_vec<V, 6, NV>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc);
  for (; i + 4 <= M; i += 4) micro_vec<V, 4, NV>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) micro_vec<V, 1, NV>(K, A + i * sai, sai, sak, B, ldb, C + i * ldc, ldc);
}

// Columns in blocks of kNvMax vectors, then 2, then 1, then the scalar edge.
template <typename T>
void gemm_vec(int64_t M, int64_t N, int64_t K, const T* A, int64_t sai, int64_t sak, const T* B, int64_t ldb, T* C,
              int64_t ldc) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  int64_t j = 0;
  for (; j + kNvMax * W <= N; j += kNvMax * W)
    gemm_cols_vec<V, kNvMax>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
  if (kNvMax > 2 && N - j >= 2 * W) {
    gemm_cols_vec<V, 2>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
    j += 2 * W;
  }
  if (N - j >= W) {
    gemm_cols_vec<V, 1>(M, K, A, sai, sak, B + j, ldb, C + j, ldc);
    j += W;
  }
  if (j < N) gemm_edge<T>(M, N - j, K, A, sai, sak, B + j, ldb, C + j, ldc);
}

// Decode-step sweep over columns [0, NV*W) of one float32 state for one token:
// S'[f] = S[f] + k~_f v and num += q~_f S'[f], f ascending. One read of S and one write of S'
// per element; v and num stay in registers.
template <typename V, int NV>
inline void step_cols(int64_t F, int64_t ld, const float* __restrict Sin, float* __restrict So,
                      const float* __restrict kf, const float* __restrict qf, const float* __restrict v,
                      float* __restrict num) {
  typename V::R vv[NV], nm[NV];
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) {
    vv[c] = V::load(v + V::W * c);
    nm[c] = V::zero();
  }
  for (int64_t f = 0; f < F; ++f) {
    const typename V::R kv = V::bcast(kf + f), qv = V::bcast(qf + f);
    float* so = So + f * ld;
    const float* si = Sin ? Sin + f * ld : nullptr;
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      const typename V::R s = si ? V::fma(kv, vv[c], V::load(si + V::W * c)) : V::mul(kv, vv[c]);
      V::store(so + V::W * c, s);
      nm[c] = V::fma(qv, s, nm[c]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NV; ++c) V::store(num + V::W * c, nm[c]);
}

// The whole row width Dv (a multiple of 8) in blocks of up to 4 vectors, then single ones.
void step_rows(int64_t F, int64_t Dv, const float* Sin, float* So, const float* kf, const float* qf, const float* v,
               float* num) {
  using V = typename VecOf<float>::type;
  constexpr int W = V::W;
  int64_t e = 0;
  for (; e + 4 * W <= Dv; e += 4 * W) step_cols<V, 4>(F, Dv, Sin ? Sin + e : nullptr, So + e, kf, qf, v + e, num + e);
  for (; e + W <= Dv; e += W) step_cols<V, 1>(F, Dv, Sin ? Sin + e : nullptr, So + e, kf, qf, v + e, num + e);
  for (; e < Dv; e += 8) step_cols<VF8, 1>(F, Dv, Sin ? Sin + e : nullptr, So + e, kf, qf, v + e, num + e);
}
#endif
