// The inner loops of decoding on the CPU, shared by the product ops (linear_ops.cpp) and the
// whole decode step (decode_step.cpp). See linear_ops.cpp for what they compute and why.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gpt2 {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// ---- the dot product of one input row with one weight row ------------------------------------
// One row at a time, in order: each thread reads its block of the weight as one sequential
// stream, which one core reads about twice as fast as eight rows side by side (eight streams
// of a few KB each; bench/NOTES.md). Two accumulators hide the multiply-add's latency.

inline float dot_f32(const float* x, const float* w, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
  }
  for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; k < K; ++k) s += x[k] * w[k];
  return s;
}

inline float dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX512BF16__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(w + k + 32));
  }
  for (; k + 32 <= K; k += 32)
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; k < K; ++k) s += bf16_to_float(x[k]) * bf16_to_float(w[k]);
  return s;
}

// int8: x quantized (signed), w stored as unsigned w + 128. The sum of u8 * s8 products is the
// true sum plus 128 * sum(x), which the caller subtracts. Exact in any order.
inline int32_t dot_i8(const int8_t* x, const uint8_t* w, int64_t K) {
  int64_t k = 0;
  int32_t s = 0;
#if defined(__AVX512VNNI__)
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  for (; k + 128 <= K; k += 128) {
    a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(w + k), _mm512_loadu_si512(x + k));
    a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(w + k + 64), _mm512_loadu_si512(x + k + 64));
  }
  for (; k + 64 <= K; k += 64)
    a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(w + k), _mm512_loadu_si512(x + k));
  s = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
#endif
  for (; k < K; ++k) s += static_cast<int32_t>(w[k]) * x[k];
  return s;
}

// ---- rows [n0, n1) of the output for M input rows ------------------------------------------

// float32 or bfloat16 weights; `store(m, n, value)` writes one output, bias included. Each
// weight row is read once from memory and again from the cache for every further input row.
template <typename T, typename Store>
void rows_float(const T* x, int64_t M, int64_t K, const T* w, int64_t n0, int64_t n1,
                Store store) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      if constexpr (std::is_same_v<T, float>) {
        store(m, n, dot_f32(x + m * K, w + n * K, K));
      } else {
        store(m, n, dot_bf16(x + m * K, w + n * K, K));
      }
    }
  }
}

inline void rows_int8(const int8_t* xq, const float* x_scale, const int32_t* x_offset, int64_t M,
                      int64_t K, const uint8_t* w, const float* w_scale, const float* bias,
                      int64_t n0, int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      const int32_t a = dot_i8(xq + m * K, w + n * K, K) - x_offset[m];
      const float v = static_cast<float>(a) * x_scale[m] * w_scale[n];
      y[m * N + n] = bias ? v + bias[n] : v;
    }
  }
}

// Output rows per thread: an even share of N, so that each thread reads one block of W.
inline int64_t grain(int64_t N) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (N + threads - 1) / threads);
}

// One row of x (float32) to -127..127 with its own scale max|x| / 127 (1 for a zero row):
// q = round-half-even(x * (127 / max|x|)). Returns the scale; *offset = 128 * sum(q), what the
// unsigned weights add to each dot product.
inline float quantize_row(const float* x, int64_t K, int8_t* q, int32_t* offset) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 1.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inv));
    q[k] = static_cast<int8_t>(v);
    sum += v;
  }
  *offset = 128 * sum;
  return amax > 0.f ? amax / 127.f : 1.f;
}

}  // namespace gpt2
