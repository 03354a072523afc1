// fp8_quotient (src/core/fp8_quotient.hpp) against the division the interface states: for every
// group scale a bfloat16 amax can give (amax = max(|x|, 1e-4), scale = amax / 448, without and with
// round_scale) and every bfloat16 |x| <= amax, e4m3(fp8_quotient) == e4m3(x / scale). Negative x
// mirror positive ones (every step is odd in x, zeros too: checked to the bit for |x| <= 3), and
// signed zeros, infinities and NaN are checked in groups they belong to.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "check.hpp"
#include "core/fp8_quotient.hpp"
#include "oracle/low_latency_oracle.hpp"
#include "oracle/oracle.hpp"

namespace ll = flashep::oracle::low_latency;

using flashep::oracle::bf16_to_float;

int main() {
  long pairs = 0, float_differences = 0, e4m3_differences = 0;
  float largest_difference = 0.0f;  // the largest exact quotient whose float32 value differs
  for (int round_scale = 0; round_scale < 2; ++round_scale) {
    // amax: every finite positive bfloat16 at or above the floor, and the floor itself.
    for (uint32_t a = 0; a <= 0x7f80u; ++a) {
      const bool floor_case = a == 0x7f80u;
      const float amax = floor_case ? ll::kAmaxFloor : bf16_to_float(static_cast<uint16_t>(a));
      if (!floor_case && amax < ll::kAmaxFloor) continue;
      const float scale = ll::scale_inv_of(amax, round_scale != 0);
      const float reciprocal = flashep::fp8_scale_reciprocal(scale);
      for (uint32_t b = 0; b < 0x7f80u; ++b) {
        const float x = bf16_to_float(static_cast<uint16_t>(b));
        if (x > amax) break;  // bfloat16 bits of positive values are ordered like the values
        ++pairs;
        const float fast = flashep::fp8_quotient(x, scale, reciprocal);
        const float exact = x / scale;
        if (fast == exact) continue;
        ++float_differences;
        largest_difference = std::fmax(largest_difference, exact);
        if (ll::float_to_e4m3(fast) != ll::float_to_e4m3(exact)) {
          if (++e4m3_differences <= 5) {
            CHECK_EQ(ll::float_to_e4m3(fast), ll::float_to_e4m3(exact));
            std::printf("x %a scale %a: %a against %a\n", x, scale, fast, exact);
          }
        }
      }
    }
  }
  // Signed zeros, infinities and NaN, in groups whose amax they give (amax = max(|x|, rest)): a
  // group holding an infinity has an infinite scale; a NaN does not change amax (fmaxf). e4m3 of
  // NaN is 0x7f on both sides. And odd in x, to the bit, over every bfloat16 |x| <= 3.
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (float rest : {3.0f, 1e-4f, inf})
    for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-4f, -2.5f, 3.0f, inf, -inf, nan}) {
      const float amax = std::fmax(std::fmax(std::fabs(x), rest), ll::kAmaxFloor);
      const float scale = ll::scale_inv_of(amax, false);
      CHECK_EQ(ll::float_to_e4m3(flashep::fp8_quotient(x, scale, flashep::fp8_scale_reciprocal(scale))),
               ll::float_to_e4m3(x / scale));
    }
  const float scale3 = ll::scale_inv_of(3.0f, false), reciprocal3 = flashep::fp8_scale_reciprocal(scale3);
  long odd_failures = 0;
  for (uint32_t b = 0; b <= 0x4040u; ++b) {
    const float x = bf16_to_float(static_cast<uint16_t>(b)), minus_x = bf16_to_float(static_cast<uint16_t>(b | 0x8000u));
    const float plus = flashep::fp8_quotient(x, scale3, reciprocal3), minus = flashep::fp8_quotient(minus_x, scale3, reciprocal3);
    uint32_t plus_bits, minus_bits;
    std::memcpy(&plus_bits, &plus, 4);
    std::memcpy(&minus_bits, &minus, 4);
    odd_failures += minus_bits != (plus_bits ^ 0x80000000u);
  }
  CHECK_EQ(odd_failures, 0L);
  std::printf("test_fp8_quotient: %ld pairs; %ld float32 quotients differ, the largest of them %g (e4m3's smallest "
              "subnormal is 2^-9 = %g); %ld e4m3 values differ\n",
              pairs, float_differences, largest_difference, std::ldexp(1.0, -9), e4m3_differences);
  CHECK_EQ(e4m3_differences, 0L);
  // Markstein's exception: only quotients whose remainder underflows, far below what e4m3 keeps.
  CHECK(largest_difference < std::ldexp(1.0f, -80));
  return check::summary("test_fp8_quotient");
}
