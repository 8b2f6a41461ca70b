// The `cpp` backend's 4-bit dequantizer: bitsandbytes' NF4 / FP4 blockwise layout (see
// fastlora/ops/weight4bit.py) into a dense weight, registered as the CPU kernel of
// fastlora::dequant_4bit_cpp (schema defined in Python, fastlora/ops/cpp_ops.py).
//
// packed (ceil(n / 2),) uint8: value 2i in the high nibble of byte i, 2i + 1 in the low one.
// absmax (blocks,) float32 (a nested absmax is decoded in Python first: weight4bit.absmax_fp32).
// out (n,) float32 / float16 / bfloat16, n values: value j = code[nibble j] * absmax[j / blocksize],
// a float32 product rounded once to out's dtype (round to nearest even), which is what
// bitsandbytes.functional.dequantize_4bit computes, bit for bit.
// Parallel over blocks of `blocksize` values.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace fastlora {
namespace {

void dequant_4bit_cpp(
    const at::Tensor& packed,
    const at::Tensor& absmax,
    const at::Tensor& code,
    int64_t blocksize,
    at::Tensor& out) {
  const int64_t n = out.numel();
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  const float* table = code.data_ptr<float>();
  const float* scales = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastlora_dequant_4bit", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const float scale = scales[block];
        const int64_t stop = std::min(n, (block + 1) * blocksize);
        for (int64_t j = block * blocksize; j < stop; ++j) {
          const uint8_t byte = bytes[j / 2];
          const uint8_t nibble = (j % 2 == 0) ? (byte >> 4) : (byte & 0x0F);
          dst[j] = static_cast<scalar_t>(table[nibble] * scale);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("dequant_4bit_cpp", &dequant_4bit_cpp);
}

}  // namespace fastlora
