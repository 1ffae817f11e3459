// One decode step of GPT-2 in one call: each of B sequences appends one token and gets the
// logits for the next, through every block, with the KV cache.
//
// Why in C++: a step of the Python model is ~150 small operations, each a few microseconds of
// Python and dispatch around a kernel that, for one row, takes about as long; at GPT-2 124M in
// int8 the weights are read in a few milliseconds and the Python around them was a large share
// of the step (bench/NOTES.md). This is the same computation as gpt2.model.GPT.forward with a
// cache, in the same order and with the same roundings: activations are float32, rounded to
// bfloat16 after every operation that rounds in the Python model when the model is bfloat16
// (embedding sum, LayerNorm, each product, attention's output, GELU, each residual sum);
// attention runs in float32 over the float32 cache; the logits stay float32.
//
// The products are the kernels of kernels.h, threads taking blocks of weight rows; attention
// takes (sequence, head) pairs per thread. Everything else is per row and tiny.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/softmax.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

using namespace gpt2;
using Weights = c10::List<c10::optional<at::Tensor>>;

enum class Kind { f32, bf16, int8 };

// float32 to the nearest bfloat16 (ties to even), as c10::BFloat16 rounds, written so that
// loops over arrays vectorize (a bf16 model rounds every activation, many times a step).
inline float round_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t out = v != v ? 0x7FC00000u : rounded;  // NaN stays NaN
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

