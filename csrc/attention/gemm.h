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
