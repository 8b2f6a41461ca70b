// The `cpp` backend: CPU forward and backward of fastlora.lora_linear, registered as the CPU
// kernels of fastlora::lora_fwd_cpp / fastlora::lora_bwd_cpp (schema and fake kernels are
// defined in Python, fastlora/ops/schema.py).
//
// Shapes: x (M, K) with any strides; weight (N, K), or (K, N) with fan_in_fan_out; bias (N,);
// A (r, K); B (N, r); S (M, r) float32; y, dy (M, N).
//
// Forward:  per block of rows, in float32: S = drop(x) A^T and y = b + s * S B^T (written
//           into y); then y += x W^T, one ATen GEMM accumulating onto y (beta = 1).
// Backward: per block of rows, in float32: G = dy B, dB += s dy^T S, dA += s G^T drop(x),
//           dx = s (G A) * keep / (1 - p) (written into dx); then dx += dy W, one GEMM.
// Writing the rank-r terms first lets the big GEMM fold them in as it writes its output: no
// extra pass over y or dx, and no M x N temporary besides y.
// drop(x) = x * keep / (1 - p). The forward draws the keep-mask from the seed (philox.h, the
// same numbers as the Triton kernels) and returns it as bits (M x K / 8 bytes) for the
// backward; inside a block it is expanded to multipliers keep / (1 - p). The low-rank terms run in float32 whatever x's dtype, and the
// dA / dB partial sums are one per chunk of rows (at most 16 chunks, whatever the thread
// count), summed in chunk order: the result depends neither on thread timing nor on the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "philox.h"

namespace fastlora {
namespace {

constexpr int64_t kBlockRows = 32;

// The kernels' own ATen calls run below autograd and autocast: they compute what the op's
// contract says, in the dtypes chosen here. The guards are thread-local: set in every worker.
struct KernelDispatchGuard {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

struct Dropout {
  bool active;
  uint64_t seed;
  float p;
  float inv_keep;  // 1 / (1 - p)
};

Dropout dropout_of(const std::optional<at::Tensor>& seed, double dropout_p) {
  if (!seed.has_value() || dropout_p == 0.0) {
    return {false, 0, 0.0f, 1.0f};
  }
  const auto seed_value = static_cast<uint64_t>(seed->item<int64_t>());
  return {true, seed_value, static_cast<float>(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p))};
}

// The number of chunks for_each_row_chunk splits M rows into: at most kMaxRowChunks, never a
// function of the thread count, so the partial sums (and the result's last bits) are the same
// on 1, 2 or 64 threads; the threads share the chunks.
constexpr int64_t kMaxRowChunks = 16;

int64_t row_chunk_count(int64_t M) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxRowChunks, blocks));
}

// Runs body(chunk, row_begin, row_end) for row_chunk_count(M) chunks of whole kBlockRows
// blocks covering [0, M), in parallel; returns the number of chunks.
template <typename Body>
int64_t for_each_row_chunk(int64_t M, const Body& body) {
  const int64_t blocks = (M + kBlockRows - 1) / kBlockRows;
  const int64_t chunks = row_chunk_count(M);
  const int64_t blocks_per_chunk = (blocks + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const KernelDispatchGuard guard;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t row_begin = std::min(M, chunk * blocks_per_chunk * kBlockRows);
      const int64_t row_end = std::min(M, (chunk + 1) * blocks_per_chunk * kBlockRows);
      body(chunk, row_begin, row_end);
    }
  });
  return chunks;
}

// The keep-mask of an (M, K) input as bits, (M, ceil(K / 8)) uint8 (see schema.py), and as
// multipliers keep (rows, K) for a block of rows: 1 / (1 - p) where kept, 0 where dropped.
int64_t keep_bits_per_row(int64_t K) { return (K + 7) / 8; }

// Expands the bits of rows [m0, m0 + rows) into keep.
void load_keep(const Dropout& dropout, int64_t m0, int64_t rows, int64_t K, const at::Tensor& keep_bits, float* keep) {
  const int64_t row_bytes = keep_bits_per_row(K);
  const uint8_t* bits = keep_bits.data_ptr<uint8_t>() + m0 * row_bytes;
  for (int64_t i = 0; i < rows; ++i) {
    expand_keep_bits(bits + i * row_bytes, K, dropout.inv_keep, keep + i * K);
  }
}

// Draws the bits of rows [m0, m0 + rows) into keep_bits (the forward), then expands them.
void draw_keep(const Dropout& dropout, int64_t m0, int64_t rows, int64_t K, at::Tensor& keep_bits, float* keep) {
  const int64_t row_bytes = keep_bits_per_row(K);
  uint8_t* bits = keep_bits.data_ptr<uint8_t>() + m0 * row_bytes;
  for (int64_t i = 0; i < rows; ++i) {
    philox_keep_bits(dropout.seed, (m0 + i) * ((K + 3) / 4), K, dropout.p, bits + i * row_bytes);
  }
  load_keep(dropout, m0, rows, K, keep_bits, keep);
}