inline void round_bf16(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// A scratch array on torch's allocator, which aligns to 64 bytes: the kernels' 64-byte loads of
// activations then never straddle two cache lines (std::vector aligns to 16).
template <typename T>
struct Scratch {
  at::Tensor t;
  T* p;
  explicit Scratch(int64_t n)
      : t(at::empty({n * static_cast<int64_t>(sizeof(T))}, at::TensorOptions().dtype(at::kByte))),
        p(reinterpret_cast<T*>(t.data_ptr<uint8_t>())) {}
  T* data() { return p; }
  T& operator[](int64_t i) { return p[i]; }
};

// float32 (values) or bfloat16 (storage) of a parameter vector, read as float32.
std::vector<float> floats(const c10::optional<at::Tensor>& t, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (t) {
    at::Tensor f = t->to(at::kFloat).contiguous();
    std::memcpy(out.data(), f.data_ptr<float>(), n * sizeof(float));
  }
  return out;
}

struct Linear {
  at::Tensor w;      // (N, K): float32, bfloat16 or uint8 (int8 + 128)
  at::Tensor scale;  // int8: (N,) float32
  std::vector<float> bias;
  bool has_bias = false;
  int64_t N = 0, K = 0;
};

struct Norm {
  std::vector<float> w, b;
};

struct Model {
  Kind kind;
  int64_t n_layer, n_head, C, V;
  float eps;
  std::vector<Norm> ln1, ln2;
  std::vector<Linear> attn, proj, fc, mproj;
  at::Tensor wte, wpe;  // (V, C), (block, C) in the model's dtype
  Norm lnf;
  Linear head;
};

Linear linear_of(const Weights& w, int64_t i) {
  Linear L;
  L.w = w.get(i).value();
  TORCH_CHECK(L.w.is_contiguous() && L.w.dim() == 2, "weights must be contiguous (N, K)");
  L.N = L.w.size(0);
  L.K = L.w.size(1);
  if (w.get(i + 1)) L.scale = w.get(i + 1).value().contiguous();
  L.has_bias = w.get(i + 2).has_value();
  L.bias = floats(w.get(i + 2), L.N, 0.f);
  return L;
}

Norm norm_of(const Weights& w, int64_t i, int64_t C) {
  return Norm{floats(w.get(i), C, 1.f), floats(w.get(i + 1), C, 0.f)};
}

// The flat list of gpt2.native_step.flat_weights: 16 entries per layer, then 7.
Model model_of(const Weights& w, int64_t n_layer, int64_t n_head, double eps) {
  Model m;
  m.n_layer = n_layer;
  m.n_head = n_head;
  m.eps = static_cast<float>(eps);
  const int64_t top = n_layer * 16;
  m.wte = w.get(top).value().contiguous();
  m.wpe = w.get(top + 1).value().contiguous();
  m.C = m.wte.size(1);
  for (int64_t l = 0; l < n_layer; ++l) {
    const int64_t i = l * 16;
    m.ln1.push_back(norm_of(w, i, m.C));
    m.attn.push_back(linear_of(w, i + 2));
    m.proj.push_back(linear_of(w, i + 5));
    m.ln2.push_back(norm_of(w, i + 8, m.C));
    m.fc.push_back(linear_of(w, i + 10));
    m.mproj.push_back(linear_of(w, i + 13));
  }
  m.lnf = norm_of(w, top + 2, m.C);
  m.head = linear_of(w, top + 4);
  m.V = m.head.N;
  const auto t = m.attn[0].w.scalar_type();
  m.kind = t == at::kFloat ? Kind::f32 : t == at::kBFloat16 ? Kind::bf16 : Kind::int8;
  TORCH_CHECK(m.kind != Kind::int8 || t == at::kByte, "unsupported weight dtype ", t);
  return m;
}

// y (B, N) = x (B, K) W^T + b, x float32 (bf16 values for a bf16 model); y rounded to bf16
// unless float_out.
void product(const Model& m, const Linear& L, const float* x, int64_t B, float* y,
             bool float_out) {
  const int64_t N = L.N, K = L.K;
  const float* bias = L.has_bias ? L.bias.data() : nullptr;
  if (m.kind == Kind::int8) {
    Scratch<int8_t> q(B * K);
    std::vector<float> xs(B);
    std::vector<int32_t> off(B);
    for (int64_t b = 0; b < B; ++b) xs[b] = quantize_row(x + b * K, K, q.data() + b * K, &off[b]);
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
      rows_int8(q.data(), xs.data(), off.data(), B, K, L.w.data_ptr<uint8_t>(),
                L.scale.data_ptr<float>(), bias, n0, n1, y, N);
    });
    return;
  }
  const bool round = m.kind == Kind::bf16 && !float_out;
  auto store = [&](int64_t r, int64_t n, float v) {
    v = bias ? v + bias[n] : v;
    y[r * N + n] = round ? round_bf16(v) : v;
  };
  if (m.kind == Kind::f32) {
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
      rows_float(x, B, K, L.w.data_ptr<float>(), n0, n1, store);
    });
    return;
  }
  Scratch<uint16_t> xb(B * K);  // the bf16 values exactly: their top 16 bits
  for (int64_t i = 0; i < B * K; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    xb[i] = static_cast<uint16_t>(bits >> 16);
  }
  const auto* wp = reinterpret_cast<const uint16_t*>(L.w.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    rows_float(xb.data(), B, K, wp, n0, n1, store);
  });
}

// torch.layer_norm's arithmetic: mean and biased variance in float32, then (x - mean) * rstd.
void layer_norm(const Model& m, const Norm& n, const float* x, int64_t B, float* y) {
  const int64_t C = m.C;
  const float* w = n.w.data();
  const float* bias = n.b.data();
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * C;
    float* yr = y + b * C;
    float mean = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < C; ++c) mean += xr[c];
    mean /= static_cast<float>(C);
    float var = 0.f;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    var /= static_cast<float>(C);
    const float rstd = 1.f / std::sqrt(var + m.eps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yr[c] = (xr[c] - mean) * rstd * w[c] + bias[c];
  }
  if (m.kind == Kind::bf16) round_bf16(y, B * C);
}

// GELU, tanh form (GPT-2's), by ATen's own vectorized kernel: the Python model's numbers.
void gelu(const Model& m, float* x, int64_t n) {
  at::Tensor t = at::from_blob(x, {n}, at::TensorOptions().dtype(at::kFloat));
  at::gelu_(t, "tanh");
  if (m.kind == Kind::bf16) round_bf16(x, n);
}

void add_into(const Model& m, float* x, const float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] += d[i];
  if (m.kind == Kind::bf16) round_bf16(x, n);
}

