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
// of a few KB each; bench/NOTES.md). The same loop as one row of a batch's tile below, so a
// sequence's decode step does not depend on which others share it (its prefill may: more than
// a few rows go through torch's own products).

inline float dot_f32(const float* x, const float* w, int64_t K);
inline float dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K);
inline int32_t dot_i8(const int8_t* x, const uint8_t* w, int64_t K);

// ---- a tile: RX input rows with RW weight rows ---------------------------------------------
// For a batch, each piece of a weight row is loaded once into a register for all RX input rows
// (RX multiply-adds into RX accumulators), rather than once per input row.

// float32 keeps four accumulators a row (one core reads about 20% faster than with one: the
// multiply-add's latency); bfloat16 and int8 do more work per instruction and need one.
template <int RX, int RW>
inline void tile_f32(const float* x, const float* w, int64_t K, float out[RX][RW]) {
  int64_t k = 0;
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) out[i][j] = 0.f;
#if defined(__AVX512F__)
  constexpr int A = 4;
  __m512 a[RX][RW][A];
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j)
      for (int c = 0; c < A; ++c) a[i][j][c] = _mm512_setzero_ps();
  for (; k + 16 * A <= K; k += 16 * A) {
    for (int c = 0; c < A; ++c) {
      __m512 wv[RW];
      for (int j = 0; j < RW; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k + 16 * c);
      for (int i = 0; i < RX; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * K + k + 16 * c);
        for (int j = 0; j < RW; ++j) a[i][j][c] = _mm512_fmadd_ps(xv, wv[j], a[i][j][c]);
      }
    }
  }
  for (; k + 16 <= K; k += 16) {
    __m512 wv[RW];
    for (int j = 0; j < RW; ++j) wv[j] = _mm512_loadu_ps(w + j * K + k);
    for (int i = 0; i < RX; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < RW; ++j) a[i][j][0] = _mm512_fmadd_ps(xv, wv[j], a[i][j][0]);
    }
  }
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) {
      const __m512 s01 = _mm512_add_ps(a[i][j][0], a[i][j][1]);
      const __m512 s23 = _mm512_add_ps(a[i][j][2], a[i][j][3]);
      out[i][j] = _mm512_reduce_add_ps(_mm512_add_ps(s01, s23));
    }
#endif
  for (; k < K; ++k)
    for (int i = 0; i < RX; ++i)
      for (int j = 0; j < RW; ++j) out[i][j] += x[i * K + k] * w[j * K + k];
}

template <int RX, int RW>
inline void tile_bf16(const uint16_t* x, const uint16_t* w, int64_t K, float out[RX][RW]) {
  int64_t k = 0;
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) out[i][j] = 0.f;
#if defined(__AVX512BF16__)
  __m512 a[RX][RW];
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) a[i][j] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[RW];
    for (int j = 0; j < RW; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
    for (int i = 0; i < RX; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * K + k);
      for (int j = 0; j < RW; ++j) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) out[i][j] = _mm512_reduce_add_ps(a[i][j]);
#endif
  for (; k < K; ++k)
    for (int i = 0; i < RX; ++i)
      for (int j = 0; j < RW; ++j) out[i][j] += bf16_to_float(x[i * K + k]) * bf16_to_float(w[j * K + k]);
}

template <int RX, int RW>
inline void tile_i8(const int8_t* x, const uint8_t* w, int64_t K, int32_t out[RX][RW]) {
  int64_t k = 0;
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) out[i][j] = 0;
#if defined(__AVX512VNNI__)
  __m512i a[RX][RW];
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) a[i][j] = _mm512_setzero_si512();
  for (; k + 64 <= K; k += 64) {
    __m512i wv[RW];
    for (int j = 0; j < RW; ++j) wv[j] = _mm512_loadu_si512(w + j * K + k);
    for (int i = 0; i < RX; ++i) {
      const __m512i xv = _mm512_loadu_si512(x + i * K + k);
      for (int j = 0; j < RW; ++j) a[i][j] = _mm512_dpbusd_epi32(a[i][j], wv[j], xv);
    }
  }
  for (int i = 0; i < RX; ++i)
    for (int j = 0; j < RW; ++j) out[i][j] = _mm512_reduce_add_epi32(a[i][j]);
#endif
  for (; k < K; ++k)
    for (int i = 0; i < RX; ++i)
      for (int j = 0; j < RW; ++j) out[i][j] += static_cast<int32_t>(w[j * K + k]) * x[i * K + k];
}

inline float dot_f32(const float* x, const float* w, int64_t K) {
  float out[1][1];
  tile_f32<1, 1>(x, w, K, out);
  return out[0][0];
}

inline float dot_bf16(const uint16_t* x, const uint16_t* w, int64_t K) {
  float out[1][1];
  tile_bf16<1, 1>(x, w, K, out);
  return out[0][0];
}

