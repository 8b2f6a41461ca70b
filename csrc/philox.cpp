// The keep-mask loops: 32 counters (128 elements) a step with AVX2 where the CPU has it (checked at
// run time), one counter at a time otherwise. Both give exactly philox.h's words.
#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTLORA_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

#include <cstring>

namespace fastlora {
namespace {

// ``count`` elements from ``first_counter``; ``count`` need not be a multiple of 4.
void keep_bits_scalar(uint64_t seed, int64_t first_counter, int64_t count, float dropout_p, uint8_t* bits) {
  std::memset(bits, 0, static_cast<size_t>((count + 7) / 8));
  uint32_t words[4];
  for (int64_t i = 0; i < count; ++i) {
    if (i % 4 == 0) philox_words(seed, static_cast<uint64_t>(first_counter + i / 4), words);
    if (uniform_from_word(words[i % 4]) >= dropout_p) bits[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
  }
}

void expand_keep_bits_scalar(const uint8_t* bits, int64_t count, float kept_value, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = (bits[i / 8] >> (i % 8)) & 1 ? kept_value : 0.0f;
}

#ifdef FASTLORA_HAVE_AVX2_PATH
constexpr int kLanes = 8;
// Four independent groups of eight elements a step, so that the rounds' multiply latencies
// overlap (more groups run out of registers).
constexpr int kGroups = 4;
constexpr int kStep = kLanes * kGroups;

// hi / lo 32-bit halves of the eight products a * b (a given as its even lanes and, shifted
// down, its odd lanes, since _mm256_mul_epu32 multiplies the even lanes only).
__attribute__((target("avx2"))) inline void multiply_hi_lo(__m256i a_even, __m256i a_odd, __m256i b,
                                                           __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a_even, b);
  const __m256i odd = _mm256_mul_epu32(a_odd, _mm256_srli_epi64(b, 32));
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Eight lanes of float32 uniforms from eight words: value < 0 ? ~value : value, as
// value ^ (value >> 31) with an arithmetic shift, times the scale; then the keep lanes as 8 bits.
__attribute__((target("avx2"))) inline int keep_lanes(__m256i word, __m256 scale, __m256 threshold) {
  const __m256i value = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));
  const __m256 uniform = _mm256_mul_ps(_mm256_cvtepi32_ps(value), scale);
  return _mm256_movemask_ps(_mm256_cmp_ps(uniform, threshold, _CMP_GE_OQ));
}

__attribute__((target("avx2"))) void keep_bits_avx2(uint64_t seed, int64_t first_counter, int64_t count,
                                                    float dropout_p, uint8_t* bits) {
  const __m256i round_a = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundA));
  const __m256i round_b = _mm256_set1_epi32(static_cast<int32_t>(kPhiloxRoundB));
  const __m256i round_a_odd = _mm256_srli_epi64(round_a, 32);
  const __m256i round_b_odd = _mm256_srli_epi64(round_b, 32);
  const __m256 scale = _mm256_set1_ps(kUniformScale);
  const __m256 threshold = _mm256_set1_ps(dropout_p);
  __m256i key0[kPhiloxRounds];
  __m256i key1[kPhiloxRounds];
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    key0[round] = _mm256_set1_epi32(static_cast<int32_t>(k0));
    key1[round] = _mm256_set1_epi32(static_cast<int32_t>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  alignas(32) uint32_t counter_lo[kStep];
  alignas(32) uint32_t counter_hi[kStep];
  constexpr int64_t kElements = 4 * kStep;  // four elements a counter
  int64_t i = 0;
  for (; i + kElements <= count; i += kElements) {
    for (int lane = 0; lane < kStep; ++lane) {
      const auto counter = static_cast<uint64_t>(first_counter + i / 4 + lane);
      counter_lo[lane] = static_cast<uint32_t>(counter);
      counter_hi[lane] = static_cast<uint32_t>(counter >> 32);
    }
    __m256i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
    for (int g = 0; g < kGroups; ++g) {
      c0[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(counter_lo + g * kLanes));
      c1[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(counter_hi + g * kLanes));
      c2[g] = _mm256_setzero_si256();
      c3[g] = _mm256_setzero_si256();
    }
    for (int round = 0; round < kPhiloxRounds; ++round) {
      for (int g = 0; g < kGroups; ++g) {
        __m256i hi_a, lo_a, hi_b, lo_b;
        multiply_hi_lo(round_a, round_a_odd, c0[g], &hi_a, &lo_a);
        multiply_hi_lo(round_b, round_b_odd, c2[g], &hi_b, &lo_b);
        c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[g]), key0[round]);
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[g]), key1[round]);
        c1[g] = lo_b;
        c3[g] = lo_a;
      }
    }
    for (int g = 0; g < kGroups; ++g) {
      // keep[w] bit j: word w of counter j of this group, i.e. element 4 j + w
      const int keep[4] = {keep_lanes(c0[g], scale, threshold), keep_lanes(c1[g], scale, threshold),
                           keep_lanes(c2[g], scale, threshold), keep_lanes(c3[g], scale, threshold)};
      for (int byte = 0; byte < kLanes / 2; ++byte) {  // counters 2 byte and 2 byte + 1
        int value = 0;
        for (int w = 0; w < 4; ++w) {
          value |= ((keep[w] >> (2 * byte)) & 1) << w;
          value |= ((keep[w] >> (2 * byte + 1)) & 1) << (4 + w);
        }
        bits[(i + 4 * kLanes * g) / 8 + byte] = static_cast<uint8_t>(value);
      }
    }
  }
  keep_bits_scalar(seed, first_counter + i / 4, count - i, dropout_p, bits + i / 8);
}

__attribute__((target("avx2"))) void expand_keep_bits_avx2(const uint8_t* bits, int64_t count, float kept_value,
                                                           float* out) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 kept = _mm256_set1_ps(kept_value);
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    const __m256i byte = _mm256_set1_epi32(bits[i / 8]);
    const __m256i is_set = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
    _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_castsi256_ps(is_set), kept));
  }
  expand_keep_bits_scalar(bits + i / 8, count - i, kept_value, out + i);
}

bool cpu_has_avx2() {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  return has_avx2;
}
#endif

}  // namespace

void philox_keep_bits(uint64_t seed, int64_t first_counter, int64_t count, float dropout_p, uint8_t* bits) {
#ifdef FASTLORA_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return keep_bits_avx2(seed, first_counter, count, dropout_p, bits);
#endif
  keep_bits_scalar(seed, first_counter, count, dropout_p, bits);
}

void expand_keep_bits(const uint8_t* bits, int64_t count, float kept_value, float* out) {
#ifdef FASTLORA_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return expand_keep_bits_avx2(bits, count, kept_value, out);
#endif
  expand_keep_bits_scalar(bits, count, kept_value, out);
}

}  // namespace fastlora