struct Rows {
  const int64_t* row;    // cache row of each sequence
  const int64_t* write;  // cache index its new token goes to
  const int64_t* start;  // first cache index it attends to (left padding before)
};

// Keys and values in the cache: float32, or bfloat16 (a bfloat16 model's, whose keys and values
// are bf16 values already; an int8 model's, rounded as its Python attention rounds them).
inline float cached(const float* p, int64_t i) { return p[i]; }
inline float cached(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

// q . k and out += w v for one key or value of head size n. Written with the vector
// instructions: the compiler, keeping float32's order of operations, would sum the lanes of
// a vectorized dot product one by one.
inline float qk(const float* q, const float* k, int64_t n) { return dot_f32(q, k, n); }

inline float qk(const float* q, const uint16_t* k, int64_t n) {
  int64_t c = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a = _mm512_setzero_ps();
  for (; c + 16 <= n; c += 16) {
    const __m512i k16 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + c)));
    a = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_castsi512_ps(_mm512_slli_epi32(k16, 16)), a);
  }
  s = _mm512_reduce_add_ps(a);
#endif
  for (; c < n; ++c) s += q[c] * bf16_to_float(k[c]);
  return s;
}

template <typename T>
inline void add_scaled(float* out, float w, const T* v, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] += w * cached(v, c);
}
inline void put(float* p, const float* v, int64_t n) { std::memcpy(p, v, n * sizeof(float)); }
inline void put(uint16_t* p, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {  // rounded (a bfloat16 model's values are bf16 already)
    const float r = round_bf16(v[i]);
    uint32_t bits;
    std::memcpy(&bits, &r, sizeof bits);
    p[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// The new keys and values into the cache, then softmax(q k^T / sqrt(hs)) v for each sequence
// and head over cache indices start..write, in float32; y (B, C). Three passes, each over
// (sequence, head) pairs: the scores, one softmax over all of them (ATen's, vectorized; keys a
// sequence does not see are -inf), the weighted sum of values.
template <typename T>
void attention(const Model& m, int64_t layer, const float* qkv, int64_t B, const Rows& r,
               T* kp, T* vp, int64_t R, int64_t T_len, float* y) {
  const int64_t C = m.C, nh = m.n_head, hs = C / nh;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  int64_t L = 0;  // keys in the longest row: scores are (B * nh, L), left-aligned at start
  for (int64_t b = 0; b < B; ++b) L = std::max(L, r.write[b] - r.start[b] + 1);
  at::Tensor scores = at::empty({B * nh, L}, at::TensorOptions().dtype(at::kFloat));
  float* sp = scores.data_ptr<float>();
  auto cache_at = [&](int64_t b, int64_t h) {
    return (((layer * R) + r.row[b]) * nh + h) * T_len * hs;
  };
  at::parallel_for(0, B * nh, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / nh, h = p % nh, base = cache_at(b, h);
      const float* q = qkv + b * 3 * C + h * hs;
      put(kp + base + r.write[b] * hs, q + C, hs);
      put(vp + base + r.write[b] * hs, q + 2 * C, hs);
      const int64_t lo = r.start[b], n = r.write[b] - lo + 1;
      float* row = sp + p * L;
      for (int64_t t = 0; t < n; ++t) row[t] = qk(q, kp + base + (lo + t) * hs, hs) * scale;
      std::fill(row + n, row + L, -INFINITY);
    }
  });
  scores = at::softmax(scores, -1);
  sp = scores.data_ptr<float>();
  at::parallel_for(0, B * nh, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / nh, h = p % nh, base = cache_at(b, h);
      const int64_t lo = r.start[b], n = r.write[b] - lo + 1;
      const float* w = sp + p * L;
      float* out = y + b * C + h * hs;
      std::fill(out, out + hs, 0.f);
      for (int64_t t = 0; t < n; ++t) add_scaled(out, w[t], vp + base + (lo + t) * hs, hs);
      if (m.kind == Kind::bf16) round_bf16(out, hs);
    }
  });
}