// out (rows, K) float32 = x[m0:m0+rows] * keep, or x cast to float32 when keep is null.
template <typename scalar_t>
void fill_dropped_input(const at::Tensor& x, int64_t m0, int64_t rows, const float* keep, float* out) {
  const int64_t K = x.size(1);
  const int64_t stride_xm = x.stride(0);
  const int64_t stride_xk = x.stride(1);
  const scalar_t* x_rows = x.data_ptr<scalar_t>() + m0 * stride_xm;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* x_row = x_rows + i * stride_xm;
    float* out_row = out + i * K;
    if (keep == nullptr) {
      for (int64_t k = 0; k < K; ++k) out_row[k] = static_cast<float>(x_row[k * stride_xk]);
    } else if (stride_xk == 1) {
      const float* keep_row = keep + i * K;
      for (int64_t k = 0; k < K; ++k) out_row[k] = static_cast<float>(x_row[k]) * keep_row[k];
    } else {
      const float* keep_row = keep + i * K;
      for (int64_t k = 0; k < K; ++k) out_row[k] = static_cast<float>(x_row[k * stride_xk]) * keep_row[k];
    }
  }
}

// The float32 LoRA input of rows [m0, m0 + rows): x's rows themselves when x is float32 and
// there is no dropout, else drop(x) written into buffer.
at::Tensor lora_input_rows(const at::Tensor& x, int64_t m0, int64_t rows, const Dropout& dropout,
                           const float* keep, at::Tensor& buffer) {
  if (!dropout.active && x.scalar_type() == at::kFloat) {
    return x.narrow(0, m0, rows);
  }
  at::Tensor out = buffer.narrow(0, 0, rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastlora_dropped_input", [&] {
    fill_dropped_input<scalar_t>(x, m0, rows, dropout.active ? keep : nullptr, out.data_ptr<float>());
  });
  return out;
}

// out (rows, cols), contiguous, = scale * low_rank (* keep) (+ bias), rounded once to out's
// dtype: the rank-r term written first, so that the big GEMM then accumulates onto it.
// bias (cols,) and keep (rows, cols) may be null.
template <typename scalar_t>
void store_low_rank(at::Tensor& out, const at::Tensor& low_rank, float scale, const scalar_t* bias,
                    const float* keep) {
  scalar_t* target = out.data_ptr<scalar_t>();
  const float* term = low_rank.data_ptr<float>();
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = i * cols;
    if (keep != nullptr) {
      for (int64_t j = 0; j < cols; ++j) target[row + j] = static_cast<scalar_t>(scale * term[row + j] * keep[row + j]);
    } else if (bias != nullptr) {
      for (int64_t j = 0; j < cols; ++j) {
        target[row + j] = static_cast<scalar_t>(scale * term[row + j] + static_cast<float>(bias[j]));
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) target[row + j] = static_cast<scalar_t>(scale * term[row + j]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_fwd_cpp(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, bool fan_in_fan_out) {
  const KernelDispatchGuard guard;
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const int64_t r = lora_A.size(0);
  const int64_t N = lora_B.size(0);
  const at::Tensor weight_t = fan_in_fan_out ? weight : weight.t();  // (K, N)
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor S = at::empty({M, r}, x.options().dtype(at::kFloat));
  const at::Tensor A_t = lora_A.to(at::kFloat).t();  // (K, r)
  const at::Tensor B_t = lora_B.to(at::kFloat).t();  // (r, N)
  const Dropout dropout = dropout_of(seed, dropout_p);
  // (M, ceil(K / 8)) with dropout; empty without, as schema.py says
  at::Tensor keep_bits = dropout.active ? at::empty({M, keep_bits_per_row(K)}, x.options().dtype(at::kByte))
                                        : at::empty({0}, x.options().dtype(at::kByte));
  for_each_row_chunk(M, [&](int64_t, int64_t row_begin, int64_t row_end) {
    at::Tensor buffer = at::empty({kBlockRows, K}, x.options().dtype(at::kFloat));
    std::vector<float> keep(dropout.active ? kBlockRows * K : 0);
    for (int64_t m0 = row_begin; m0 < row_end; m0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, row_end - m0);
      if (dropout.active) draw_keep(dropout, m0, rows, K, keep_bits, keep.data());
      const at::Tensor input = lora_input_rows(x, m0, rows, dropout, keep.data(), buffer);
      at::Tensor S_rows = S.narrow(0, m0, rows);
      at::mm_out(S_rows, input, A_t);
      at::Tensor y_rows = y.narrow(0, m0, rows);
      const at::Tensor low_rank = at::mm(S_rows, B_t);  // (rows, N) float32
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastlora_store_y", [&] {
        const scalar_t* bias_values = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
        store_low_rank<scalar_t>(y_rows, low_rank, static_cast<float>(scaling), bias_values, nullptr);
      });
    }
  });
  if (M > 0) y.addmm_(x, weight_t);  // y += x W^T, one GEMM over all rows
  return {y, S, keep_bits};
}

