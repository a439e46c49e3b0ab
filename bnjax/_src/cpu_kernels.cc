// bnjax's optional XLA:CPU kernels (XLA FFI): the two fused reductions of batch norm.
//
// XLA:CPU gives every reduction its own kernel and one full read of its operands, so the exact
// two-pass moments read x twice and the backward's sum(g) and sum(g * (x - mean)) read g twice.
// These handlers compute each pair in one read, on XLA's intra-op thread pool:
//
//   bnjax_moments(x[A, C, B])               -> mean[C], m2[C]         m2 = sum (x - mean)^2
//   bnjax_backward_sums(x, g[A, C, B], mu[C]) -> sum_g[C], sum_gc[C]  sum_gc = sum g * (x - mu)
//   bnjax_backward(x, g, mu, ...)               -> dx[A, C, B], sum_g, sum_gc  (one device: the sums,
//                                                  then dx in the same call, see Backward)
//
// x is viewed as [A, C, B] with C the features: B = 1 for features last (NC, NHWC), B = H*W for
// NCHW. x and g are float32 or bfloat16; statistics are float32, accumulated in float64 across
// chunks. The moments stay exact (no E[x^2] - E[x]^2): each chunk of rows, small enough to stay in
// L1/L2, is read twice from cache for its own mean and squared deviations, and the chunks are
// combined with Chan, Golub and LeVeque's pairwise rule. Work is split into a number of row
// partitions that depends only on the shape, combined in a fixed order: results do not depend on
// the number of threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) {  // round to nearest even, as XLA's convert
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    p[i] = static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays a (quiet) NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  p[i] = static_cast<uint16_t>(bits >> 16);
}

// Runs fn(0), ..., fn(parts - 1) on the calling thread and up to parts - 1 pool threads. The caller
// claims work too and waits only for parts that were claimed, so a busy pool cannot deadlock it;
// a helper that starts late finds nothing left and never touches the caller's buffers.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, parts, &fn]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      fn(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(parts - 1, pool.num_threads());
  // A helper must not use `fn` after the caller returns: it only runs `work` while parts remain
  // unclaimed, and the caller waits for every claimed part below.
  auto fn_ptr = std::make_shared<std::function<void()>>(work);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([fn_ptr]() { (*fn_ptr)(); });
  work();
  while (state->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

int64_t Partitions(int64_t rows, int64_t bytes_per_row) {
  // Below kMinParallelBytes handing work to another thread costs more than it saves.
  constexpr int64_t kMinParallelBytes = 4 * 1024 * 1024;
  constexpr int64_t kBytesPerPartition = 512 * 1024;
  if (rows * bytes_per_row < kMinParallelBytes) return 1;
  int64_t by_size = (rows * bytes_per_row) / kBytesPerPartition;
  return std::clamp<int64_t>(by_size, 1, std::min<int64_t>(rows, 16));
}

// The longest stretch of values summed in float32 before the sum moves to float64.
constexpr int64_t kRunBlock = 4096;

int64_t ChunkRows(int64_t bytes_per_row) {
  constexpr int64_t kChunkBytes = 32 * 1024;
  return std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(bytes_per_row, 1), 1, 256);
}

// Chan et al.: merges (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a).
inline void Merge(double n_a, double& mean_a, double& m2_a, double n_b, double mean_b,
                  double m2_b) {
  double n = n_a + n_b;
  double delta = mean_b - mean_a;
  mean_a += delta * (n_b / n);
  m2_a += m2_b + delta * delta * (n_a * n_b / n);
}

