// Window pooling on the CPU: forward and backward of sum / mean / max over windows (a, b) of
// offsets relative to t (DESIGN section 2), for x [B, T, D] in float16 / bfloat16 / float32 /
// float64 (templated; sum / mean prefixes in double for every dtype, max and the backward's
// per-row accumulators in float32, double for double).
//
// Work is split over tasks run by the shared task runner (common/task_runner.h): (b, D-block) for
// sum / mean and the backwards, (b, T-tile, D-block) for the max forward; each task owns the
// columns [d0, d0 + DB) of one sequence (rows of its tile) and keeps its scratch in a per-thread
// buffer. The GIL is released around the kernels.
//
// sum / mean: one blocked two-level prefix sum along T per task, shared by every window.
//   P[i] = sum x[blk(i)*TB .. i-1] (intra-block), C[k] = sum x[0 .. k*TB-1], both double for
//   every input dtype, so sum x[lo .. hi-1] = (C[hi/TB] - C[lo/TB]) + (P[hi] - P[lo]) (then
//   / count for mean, still in double): the error is that of a double sum of one block whatever
//   T, the cost per window is O(T * D) whatever its length, and finite float32 / bfloat16 data
//   up to the top of its range cannot overflow a partial sum (a float32 in-block prefix of
//   x = 1e37 reached inf after 34 rows and gave NaN even for the window (0, 0)). A NaN or inf
//   reaches every later prefix of its column: windows after it may be NaN (documented in
//   ops.window_pool). The backward is the same operation on the gradient over the reversed
//   windows (-b, -a), summed over windows (mean scales the gradient by 1 / count first).
// max: a tiled sparse table (see max_fwd): O(T * D * log Lmax) for all windows together. Ties
//   keep the first (lowest) index; NaN ranks above every number (a window holding NaN gives
//   NaN, as torch.amax, and its argmax is the window's first NaN: see greater()). With the
//   argmax (only when a gradient is needed) it is saved as an offset from the window's clipped
//   start (int16 where the longest window fits, else int32, as the caller asks; -1 for a
//   wholly-outside window). The backward scatters the gradient to the argmax sequentially
//   inside a task: deterministic.
//
// Windows arrive clamped to [-T, T] (same result, no overflow) as int64 lists. Outputs are
// allocated by the caller (pooling/cpu.py, torch.empty) and checked here (CPU, contiguous, exact
// shape and dtype, no alias of the input); every element of each is written.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/task_runner.h"