// parts (chunks, ...) summed over chunks one after another, in chunk order (an element-wise
// add per chunk: no reduction whose order could follow the thread count).
at::Tensor sum_of_parts(const at::Tensor& parts) {
  at::Tensor total = parts[0].clone();
  for (int64_t chunk = 1; chunk < parts.size(0); ++chunk) total.add_(parts[chunk]);
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_bwd_cpp(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& S, const at::Tensor& keep_bits, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, bool fan_in_fan_out, bool needs_dx, bool needs_dA,
    bool needs_dB, bool needs_dbias) {
  const KernelDispatchGuard guard;
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = dy.size(1);
  const int64_t r = lora_A.size(0);
  const at::TensorOptions float_options = x.options().dtype(at::kFloat);
  const at::Tensor A = lora_A.to(at::kFloat);  // (r, K)
  const at::Tensor B = lora_B.to(at::kFloat);  // (N, r)
  const Dropout dropout = dropout_of(seed, dropout_p);
  TORCH_CHECK(!dropout.active || (keep_bits.dim() == 2 && keep_bits.size(0) == M &&
                                  keep_bits.size(1) == keep_bits_per_row(K) && keep_bits.is_contiguous()),
              "fastlora::lora_bwd_cpp: keep_bits must be the forward's (", M, ", ", keep_bits_per_row(K),
              ") uint8 keep-mask, got ", keep_bits.sizes());

  at::Tensor dx = needs_dx ? at::empty({M, K}, x.options()) : x.new_empty({0});
  at::Tensor dbias = needs_dbias ? dy.sum(0) : dy.new_empty({0});
  // one float32 partial sum per chunk of rows, summed in chunk order: no dependence on timing
  const int64_t chunks = row_chunk_count(M);
  at::Tensor dA_parts = needs_dA ? at::zeros({chunks, r, K}, float_options) : at::Tensor();
  at::Tensor dB_parts = needs_dB ? at::zeros({chunks, N, r}, float_options) : at::Tensor();

  if (needs_dx || needs_dA || needs_dB) {
    for_each_row_chunk(M, [&](int64_t chunk, int64_t row_begin, int64_t row_end) {
      at::Tensor buffer = at::empty({kBlockRows, K}, float_options);
      std::vector<float> keep(dropout.active ? kBlockRows * K : 0);
      for (int64_t m0 = row_begin; m0 < row_end; m0 += kBlockRows) {
        const int64_t rows = std::min(kBlockRows, row_end - m0);
        const at::Tensor dy_rows = dy.narrow(0, m0, rows).to(at::kFloat);
        if (needs_dB) dB_parts[chunk].addmm_(dy_rows.t(), S.narrow(0, m0, rows));
        if (!needs_dx && !needs_dA) continue;
        const at::Tensor G = at::mm(dy_rows, B);  // (rows, r)
        if (dropout.active) load_keep(dropout, m0, rows, K, keep_bits, keep.data());
        if (needs_dA) {
          dA_parts[chunk].addmm_(G.t(), lora_input_rows(x, m0, rows, dropout, keep.data(), buffer));
        }
        if (needs_dx) {
          at::Tensor dx_rows = dx.narrow(0, m0, rows);
          const at::Tensor low_rank = at::mm(G, A);  // (rows, K) float32
          const float* keep_rows = dropout.active ? keep.data() : nullptr;
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "fastlora_store_dx", [&] {
            store_low_rank<scalar_t>(dx_rows, low_rank, static_cast<float>(scaling), nullptr, keep_rows);
          });
        }
      }
    });
  }
  if (needs_dx && M > 0) dx.addmm_(dy, fan_in_fan_out ? weight.t() : weight);  // dx += dy W, one GEMM
  at::Tensor dA = lora_A.new_empty({0});
  at::Tensor dB = lora_B.new_empty({0});
  if (needs_dA) dA = sum_of_parts(dA_parts).mul_(scaling).to(lora_A.scalar_type());
  if (needs_dB) dB = sum_of_parts(dB_parts).mul_(scaling).to(lora_B.scalar_type());
  return {dx, dA, dB, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("lora_fwd_cpp", &lora_fwd_cpp);
  m.impl("lora_bwd_cpp", &lora_bwd_cpp);
}

}  // namespace fastlora
