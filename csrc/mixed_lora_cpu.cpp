// The `cpp` backend's mixed batches: every row m of x runs adapter i = index[m] (-1: none) of
// the stacked adapters, registered as the CPU kernels of fastlora::mixed_lora_fwd_cpp /
// mixed_lora_bwd_cpp (schema defined in Python, fastlora/ops/schema.py).
//
// Shapes: x (M, K); A (n, r, K); B (n, N, r); scaling (n,) float32; index (M,) int64; y (M, N),
// holding x W^T + b on entry; S (M, r) float32; dy (M, N).
//
// The rows are sorted by adapter once (a stable sort of the index). An adapter with many rows
// runs as two ATen GEMMs on its gathered rows; the rows of adapters with few rows (decode:
// one or two rows each, where a GEMM call costs more than its arithmetic) run as plain dot
// products, one row per task in parallel, reading x, A_i, B_i and y where they lie. The loop
// over adapters is here in C++, not in Python, and needs no padding.
// The rank-r products run in float32 whatever the dtypes (as the other backends' do).
// Forward:  S_i = s_i x_i A_i^T (float32), y_i += S_i B_i^T (added into the rows of y).
// Backward: G_i = dy_i B_i, dB_i = dy_i^T S_i, dA_i = s_i G_i^T x_i, dx_i = s_i G_i A_i;
//           rows with index -1 get nothing (dx is zero there).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastlora {
namespace {

// An adapter with at most this many rows takes the row-by-row path in the forward.
constexpr int64_t kRowPathMaxRows = 8;
constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorize the dot

float dot(const float* a, const float* b, int64_t length) {
  float partial[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= length; k += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += a[k + lane] * b[k + lane];
  }
  float sum = 0.0f;
  for (; k < length; ++k) sum += a[k] * b[k];
  for (int64_t lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

struct Segments {
  at::Tensor order;            // row numbers sorted by adapter (rows without one first)
  std::vector<int64_t> start;  // adapter i's rows are order[start[i] : start[i + 1]]
};

Segments segments(const at::Tensor& index, int64_t n) {
  Segments result;
  result.order = std::get<1>(at::sort(index, std::optional<bool>(true), /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(index.clamp_min(-1) + 1, {}, n + 1);
  const int64_t* count = counts.data_ptr<int64_t>();
  result.start.push_back(count[0]);
  for (int64_t i = 0; i < n; ++i) result.start.push_back(result.start.back() + count[i + 1]);
  return result;
}

// S[m] = s_i x[m] A_i^T and y[m] += S[m] B_i^T for each listed row m (i = index[m]), float32
// x, A, B, y contiguous; rows are independent, so they run in parallel.
void forward_rows(const std::vector<int64_t>& rows, const at::Tensor& x, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const float* scale, const int64_t* index, at::Tensor& S, at::Tensor& y) {
  const int64_t K = x.size(1), N = y.size(1), r = lora_A.size(1);
  const float* x_data = x.data_ptr<float>();
  const float* a_data = lora_A.data_ptr<float>();
  const float* b_data = lora_B.data_ptr<float>();
  float* s_data = S.data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t m = rows[t], i = index[m];
      const float* a = a_data + i * r * K;
      const float* b = b_data + i * N * r;
      float* s = s_data + m * r;
      for (int64_t j = 0; j < r; ++j) s[j] = scale[i] * dot(x_data + m * K, a + j * K, K);
      float* y_row = y_data + m * N;
      for (int64_t o = 0; o < N; ++o) y_row[o] += dot(s, b + o * r, r);
    }
  });
}

at::Tensor mixed_lora_fwd_cpp(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const at::Tensor& scaling, const at::Tensor& index, at::Tensor& y) {
  const int64_t n = lora_A.size(0);
  at::Tensor S = at::zeros({x.size(0), lora_A.size(1)}, x.options().dtype(at::kFloat));
  const float* scale = scaling.data_ptr<float>();
  const Segments seg = segments(index, n);
  const bool row_path = x.scalar_type() == at::kFloat && lora_A.scalar_type() == at::kFloat &&
                        y.scalar_type() == at::kFloat && x.is_contiguous() && y.is_contiguous() &&
                        lora_A.is_contiguous() && lora_B.is_contiguous();
  const int64_t* order = seg.order.data_ptr<int64_t>();
  std::vector<int64_t> few_rows;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = seg.start[i + 1] - seg.start[i];
    if (count == 0) continue;
    if (row_path && count <= kRowPathMaxRows) {
      few_rows.insert(few_rows.end(), order + seg.start[i], order + seg.start[i + 1]);
      continue;
    }
    const at::Tensor rows = seg.order.narrow(0, seg.start[i], count);
    const at::Tensor x_i = x.index_select(0, rows).to(at::kFloat);
    const at::Tensor S_i = at::mm(x_i, lora_A[i].to(at::kFloat).t()).mul_(scale[i]);
    S.index_copy_(0, rows, S_i);
    y.index_add_(0, rows, at::mm(S_i, lora_B[i].to(at::kFloat).t()).to(y.scalar_type()));
  }
  if (!few_rows.empty()) forward_rows(few_rows, x, lora_A, lora_B, scale, index.data_ptr<int64_t>(), S, y);
  return S;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_lora_bwd_cpp(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& scaling, const at::Tensor& index, const at::Tensor& S, bool needs_dx) {
  const int64_t n = lora_A.size(0);
  at::Tensor dA = at::zeros_like(lora_A);
  at::Tensor dB = at::zeros_like(lora_B);
  at::Tensor dx = needs_dx ? at::zeros_like(x) : x.new_empty({0});
  const float* scale = scaling.data_ptr<float>();
  const Segments seg = segments(index, n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = seg.start[i + 1] - seg.start[i];
    if (count == 0) continue;
    const at::Tensor rows = seg.order.narrow(0, seg.start[i], count);
    const at::Tensor dy_i = dy.index_select(0, rows).to(at::kFloat);
    const at::Tensor x_i = x.index_select(0, rows).to(at::kFloat);
    dB[i].copy_(at::mm(dy_i.t(), S.index_select(0, rows)));
    const at::Tensor G_i = at::mm(dy_i, lora_B[i].to(at::kFloat)).mul_(scale[i]);
    dA[i].copy_(at::mm(G_i.t(), x_i));
    if (needs_dx) dx.index_copy_(0, rows, at::mm(G_i, lora_A[i].to(at::kFloat)).to(dx.scalar_type()));
  }
  return {dx, dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("mixed_lora_fwd_cpp", &mixed_lora_fwd_cpp);
  m.impl("mixed_lora_bwd_cpp", &mixed_lora_bwd_cpp);
}

}  // namespace fastlora