namespace {

using lk::run_tasks;

constexpr int64_t TB = 256;  // rows per prefix block
#ifndef LK_POOL_DB
#define LK_POOL_DB 64
#endif
constexpr int64_t DB = LK_POOL_DB;  // columns per task
#ifndef LK_POOL_TT
#define LK_POOL_TT 512
#endif

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Work estimate of n tasks of `elems` element updates each, in the multiply-adds of the shared
// task runner (common/task_runner.h): an update here (a double add, a load and a store, with
// the conversions of the input dtype) costs about 8 of them.
inline double pool_work(int64_t n, int64_t elems) { return 8.0 * static_cast<double>(n) * static_cast<double>(elems); }

inline int64_t clampi(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The order of the max: NaN above every number (v != v is NaN; no -ffast-math here). Ties,
// NaN with NaN included, are not "greater": the earlier (lower index) candidate stays.
template <typename acc_t>
inline bool greater(acc_t v, acc_t than) {
  return v > than || (v != v && than == than);
}

// Clipped half-open range [lo, hi) of window (a, b) at t.
inline void bounds(int64_t t, int64_t a, int64_t b, int64_t T, int64_t& lo, int64_t& hi) {
  lo = clampi(t + a, 0, T);
  hi = clampi(t + b + 1, 0, T);
  if (hi < lo) hi = lo;
}

// Blocked prefix (double) of y[i * ys + j] (i < T, j < cn), each row i scaled by scale[i] if given.
template <typename scalar_t>
void blocked_prefix(const scalar_t* y, int64_t ys, int64_t T, int64_t cn, const double* scale, double* P,
                    double* C) {
  double run[DB];
  double carry[DB];
  for (int64_t j = 0; j < DB; ++j) {
    run[j] = 0;
    carry[j] = 0;
  }
  for (int64_t i = 0; i <= T; ++i) {
    if (i % TB == 0) {
      double* c = C + (i / TB) * DB;
      for (int64_t j = 0; j < DB; ++j) {
        carry[j] += run[j];
        c[j] = carry[j];
        run[j] = 0;
      }
    }
    double* p = P + i * DB;
    for (int64_t j = 0; j < DB; ++j) p[j] = run[j];
    if (i < T) {
      const scalar_t* row = y + i * ys;
      if (scale) {
        const double s = scale[i];
        for (int64_t j = 0; j < cn; ++j) run[j] += static_cast<double>(row[j]) * s;
      } else {
        for (int64_t j = 0; j < cn; ++j) run[j] += static_cast<double>(row[j]);
      }
    }
  }
}

// v[j] = (sum over [lo, hi) of the prefixed column j) * scale, for j < n, computed in double and
// rounded once (v: any float type; v[j] += instead with ADD)
template <bool ADD = false, typename out_t>
inline void range_sum(const double* P, const double* C, int64_t lo, int64_t hi, double scale, out_t* __restrict v,
                      int64_t n) {
  const double* pl = P + lo * DB;
  const double* ph = P + hi * DB;
  const int64_t bl = lo / TB, bh = hi / TB;
  if (bl == bh) {
    for (int64_t j = 0; j < n; ++j) {
      const double r = (ph[j] - pl[j]) * scale;
      v[j] = static_cast<out_t>(ADD ? static_cast<double>(v[j]) + r : r);
    }
  } else {
    const double* cl = C + bl * DB;
    const double* ch = C + bh * DB;
    for (int64_t j = 0; j < n; ++j) {
      const double r = ((ch[j] - cl[j]) + (ph[j] - pl[j])) * scale;
      v[j] = static_cast<out_t>(ADD ? static_cast<double>(v[j]) + r : r);
    }
  }
}

struct Problem {
  int64_t B, T, D, W;
  std::vector<int64_t> a, b;
  int64_t ndb() const { return (D + DB - 1) / DB; }
};

Problem make_problem(const at::Tensor& t3, int64_t T, const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  TORCH_CHECK(a.size() == b.size() && !a.empty(), "window_pool: a and b must be nonempty lists of equal length");
  Problem p;
  p.B = t3.size(0);
  p.T = T;
  p.D = t3.size(-1);
  p.W = static_cast<int64_t>(a.size());
  p.a = a;
  p.b = b;
  for (int64_t w = 0; w < p.W; ++w) {
    TORCH_CHECK(a[w] <= b[w], "window_pool: window with a > b");
    p.a[w] = clampi(a[w], -T, T);
    p.b[w] = clampi(b[w], -T, T);
  }
  return p;
}

// ---------------------------------------------------------------- sum / mean
template <typename scalar_t>
void sum_fwd(const scalar_t* x, scalar_t* out, const Problem& pr, bool mean) {
  const int64_t T = pr.T, D = pr.D, W = pr.W, ndb = pr.ndb();
  struct Scratch {
    std::vector<double> P, C;
  };
  const int64_t n = pr.B * ndb;
  auto make = [&] { return Scratch{std::vector<double>((T + 1) * DB), std::vector<double>((T / TB + 1) * DB)}; };
  run_tasks<Scratch>(n, pool_work(n, T * W * DB), make, [&](int64_t task, Scratch& sc) {
    std::vector<double>& P = sc.P;
    std::vector<double>& C = sc.C;
    {
      const int64_t bb = task / ndb, d0 = (task % ndb) * DB, cn = std::min(DB, D - d0);
      blocked_prefix<scalar_t>(x + bb * T * D + d0, D, T, cn, nullptr, P.data(), C.data());
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* orow = out + (bb * T + t) * W * D + d0;
        for (int64_t w = 0; w < W; ++w) {
          int64_t lo, hi;
          bounds(t, pr.a[w], pr.b[w], T, lo, hi);
          const double scale = mean ? 1.0 / static_cast<double>(std::max<int64_t>(hi - lo, 1)) : 1.0;
          range_sum(P.data(), C.data(), lo, hi, scale, orow + w * D, cn);
        }
      }
    }
  });
}

template <typename scalar_t>
void sum_bwd(const scalar_t* g, scalar_t* dx, const Problem& pr, bool mean) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t T = pr.T, D = pr.D, W = pr.W, ndb = pr.ndb();
  // per-window row scales of the gradient: 1 / count for mean
  std::vector<double> scales;
  if (mean) {
    scales.resize(W * T);
    for (int64_t w = 0; w < W; ++w)
      for (int64_t t = 0; t < T; ++t) {
        int64_t lo, hi;
        bounds(t, pr.a[w], pr.b[w], T, lo, hi);
        scales[w * T + t] = 1.0 / static_cast<double>(std::max<int64_t>(hi - lo, 1));
      }
  }
  struct Scratch {
    std::vector<double> P, C;
    std::vector<acc_t> acc;
  };
  const int64_t n = pr.B * ndb;
  auto make = [&] {
    return Scratch{std::vector<double>((T + 1) * DB), std::vector<double>((T / TB + 1) * DB),
                   std::vector<acc_t>(T * DB)};
  };
  run_tasks<Scratch>(n, pool_work(n, T * W * DB), make, [&](int64_t task, Scratch& sc) {
    std::vector<double>& P = sc.P;
    std::vector<double>& C = sc.C;
    std::vector<acc_t>& acc = sc.acc;
    {
      const int64_t bb = task / ndb, d0 = (task % ndb) * DB, cn = std::min(DB, D - d0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t w = 0; w < W; ++w) {
        blocked_prefix<scalar_t>(g + bb * T * W * D + w * D + d0, W * D, T, cn,
                                        mean ? scales.data() + w * T : nullptr, P.data(), C.data());
        // position s receives the gradient of every t with s in [t+a, t+b]: t in [s-b, s-a]
        for (int64_t s = 0; s < T; ++s) {
          int64_t lo, hi;
          bounds(s, -pr.b[w], -pr.a[w], T, lo, hi);
          range_sum<true>(P.data(), C.data(), lo, hi, 1.0, acc.data() + s * DB, DB);
        }
      }
      for (int64_t s = 0; s < T; ++s) {
        scalar_t* o = dx + (bb * T + s) * D + d0;
        const acc_t* r = acc.data() + s * DB;
        for (int64_t j = 0; j < cn; ++j) o[j] = static_cast<scalar_t>(r[j]);
      }
    }
  });
}

