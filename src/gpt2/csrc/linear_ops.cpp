// Products of a few rows of activations with a weight matrix, for decoding on the CPU.
//
// Decoding multiplies one row (or a few: a batch of sequences) by every weight once per token,
// so its speed is the speed of reading the weights from memory. torch's kernels read a one-row
// product's weight well below that speed in bfloat16 and int8 (bench/NOTES.md, "Decoding
// against llama.cpp"); these loops stream each thread's share of the rows.
//
// Every weight is (N, K), row-major, as nn.Linear stores it: output n is a dot product of the
// input rows with weight row n. Threads take contiguous blocks of rows; each weight row is read
// from memory once for all the input rows. Each output is a float32 sum in an order that does not
// depend on the number of rows or threads, so a row's result never depends on its batch.
//
// - float32: fused multiply-adds.
// - bfloat16: pairs of bf16 products summed into float32 (AVX512-BF16's vdpbf16ps where the CPU
//   has it); the output is float32 or rounded once to bfloat16 (round to nearest even).
// - int8: weights quantized per output row (scale, values -127..127, stored plus 128 as uint8),
//   each input row quantized on the fly to -127..127 with its own scale; the integer dot product
//   is exact (AVX512-VNNI's vpdpbusd where the CPU has it), then scaled.
//
// Loops without those instructions are plain C++ that the compiler vectorizes; they give the same
// float32 results up to the order of the sum, and exactly the same int8 results.
// Only the headers used: all of ATen.h doubles the build (bench/NOTES.md).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

using namespace gpt2;

void check_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gpt2 kernels run on the CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "expected x (M, K) and w (N, K), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  if (b) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->is_contiguous(),
                "bias must be a contiguous (N,) vector");
  }
}

// y = x w^T + b for float32 or bfloat16 x and w (the same dtype); the bias is float32 or the
// weight's dtype; y is float32 if out_float, else x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                  bool out_float) {
  check_linear(x, w, b);
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must have the same dtype");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == at::kFloat, "float32 or bfloat16 only");
  const auto out_type = out_float ? at::kFloat : x.scalar_type();
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_type));
  at::Tensor bias32;
  if (b) bias32 = b->to(at::kFloat).contiguous();
  const float* bp = b ? bias32.data_ptr<float>() : nullptr;
  if (out_type == at::kFloat) {
    float* yp = y.data_ptr<float>();
    auto store = [&](int64_t m, int64_t n, float v) { yp[m * N + n] = bp ? v + bp[n] : v; };
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
      if (bf16) {
        rows_float(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K,
                   reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), n0, n1, store);
      } else {
        rows_float(x.data_ptr<float>(), M, K, w.data_ptr<float>(), n0, n1, store);
      }
    });
  } else {
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    auto store = [&](int64_t m, int64_t n, float v) {
      yp[m * N + n] = c10::BFloat16(bp ? v + bp[n] : v);  // round to nearest even, once
    };
    at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
      rows_float(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K,
                 reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), n0, n1, store);
    });
  }
  return y;
}

// Each row of x (float32) quantized by `quantize_row`: (q int8, scale (M,), 128 * sum(q) (M,)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "expected a contiguous float32 (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options());
  at::Tensor offset = at::empty({M}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  int32_t* op = offset.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) sp[m] = quantize_row(xp + m * K, K, qp + m * K, op + m);
  });
  return {q, scale, offset};
}

// y = (x quantized per row) (w_q)^T, scaled by both scales, + b; float32 in and out.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& b) {
  check_linear(x, w, b);
  TORCH_CHECK(w.scalar_type() == at::kByte, "int8 weights are stored as uint8 (value + 128)");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == w.size(0),
              "one float32 scale per weight row");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto [q, scale, offset] = quantize_rows(x.to(at::kFloat).contiguous());
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  at::Tensor bias32;
  if (b) bias32 = b->to(at::kFloat).contiguous();
  const float* bp = b ? bias32.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, grain(N), [&](int64_t n0, int64_t n1) {
    rows_int8(q.data_ptr<int8_t>(), scale.data_ptr<float>(), offset.data_ptr<int32_t>(), M, K,
              w.data_ptr<uint8_t>(), w_scale.data_ptr<float>(), bp, n0, n1,
              y.data_ptr<float>(), N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt2, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? b, bool out_float) -> Tensor", linear);
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor, Tensor)", quantize_rows);
  m.def("linear_int8(Tensor x, Tensor w, Tensor w_scale, Tensor? b) -> Tensor", linear_int8);
}
