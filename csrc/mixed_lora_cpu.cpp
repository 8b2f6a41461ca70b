// The `cpp` backend's mixed batches: every row m of x runs adapter i = index[m] (-1: none) of
// the stacked adapters, registered as the CPU kernels of fastlora::mixed_lora_fwd_cpp /
// mixed_lora_bwd_cpp (schema defined in Python, fastlora/ops/cpp_ops.py).
//
// Shapes: x (M, K); A (n, r, K); B (n, N, r); scaling (n,) float32; index (M,) int64; y (M, N),
// holding x W^T + b on entry; S (M, r) float32; dy (M, N).
//
// The rows are sorted by adapter once (a stable sort of the index) and each adapter's segment
// runs as two ATen GEMMs on its gathered rows: the loop over adapters is here in C++, not in
// Python, and needs no padding.
// The rank-r products run in float32 whatever the dtypes (as the other backends' do).
// Forward:  S_i = s_i x_i A_i^T (float32), y_i += S_i B_i^T (added into the rows of y).
// Backward: G_i = dy_i B_i, dB_i = dy_i^T S_i, dA_i = s_i G_i^T x_i, dx_i += s_i G_i A_i
//           (added into dx, which holds dy W on entry); rows with index -1 get nothing.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastlora {
namespace {

// (rows of adapter i, in row order) for every adapter i < n, from one stable sort
std::vector<at::Tensor> segments(const at::Tensor& index, int64_t n) {
  const at::Tensor sorted_order = std::get<1>(at::sort(index, std::optional<bool>(true), /*dim=*/0, /*descending=*/false));
  const at::Tensor sorted_index = index.index_select(0, sorted_order);
  const at::Tensor counts = at::bincount(sorted_index.clamp_min(-1) + 1, {}, n + 1);
  const int64_t* count = counts.data_ptr<int64_t>();
  std::vector<at::Tensor> rows;
  int64_t start = count[0];  // rows without an adapter sort first
  for (int64_t i = 0; i < n; ++i) {
    rows.push_back(sorted_order.narrow(0, start, count[i + 1]));
    start += count[i + 1];
  }
  return rows;
}

at::Tensor mixed_lora_fwd_cpp(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
                              const at::Tensor& scaling, const at::Tensor& index, at::Tensor& y) {
  const int64_t n = lora_A.size(0);
  at::Tensor S = at::zeros({x.size(0), lora_A.size(1)}, x.options().dtype(at::kFloat));
  const float* scale = scaling.data_ptr<float>();
  const std::vector<at::Tensor> rows = segments(index, n);
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i].numel() == 0) continue;
    const at::Tensor x_i = x.index_select(0, rows[i]).to(at::kFloat);
    const at::Tensor S_i = at::mm(x_i, lora_A[i].to(at::kFloat).t()).mul_(scale[i]);
    S.index_copy_(0, rows[i], S_i);
    y.index_add_(0, rows[i], at::mm(S_i, lora_B[i].to(at::kFloat).t()).to(y.scalar_type()));
  }
  return S;
}

std::tuple<at::Tensor, at::Tensor> mixed_lora_bwd_cpp(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& scaling, const at::Tensor& index, const at::Tensor& S, at::Tensor& dx, bool needs_dx) {
  const int64_t n = lora_A.size(0);
  at::Tensor dA = at::zeros_like(lora_A);
  at::Tensor dB = at::zeros_like(lora_B);
  const float* scale = scaling.data_ptr<float>();
  const std::vector<at::Tensor> rows = segments(index, n);
  for (int64_t i = 0; i < n; ++i) {
    if (rows[i].numel() == 0) continue;
    const at::Tensor dy_i = dy.index_select(0, rows[i]).to(at::kFloat);
    const at::Tensor x_i = x.index_select(0, rows[i]).to(at::kFloat);
    dB[i].copy_(at::mm(dy_i.t(), S.index_select(0, rows[i])));
    const at::Tensor G_i = at::mm(dy_i, lora_B[i].to(at::kFloat)).mul_(scale[i]);
    dA[i].copy_(at::mm(G_i.t(), x_i));
    if (needs_dx) dx.index_add_(0, rows[i], at::mm(G_i, lora_A[i].to(at::kFloat)).to(dx.scalar_type()));
  }
  return {dA, dB};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("mixed_lora_fwd_cpp", &mixed_lora_fwd_cpp);
  m.impl("mixed_lora_bwd_cpp", &mixed_lora_bwd_cpp);
}

}  // namespace fastlora
