// The `cpp` backend's 4-bit dequantizer: bitsandbytes' NF4 / FP4 blockwise layout (see
// fastlora/ops/weight4bit.py) into a dense weight, registered as the CPU kernel of
// fastlora::dequant_4bit_cpp (schema defined in Python, fastlora/ops/cpp_ops.py).
//
// packed (ceil(n / 2),) uint8: value 2i in the high nibble of byte i, 2i + 1 in the low one.
// absmax (blocks,) float32 (a nested absmax is decoded in Python first: weight4bit.absmax_fp32).
// out (n,) float32 / float16 / bfloat16, n values: value j = code[nibble j] * absmax[j / blocksize],
// a float32 product rounded once to out's dtype (round to nearest even), which is what
// bitsandbytes.functional.dequantize_4bit computes, bit for bit.
// Parallel over blocks of `blocksize` values; each block scales the 16 codes once (the same
// float32 products) and looks every nibble up in them.
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
  const int64_t half = blocksize / 2;  // bytes per block: block sizes are even
  const uint8_t* bytes = packed.data_ptr<uint8_t>();
  const float* table = code.data_ptr<float>();
  const float* scales = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastlora_dequant_4bit", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    // at least 64 KiB of output per task
    const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      float high[16], low[16];
      for (int64_t block = begin; block < end; ++block) {
        const float scale = scales[block];
        for (int v = 0; v < 16; ++v) high[v] = low[v] = table[v] * scale;
        const int64_t first = block * half;
        const int64_t full_bytes = std::min(half, n / 2 - first);  // bytes whose two values both exist
        scalar_t* row = dst + 2 * first;
        const uint8_t* src = bytes + first;
        for (int64_t i = 0; i < full_bytes; ++i) {
          row[2 * i] = static_cast<scalar_t>(high[src[i] >> 4]);
          row[2 * i + 1] = static_cast<scalar_t>(low[src[i] & 0x0F]);
        }
        if (n % 2 == 1 && block == blocks - 1) {  // an odd count: the last byte holds one value
          row[2 * full_bytes] = static_cast<scalar_t>(high[src[full_bytes] >> 4]);
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
