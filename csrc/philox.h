// The dropout keep-mask of every fastlora backend: Triton's tl.randint4x(seed, counter), bit for bit.
//
// Element (m, k) of an (M, K) input keeps iff uniform(word k % 4 of Philox(seed, counter)) >= p
// with counter = m * ceil(K / 4) + k / 4: one Philox call serves four neighbouring elements of a
// row. Philox-4x32 runs 10 rounds on the counter (counter_lo, counter_hi, 0, 0) with the key
// (seed_lo, seed_hi) and gives four words; uniform(w) = float(w') * 4.6566127342e-10 in float32,
// where w' is w read as int32 with negative values bit-flipped (~w'). The comparison with p is
// in float32, as in the kernels.
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

// The four output words of Philox-4x32-10 for ``counter`` (tl.randint4x's order).
inline void philox_words(uint64_t seed, uint64_t counter, uint32_t words[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
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
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// Triton's uint_to_uniform_float for a 32-bit word: a float32 in [0, 1).
inline float uniform_from_word(uint32_t word) {
  int32_t value = static_cast<int32_t>(word);
  value = value < 0 ? ~value : value;
  return static_cast<float>(value) * kUniformScale;
}

// The keep-mask of one row's ``count`` elements, packed eight a byte: element i uses word i % 4 of
// Philox(seed, first_counter + i / 4); bit i % 8 of bits[i / 8] is 1 iff it keeps. Writes
// ceil(count / 8) bytes. For row m of an (M, K) input, first_counter = m * ceil(K / 4).
void philox_keep_bits(uint64_t seed, int64_t first_counter, int64_t count, float dropout_p, uint8_t* bits);

// The keep-mask as multipliers: out[i] = kept_value if bit i of bits is set, else 0.
void expand_keep_bits(const uint8_t* bits, int64_t count, float kept_value, float* out);

}  // namespace fastlora
