// The dropout keep-mask of every fastlora backend: Triton's tl.rand(seed, offset), bit for bit.
//
// Element (m, k) of an (M, K) input keeps iff tl.rand(seed, m * K + k) >= p. tl.rand runs
// 10 rounds of Philox-4x32 on the counter (offset_lo, offset_hi, 0, 0) with the key
// (seed_lo, seed_hi), takes the first output word w, and maps it to [0, 1) as
// float(w') * 4.6566127342e-10 in float32, where w' is w read as int32 with negative values
// bit-flipped (~w'). The comparison with p is in float32, as in the kernels.
#pragma once

#include <cstdint>

namespace fastlora {

constexpr int kPhiloxRounds = 10;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
// Triton's constant, written as a double and rounded to float32 as Triton does
constexpr float kUniformScale = static_cast<float>(4.6566127342e-10);

inline uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t next_c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Triton's uint_to_uniform_float for a 32-bit word: a float32 in [0, 1).
inline float uniform_from_word(uint32_t word) {
  int32_t value = static_cast<int32_t>(word);
  value = value < 0 ? ~value : value;
  return static_cast<float>(value) * kUniformScale;
}

// The keep-mask of elements first_offset + i, i in [0, count), packed eight a byte: bit i % 8 of
// bits[i / 8] is 1 iff tl.rand(seed, first_offset + i) >= dropout_p. Writes ceil(count / 8)
// bytes.
void philox_keep_bits(uint64_t seed, int64_t first_offset, int64_t count, float dropout_p, uint8_t* bits);

// The keep-mask as multipliers: out[i] = kept_value if bit i of bits is set, else 0.
void expand_keep_bits(const uint8_t* bits, int64_t count, float kept_value, float* out);

}  // namespace fastlora