// ---------------------------------------------------------------- max
// Tiled sparse table. A task owns rows [t0, t0 + TT) of columns [d0, d0 + DB) of one sequence
// and loads the rows its windows reach, p in [t0 + amin, t0 + TT + bmax), into a buffer; a row
// outside [0, T) holds a copy of the nearest edge row (row 0 or T - 1, with that row's index),
// which changes no window that reaches inside (its clipped range holds that edge row) and needs
// no sentinel (so -inf inputs need no special case). Level j of the buffer holds M_j[r] = first
// max of rows r .. r + 2^j - 1, built in place from level j - 1 (ascending r reads only level
// j - 1 rows); window (a, b) of length L, level k = floor(log2 L), is the first max of M_k[t + a]
// and M_k[t + b - 2^k + 1] (overlapping ranges: the right one wins only when greater(), as the
// left one holds the lower index on ties; when both hold NaN the left one's first NaN is the
// union's first NaN). Wholly-outside windows give 0 (argmax -1).
// Cost O(T * D * log Lmax) per call plus a halo of (bmax - amin) rows per tile (TT >= the halo
// up to T, so at most 2x), whatever the number of windows per level.
template <typename scalar_t, typename index_t, bool ARG>
void max_fwd(const scalar_t* x, scalar_t* out, index_t* arg, const Problem& pr) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t T = pr.T, D = pr.D, W = pr.W, ndb = pr.ndb();
  int64_t amin = pr.a[0], bmax = pr.b[0];
  std::vector<int> level(W);
  int K = 0;
  for (int64_t w = 0; w < W; ++w) {
    amin = std::min(amin, pr.a[w]);
    bmax = std::max(bmax, pr.b[w]);
    int k = 0;
    while ((int64_t(2) << k) <= pr.b[w] - pr.a[w] + 1) ++k;
    level[w] = k;
    K = std::max(K, k);
  }
  const int64_t halo = bmax - amin;
  const int64_t TT = std::max<int64_t>(LK_POOL_TT, std::min(halo, T));
  const int64_t R = TT + halo;  // buffer rows
  const int64_t ntile = (T + TT - 1) / TT;
  struct Scratch {
    std::vector<acc_t> bv;
    std::vector<int32_t> bi;
  };
  const int64_t n = pr.B * ntile * ndb;
  auto make = [&] { return Scratch{std::vector<acc_t>(R * DB), std::vector<int32_t>(ARG ? R * DB : 0)}; };
  run_tasks<Scratch>(n, pool_work(n, TT * W * DB), make, [&](int64_t task, Scratch& sc) {
    std::vector<acc_t>& bv = sc.bv;
    std::vector<int32_t>& bi = sc.bi;
    {
      const int64_t bb = task / (ntile * ndb), rem = task % (ntile * ndb);
      const int64_t t0 = (rem / ndb) * TT, d0 = (rem % ndb) * DB, cn = std::min(DB, D - d0);
      const int64_t t1 = std::min(T, t0 + TT), base = t0 + amin;
      const int64_t rows = std::min(R, (t1 - 1 + bmax) - base + 1);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t p = clampi(base + r, 0, T - 1);  // edge rows replicated
        const scalar_t* row = x + (bb * T + p) * D + d0;
        acc_t* v = bv.data() + r * DB;
        for (int64_t j = 0; j < cn; ++j) v[j] = static_cast<acc_t>(row[j]);
        for (int64_t j = cn; j < DB; ++j) v[j] = acc_t(0);  // unused columns: defined values
        if constexpr (ARG) {
          int32_t* ix = bi.data() + r * DB;
          for (int64_t j = 0; j < DB; ++j) ix[j] = static_cast<int32_t>(p);
        }
      }
      for (int k = 0; k <= K; ++k) {
        const int64_t span = int64_t(1) << k;
        for (int64_t w = 0; w < W; ++w) {
          if (level[w] != k) continue;
          const int64_t a = pr.a[w], b = pr.b[w];
          for (int64_t t = t0; t < t1; ++t) {
            scalar_t* o = out + ((bb * T + t) * W + w) * D + d0;
            index_t* ao = ARG ? arg + ((bb * T + t) * W + w) * D + d0 : nullptr;
            if (t + b < 0 || t + a > T - 1) {  // wholly outside
              for (int64_t j = 0; j < cn; ++j) o[j] = static_cast<scalar_t>(0);
              if constexpr (ARG)
                for (int64_t j = 0; j < cn; ++j) ao[j] = static_cast<index_t>(-1);
              continue;
            }
            const acc_t* v1 = bv.data() + (t + a - base) * DB;
            const acc_t* v2 = bv.data() + (t + b - span + 1 - base) * DB;
            if constexpr (ARG) {
              const int32_t* i1 = bi.data() + (t + a - base) * DB;
              const int32_t* i2 = bi.data() + (t + b - span + 1 - base) * DB;
              const int32_t lo = static_cast<int32_t>(std::max<int64_t>(t + a, 0));
              for (int64_t j = 0; j < cn; ++j) {
                const bool take2 = greater(v2[j], v1[j]);
                o[j] = static_cast<scalar_t>(take2 ? v2[j] : v1[j]);
                ao[j] = static_cast<index_t>((take2 ? i2[j] : i1[j]) - lo);
              }
            } else {
              for (int64_t j = 0; j < cn; ++j) o[j] = static_cast<scalar_t>(greater(v2[j], v1[j]) ? v2[j] : v1[j]);
            }
          }
        }
        if (k == K) break;
        // level k + 1 from level k, in place (rows whose range fits in the buffer)
        for (int64_t r = 0; r + 2 * span <= rows; ++r) {
          acc_t* v = bv.data() + r * DB;
          const acc_t* vr = v + span * DB;
          if constexpr (ARG) {
            int32_t* ix = bi.data() + r * DB;
            const int32_t* ir = ix + span * DB;
            for (int64_t j = 0; j < DB; ++j) {
              const bool take = greater(vr[j], v[j]);
              v[j] = take ? vr[j] : v[j];
              ix[j] = take ? ir[j] : ix[j];
            }
          } else {
            for (int64_t j = 0; j < DB; ++j) v[j] = greater(vr[j], v[j]) ? vr[j] : v[j];
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void max_bwd(const scalar_t* g, const index_t* arg, scalar_t* dx, const Problem& pr) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t T = pr.T, D = pr.D, W = pr.W, ndb = pr.ndb();
  const int64_t n = pr.B * ndb;
  run_tasks<std::vector<acc_t>>(n, pool_work(n, T * W * DB), [&] { return std::vector<acc_t>(T * DB); },
                                [&](int64_t task, std::vector<acc_t>& acc) {
    {
      const int64_t bb = task / ndb, d0 = (task % ndb) * DB, cn = std::min(DB, D - d0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t w = 0; w < W; ++w) {
          const int64_t lo = clampi(t + pr.a[w], 0, T);
          const int64_t base = ((bb * T + t) * W + w) * D + d0;
          const scalar_t* gr = g + base;
          const index_t* ar = arg + base;
          for (int64_t j = 0; j < cn; ++j) {
            const int64_t off = static_cast<int64_t>(ar[j]);
            if (off >= 0) acc[(lo + off) * DB + j] += static_cast<acc_t>(gr[j]);
          }
        }
      }
      for (int64_t s = 0; s < T; ++s) {
        scalar_t* o = dx + (bb * T + s) * D + d0;
        const acc_t* r = acc.data() + s * DB;
        for (int64_t j = 0; j < cn; ++j) o[j] = static_cast<scalar_t>(r[j]);
      }
    }
  });
}

int reduce_code(const std::string& reduce) {
  if (reduce == "sum") return 0;
  if (reduce == "mean") return 1;
  if (reduce == "max") return 2;
  TORCH_CHECK(false, "window_pool: unknown reduce '", reduce, "'");
  return -1;
}

// Longest clipped window, which bounds the argmax offsets.
int64_t longest(const Problem& p) {
  int64_t m = 0;
  for (int64_t w = 0; w < p.W; ++w) m = std::max(m, std::min(p.b[w] - p.a[w] + 1, p.T));
  return m;
}

// An output buffer allocated by the caller (pooling/cpu.py, with torch.empty: under the tests
// floating ones come NaN-filled, so an element a kernel forgets to write shows up): a contiguous
// CPU tensor of exactly this shape and dtype, not sharing memory with the input. Every element
// is written.
void check_out(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape,
               const at::Tensor& input) {
  TORCH_CHECK(t.defined(), "window_pool: the output ", name, " is missing");
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "window_pool: the output ", name,
              " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "window_pool: the output ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "window_pool: the output ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || input.numel() == 0 || !t.is_alias_of(input), "window_pool: the output ", name,
              " shares memory with the input");
}

}  // namespace

// pool_fwd(x [B, T, D], a, b, reduce, out, valid, argmax): writes pooled into out [B, T, W, D]
// (x's dtype), valid [B, T, W] (bool) and, when argmax is given (max only: the gradient needs
// it), argmax [B, T, W, D]: int16 or int32 offsets within the window (int16 only where the
// longest window fits; the caller decides from the windows' lengths). Without argmax, max runs
// on values only.
void pool_fwd(const at::Tensor& x_in, const std::vector<int64_t>& a, const std::vector<int64_t>& b,
              const std::string& reduce, const at::Tensor& out, const at::Tensor& valid,
              const c10::optional<at::Tensor>& argmax) {
  TORCH_CHECK(x_in.dim() == 3, "window_pool: x must be [B, T, D]");
  TORCH_CHECK(x_in.device().is_cpu(), "window_pool: x must be a CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(1);
  const Problem pr = make_problem(x, T, a, b);
  const int code = reduce_code(reduce);
  check_out(out, "pooled", x.scalar_type(), {pr.B, T, pr.W, pr.D}, x);
  check_out(valid, "valid", at::kBool, {pr.B, T, pr.W}, x);
  const bool with_argmax = argmax.has_value() && argmax->defined();
  TORCH_CHECK(!with_argmax || code == 2, "window_pool: an argmax output goes with reduce='max' only");
  if (with_argmax) {
    const auto adt = argmax->scalar_type();
    TORCH_CHECK(adt == at::kShort || adt == at::kInt, "window_pool: the argmax output must be int16 or int32");
    check_out(*argmax, "argmax", adt, {pr.B, T, pr.W, pr.D}, x);
    TORCH_CHECK(adt == at::kInt || longest(pr) - 1 <= 32767,
                "window_pool: int16 argmax offsets cannot hold this window");
  }
  {
    bool* vp = valid.data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t w = 0; w < pr.W; ++w) vp[t * pr.W + w] = (t + pr.a[w] >= 0) && (t + pr.b[w] < T);
    for (int64_t bb = 1; bb < pr.B; ++bb) std::copy(vp, vp + T * pr.W, vp + bb * T * pr.W);
  }
  py::gil_scoped_release no_gil;  // the kernels touch no Python object
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_pool_fwd", [&] {
    if (code < 2) {
      sum_fwd<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pr, code == 1);
    } else if (!with_argmax) {
      max_fwd<scalar_t, int32_t, false>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), nullptr, pr);
    } else if (argmax->scalar_type() == at::kShort) {
      max_fwd<scalar_t, int16_t, true>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), argmax->data_ptr<int16_t>(),
                                       pr);
    } else {
      max_fwd<scalar_t, int32_t, true>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), argmax->data_ptr<int32_t>(),
                                       pr);
    }
  });
}