// int8: x quantized (signed), w stored as unsigned w + 128. The sum of u8 * s8 products is the
// true sum plus 128 * sum(x), which the caller subtracts. Exact in any order.
inline int32_t dot_i8(const int8_t* x, const uint8_t* w, int64_t K) {
  int32_t out[1][1];
  tile_i8<1, 1>(x, w, K, out);
  return out[0][0];
}

constexpr int kTile = 8;  // input rows per pass over one weight row (float32: 4, its registers)

template <int RX, typename X, typename W, typename A>
inline void tile(const X* x, const W* w, int64_t K, A* out) {
  A t[RX][1];
  if constexpr (std::is_same_v<X, float>) {
    tile_f32<RX, 1>(x, w, K, t);
  } else if constexpr (std::is_same_v<X, uint16_t>) {
    tile_bf16<RX, 1>(x, w, K, t);
  } else {
    tile_i8<RX, 1>(x, w, K, t);
  }
  for (int i = 0; i < RX; ++i) out[i] = t[i][0];
}

// out[i] = the product of input row i (i < rx <= kTile) with the weight row w.
template <typename X, typename W, typename A>
inline void tile_any(const X* x, const W* w, int64_t K, int64_t rx, A* out) {
  static_assert(kTile == 8, "the cases below are written out for 8");
  if constexpr (std::is_same_v<X, float>) {  // at most 4 rows (see rows_any)
    switch (rx) {
      case 1: return tile<1>(x, w, K, out);
      case 2: return tile<2>(x, w, K, out);
      case 3: return tile<3>(x, w, K, out);
      default: return tile<4>(x, w, K, out);
    }
  }
  switch (rx) {
    case 1: return tile<1>(x, w, K, out);
    case 2: return tile<2>(x, w, K, out);
    case 3: return tile<3>(x, w, K, out);
    case 4: return tile<4>(x, w, K, out);
    case 5: return tile<5>(x, w, K, out);
    case 6: return tile<6>(x, w, K, out);
    case 7: return tile<7>(x, w, K, out);
    default: return tile<8>(x, w, K, out);
  }
}

// out(m, n) for every input row m < M and weight row n in [n0, n1): `put(m, n, sum)`. The
// weight rows are read one after the other, one stream (see the one-row loops); each is used
// for up to kTile input rows at a time while it is in the L1 cache.
template <typename X, typename W, typename A, typename Put>
void rows_any(const X* x, int64_t M, int64_t K, const W* w, int64_t n0, int64_t n1, Put put) {
  constexpr int64_t rows = std::is_same_v<X, float> ? 4 : kTile;
  A out[kTile];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; m += rows) {
      const int64_t rx = std::min<int64_t>(rows, M - m);
      if (rx == 1) {
        if constexpr (std::is_same_v<X, float>) {
          out[0] = dot_f32(x + m * K, w + n * K, K);
        } else if constexpr (std::is_same_v<X, uint16_t>) {
          out[0] = dot_bf16(x + m * K, w + n * K, K);
        } else {
          out[0] = dot_i8(x + m * K, w + n * K, K);
        }
      } else {
        tile_any(x + m * K, w + n * K, K, rx, out);
      }
      for (int64_t i = 0; i < rx; ++i) put(m + i, n, out[i]);
    }
  }
}

// ---- rows [n0, n1) of the output for M input rows ------------------------------------------

// float32 or bfloat16 weights; `store(m, n, value)` writes one output, bias included.
template <typename T, typename Store>
void rows_float(const T* x, int64_t M, int64_t K, const T* w, int64_t n0, int64_t n1,
                Store store) {
  rows_any<T, T, float>(x, M, K, w, n0, n1, store);
}

inline void rows_int8(const int8_t* xq, const float* x_scale, const int32_t* x_offset, int64_t M,
                      int64_t K, const uint8_t* w, const float* w_scale, const float* bias,
                      int64_t n0, int64_t n1, float* y, int64_t N) {
  auto put = [&](int64_t m, int64_t n, int32_t a) {
    const float v = static_cast<float>(a - x_offset[m]) * x_scale[m] * w_scale[n];
    y[m * N + n] = bias ? v + bias[n] : v;
  };
  rows_any<int8_t, uint8_t, int32_t>(xq, M, K, w, n0, n1, put);
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
  int64_t k = 0;
  float amax = 0.f;
#if defined(__AVX512F__)
  __m512 m = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  amax = _mm512_reduce_max_ps(m);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.f ? 127.f / amax : 1.f;
  int32_t sum = 0;
  k = 0;
#if defined(__AVX512F__)
  const __m512 iv = _mm512_set1_ps(inv);
  __m512i s = _mm512_setzero_si512();
  for (; k + 16 <= K; k += 16) {
    // the current rounding mode, round-half-even by default: what nearbyint does below
    const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), iv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
    s = _mm512_add_epi32(s, v);
  }
  sum = _mm512_reduce_add_epi32(s);
#endif
  for (; k < K; ++k) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[k] * inv));
    q[k] = static_cast<int8_t>(v);
    sum += v;
  }
  *offset = 128 * sum;
  return amax > 0.f ? amax / 127.f : 1.f;
}

}  // namespace gpt2