template <typename T>
void Moments(ffi::ThreadPool& pool, const T* x, int64_t A, int64_t C, int64_t B, float* mean_out,
             float* m2_out) {
  int64_t parts = Partitions(A, C * B * sizeof(T));
  std::vector<double> means(parts * C, 0.0), m2s(parts * C, 0.0), counts(parts, 0.0);
  ParallelFor(pool, parts, [&](int64_t p) {
    int64_t a0 = A * p / parts, a1 = A * (p + 1) / parts;
    double* mean = means.data() + p * C;
    double* m2 = m2s.data() + p * C;
    double n = 0.0;
    if (B == 1) {
      int64_t chunk = ChunkRows(C * sizeof(T));
      std::vector<float> sum(C), dev(C);
      for (int64_t r0 = a0; r0 < a1; r0 += chunk) {
        int64_t r1 = std::min(a1, r0 + chunk);
        float rows = static_cast<float>(r1 - r0);
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * C;
          for (int64_t c = 0; c < C; ++c) sum[c] += Load(row, c);
        }
        for (int64_t c = 0; c < C; ++c) sum[c] /= rows;  // the chunk's mean
        std::fill(dev.begin(), dev.end(), 0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = x + r * C;
          for (int64_t c = 0; c < C; ++c) {
            float d = Load(row, c) - sum[c];
            dev[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) Merge(n, mean[c], m2[c], rows, sum[c], dev[c]);
        n += rows;
      }
    } else {
      // Each run of B values is taken in blocks short enough for float32 sums, merged in float64.
      for (int64_t a = a0; a < a1; ++a) {
        for (int64_t c = 0; c < C; ++c) {
          const T* run = x + (a * C + c) * B;
          double run_n = 0.0, run_mean = 0.0, run_m2 = 0.0;
          for (int64_t b0 = 0; b0 < B; b0 += kRunBlock) {
            int64_t len = std::min(kRunBlock, B - b0);
            const T* block = run + b0;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t b = 0; b < len; ++b) s += Load(block, b);
            float block_mean = s / static_cast<float>(len);
            float q = 0.0f;
#pragma omp simd reduction(+ : q)
            for (int64_t b = 0; b < len; ++b) {
              float d = Load(block, b) - block_mean;
              q += d * d;
            }
            Merge(run_n, run_mean, run_m2, static_cast<double>(len), block_mean, q);
            run_n += static_cast<double>(len);
          }
          Merge(n, mean[c], m2[c], run_n, run_mean, run_m2);
        }
        n += static_cast<double>(B);
      }
    }
    counts[p] = n;
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = counts[0], mean = means[c], m2 = m2s[c];
    for (int64_t p = 1; p < parts; ++p) {
      Merge(n, mean, m2, counts[p], means[p * C + c], m2s[p * C + c]);
      n += counts[p];
    }
    mean_out[c] = static_cast<float>(mean);
    m2_out[c] = static_cast<float>(m2);
  }
}

template <typename T>
void BackwardSums(ffi::ThreadPool& pool, const T* x, const T* g, const float* mu, int64_t A,
                  int64_t C, int64_t B, float* sum_g_out, float* sum_gc_out) {
  int64_t parts = Partitions(A, 2 * C * B * sizeof(T));
  std::vector<double> sg(parts * C, 0.0), sgc(parts * C, 0.0);
  ParallelFor(pool, parts, [&](int64_t p) {
    int64_t a0 = A * p / parts, a1 = A * (p + 1) / parts;
    double* total_g = sg.data() + p * C;
    double* total_gc = sgc.data() + p * C;
    if (B == 1) {
      int64_t chunk = ChunkRows(2 * C * sizeof(T));
      std::vector<float> s(C), sc(C);
      for (int64_t r0 = a0; r0 < a1; r0 += chunk) {
        int64_t r1 = std::min(a1, r0 + chunk);
        std::fill(s.begin(), s.end(), 0.0f);
        std::fill(sc.begin(), sc.end(), 0.0f);
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = x + r * C;
          const T* gr = g + r * C;
          for (int64_t c = 0; c < C; ++c) {
            float gv = Load(gr, c);
            s[c] += gv;
            sc[c] += gv * (Load(xr, c) - mu[c]);
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          total_g[c] += s[c];
          total_gc[c] += sc[c];
        }
      }
    } else {
      for (int64_t a = a0; a < a1; ++a) {
        for (int64_t c = 0; c < C; ++c) {
          const T* xr = x + (a * C + c) * B;
          const T* gr = g + (a * C + c) * B;
          float m = mu[c];
          for (int64_t b0 = 0; b0 < B; b0 += kRunBlock) {
            int64_t b1 = std::min(B, b0 + kRunBlock);
            float s = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : s, sc)
            for (int64_t b = b0; b < b1; ++b) {
              float gv = Load(gr, b);
              s += gv;
              sc += gv * (Load(xr, b) - m);
            }
            total_g[c] += s;
            total_gc[c] += sc;
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0, sc = 0.0;
    for (int64_t p = 0; p < parts; ++p) {
      s += sg[p * C + c];
      sc += sgc[p * C + c];
    }
    sum_g_out[c] = static_cast<float>(s);
    sum_gc_out[c] = static_cast<float>(sc);
  }
}

// The whole single-device backward: the two sums, then in the same call
//   dx = gain * g + offset + slope * (x - mu),
//   offset = offset0 - mean_coef * sum_g,   slope = slope0 - proj_coef * sum_gc,
// with mean_coef = gain / m, proj_coef = gain * inv_std^2 / m, and offset0 and slope0 the terms from
// the statistics' own cotangents.
template <typename T>
void Backward(ffi::ThreadPool& pool, const T* x, const T* g, const float* mu, const float* gain,
              const float* mean_coef, const float* proj_coef, const float* offset0,
              const float* slope0, int64_t A, int64_t C, int64_t B, T* dx, float* sum_g,
              float* sum_gc) {
  BackwardSums(pool, x, g, mu, A, C, B, sum_g, sum_gc);
  std::vector<float> offset(C), slope(C);
  for (int64_t c = 0; c < C; ++c) {
    offset[c] = offset0[c] - mean_coef[c] * sum_g[c];
    slope[c] = slope0[c] - proj_coef[c] * sum_gc[c];
  }
  int64_t parts = Partitions(A, 3 * C * B * sizeof(T));
  ParallelFor(pool, parts, [&](int64_t p) {
    int64_t a0 = A * p / parts, a1 = A * (p + 1) / parts;
    for (int64_t a = a0; a < a1; ++a) {
      if (B == 1) {
        const T* xr = x + a * C;
        const T* gr = g + a * C;
        T* dr = dx + a * C;
        for (int64_t c = 0; c < C; ++c) {
          Store(dr, c, gain[c] * Load(gr, c) + offset[c] + slope[c] * (Load(xr, c) - mu[c]));
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const T* xr = x + (a * C + c) * B;
          const T* gr = g + (a * C + c) * B;
          T* dr = dx + (a * C + c) * B;
          float k = gain[c], o = offset[c], sl = slope[c], mc = mu[c];
          for (int64_t b = 0; b < B; ++b) Store(dr, b, k * Load(gr, b) + o + sl * (Load(xr, b) - mc));
        }
      }
    }
  });
}

// Calls fn with a null pointer of the element type that holds x's values: float for float32, uint16_t
// (the bits) for bfloat16. CheckInput has admitted no other type.
template <typename Fn>
void WithElementType(ffi::DataType type, Fn fn) {
  if (type == ffi::DataType::F32) {
    fn(static_cast<float*>(nullptr));
  } else {
    fn(static_cast<uint16_t*>(nullptr));
  }
}

ffi::Error CheckInput(const ffi::AnyBuffer& x, const char* name) {
  if (x.dimensions().size() != 3) {
    return ffi::Error::InvalidArgument(std::string(name) + " must be viewed as [A, C, B]");
  }
  if (x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(std::string(name) + " must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error MomentsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::Result<ffi::BufferR1<ffi::F32>> mean,
                       ffi::Result<ffi::BufferR1<ffi::F32>> m2) {
  if (ffi::Error e = CheckInput(x, "x"); e.failure()) return e;
  auto d = x.dimensions();
  WithElementType(x.element_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Moments(pool, static_cast<const T*>(x.untyped_data()), d[0], d[1], d[2], mean->typed_data(),
            m2->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                            ffi::BufferR1<ffi::F32> mu,
                            ffi::Result<ffi::BufferR1<ffi::F32>> sum_g,
                            ffi::Result<ffi::BufferR1<ffi::F32>> sum_gc) {
  if (ffi::Error e = CheckInput(x, "x"); e.failure()) return e;
  if (ffi::Error e = CheckInput(g, "g"); e.failure()) return e;
  if (x.element_type() != g.element_type()) {
    return ffi::Error::InvalidArgument("x and g must have the same dtype");
  }
  auto d = x.dimensions();
  WithElementType(x.element_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    BackwardSums(pool, static_cast<const T*>(x.untyped_data()), static_cast<const T*>(g.untyped_data()),
                 mu.typed_data(), d[0], d[1], d[2], sum_g->typed_data(), sum_gc->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                        ffi::BufferR1<ffi::F32> mu, ffi::BufferR1<ffi::F32> gain,
                        ffi::BufferR1<ffi::F32> mean_coef, ffi::BufferR1<ffi::F32> proj_coef,
                        ffi::BufferR1<ffi::F32> offset0, ffi::BufferR1<ffi::F32> slope0,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::BufferR1<ffi::F32>> sum_g,
                        ffi::Result<ffi::BufferR1<ffi::F32>> sum_gc) {
  if (ffi::Error e = CheckInput(x, "x"); e.failure()) return e;
  if (ffi::Error e = CheckInput(g, "g"); e.failure()) return e;
  if (x.element_type() != g.element_type() || dx->element_type() != x.element_type()) {
    return ffi::Error::InvalidArgument("x, g and dx must have the same dtype");
  }
  auto d = x.dimensions();
  WithElementType(x.element_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Backward(pool, static_cast<const T*>(x.untyped_data()), static_cast<const T*>(g.untyped_data()),
             mu.typed_data(), gain.typed_data(), mean_coef.typed_data(), proj_coef.typed_data(),
             offset0.typed_data(), slope0.typed_data(), d[0], d[1], d[2],
             static_cast<T*>(dx->untyped_data()), sum_g->typed_data(), sum_gc->typed_data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnjaxBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::BufferR1<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnjaxMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::BufferR1<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BnjaxBackwardSums, BackwardSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::BufferR1<ffi::F32>>());