// pool_bwd(grad [B, T, W, D], T, a, b, reduce, argmax, dx): writes dx [B, T, D] (grad's dtype).
void pool_bwd(const at::Tensor& g_in, int64_t T, const std::vector<int64_t>& a, const std::vector<int64_t>& b,
              const std::string& reduce, const c10::optional<at::Tensor>& arg_in, const at::Tensor& dx) {
  TORCH_CHECK(g_in.dim() == 4 && g_in.size(1) == T && g_in.size(2) == static_cast<int64_t>(a.size()),
              "window_pool backward: grad must be [B, T, W, D]");
  TORCH_CHECK(g_in.device().is_cpu(), "window_pool backward: grad must be a CPU tensor");
  const at::Tensor g = g_in.contiguous();
  const Problem pr = make_problem(g, T, a, b);
  const int code = reduce_code(reduce);
  check_out(dx, "dx", g.scalar_type(), {pr.B, T, pr.D}, g);
  at::Tensor arg;
  if (code == 2) {
    TORCH_CHECK(arg_in.has_value() && arg_in->defined(), "window_pool backward: max needs the saved argmax");
    arg = arg_in->contiguous();
    TORCH_CHECK(arg.sizes() == g.sizes(), "window_pool backward: argmax must match grad's shape");
    TORCH_CHECK(arg.scalar_type() == at::kShort || arg.scalar_type() == at::kInt,
                "window_pool backward: argmax must be int16 or int32");
  }
  py::gil_scoped_release no_gil;  // the kernels touch no Python object
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "window_pool_bwd", [&] {
    if (code < 2) {
      sum_bwd<scalar_t>(g.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), pr, code == 1);
    } else if (arg.scalar_type() == at::kShort) {
      max_bwd<scalar_t, int16_t>(g.data_ptr<scalar_t>(), arg.data_ptr<int16_t>(), dx.data_ptr<scalar_t>(), pr);
    } else {
      max_bwd<scalar_t, int32_t>(g.data_ptr<scalar_t>(), arg.data_ptr<int32_t>(), dx.data_ptr<scalar_t>(), pr);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "leapformer_kernels window pooling (CPU)";
  // both write into output tensors the caller allocated (pooling/cpu.py)
  m.def("pool_fwd", &pool_fwd, "window pooling forward: writes out, valid (and argmax when given)", py::arg("x"),
        py::arg("a"), py::arg("b"), py::arg("reduce"), py::arg("out"), py::arg("valid"), py::arg("argmax"));
  m.def("pool_bwd", &pool_bwd, "window pooling backward: writes dx", py::arg("grad"), py::arg("T"), py::arg("a"),
        py::arg("b"), py::arg("reduce"), py::arg("argmax"), py::arg("dx"));
}