void attention(const Model& m, int64_t layer, const float* qkv, int64_t B, const Rows& r,
               at::Tensor& kc, at::Tensor& vc, float* y) {
  const int64_t R = kc.size(1), T = kc.size(3);
  if (kc.scalar_type() == at::kBFloat16) {
    attention(m, layer, qkv, B, r, reinterpret_cast<uint16_t*>(kc.data_ptr<at::BFloat16>()),
              reinterpret_cast<uint16_t*>(vc.data_ptr<at::BFloat16>()), R, T, y);
  } else {
    attention(m, layer, qkv, B, r, kc.data_ptr<float>(), vc.data_ptr<float>(), R, T, y);
  }
}

float read(const at::Tensor& t, int64_t i) {
  if (t.scalar_type() == at::kBFloat16) {
    return static_cast<float>(t.data_ptr<at::BFloat16>()[i]);
  }
  return t.data_ptr<float>()[i];
}

// The model's tensors, gathered once (`gpt2.native_step.NativeDecodeStep` makes one), and its
// step: logits (B, V) float32 for B sequences, each continuing cache row rows[b] by ids[b].
struct DecodeModel : torch::CustomClassHolder {
  Model m;
  std::vector<c10::optional<at::Tensor>> keep;  // the tensors m reads stay alive

  DecodeModel(Weights weights, int64_t n_layer, int64_t n_head, double eps)
      : m(model_of(weights, n_layer, n_head, eps)) {
    for (const auto& w : weights) keep.push_back(w);
  }

  at::Tensor step(const at::Tensor& ids, const at::Tensor& pos, const at::Tensor& rows,
                  const at::Tensor& write, const at::Tensor& start, at::Tensor k_cache,
                  at::Tensor v_cache) {
    const auto ct = k_cache.scalar_type();
    TORCH_CHECK((ct == at::kFloat || ct == at::kBFloat16) &&
                    v_cache.scalar_type() == ct && k_cache.is_contiguous() &&
                    v_cache.is_contiguous() && k_cache.dim() == 5,
                "the cache must be contiguous float32 or bfloat16 "
                "(n_layer, rows, n_head, max_len, head_size)");
    const int64_t B = ids.numel(), C = m.C;
    for (auto* t : {&ids, &pos, &rows, &write, &start}) {
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == B,
                  "ids, positions and cache indices: one int64 per sequence");
    }
    const Rows r{rows.data_ptr<int64_t>(), write.data_ptr<int64_t>(), start.data_ptr<int64_t>()};
    Scratch<float> x(B * C), h(B * C), qkv(B * 3 * C), a(B * C), f(B * 4 * C);
    const int64_t* idp = ids.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const float v = read(m.wte, idp[b] * C + c) + read(m.wpe, pp[b] * C + c);
        x[b * C + c] = m.kind == Kind::bf16 ? round_bf16(v) : v;
      }
    }
    for (int64_t l = 0; l < m.n_layer; ++l) {
      layer_norm(m, m.ln1[l], x.data(), B, h.data());
      product(m, m.attn[l], h.data(), B, qkv.data(), false);
      attention(m, l, qkv.data(), B, r, k_cache, v_cache, a.data());
      product(m, m.proj[l], a.data(), B, h.data(), false);
      add_into(m, x.data(), h.data(), B * C);
      layer_norm(m, m.ln2[l], x.data(), B, h.data());
      product(m, m.fc[l], h.data(), B, f.data(), false);
      gelu(m, f.data(), B * 4 * C);
      product(m, m.mproj[l], f.data(), B, h.data(), false);
      add_into(m, x.data(), h.data(), B * C);
    }
    layer_norm(m, m.lnf, x.data(), B, h.data());
    at::Tensor logits = at::empty({B, m.V}, ids.options().dtype(at::kFloat));
    product(m, m.head, h.data(), B, logits.data_ptr<float>(), true);
    return logits;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(gpt2, m) {
  m.class_<DecodeModel>("DecodeModel")
      .def(torch::init<Weights, int64_t, int64_t, double>())
      .def("step", &DecodeModel::step);
}
