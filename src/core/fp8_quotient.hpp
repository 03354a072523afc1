// x / scale_inv of the FP8 cast (interface: value = e4m3(x / scale_inv)) without a division per
// element: the group's scale has one reciprocal, and each element takes a product and one
// correction. A float32 division compiles to ~30 instructions with its slow-path call; the cast
// makes eight per thread and chunk, on the send phase's chain.
//
// Markstein's theorem: if r is within half an ulp of 1/s and q within an ulp of x/s, then
// q + (x - q*s)*r, the remainder exact through an FMA, rounds to the correctly rounded x/s, as long
// as nothing underflows. tests/cpp/test_fp8_quotient.cpp checks the whole domain of the cast: every
// bfloat16 x against every group scale a bfloat16 amax can give, comparing the e4m3 values (a
// quotient so small that its remainder underflows is far below e4m3's smallest subnormal).
#pragma once

#include <cmath>

#include "core/hd.hpp"

namespace flashep {

/// The correctly rounded reciprocal of a group's scale (once per group).
FLASHEP_HD float fp8_scale_reciprocal(float scale_inv) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(scale_inv);
#else
  return 1.0f / scale_inv;
#endif
}

/// x / scale_inv, rounded to nearest, from reciprocal = fp8_scale_reciprocal(scale_inv). The
/// correction's sum loses the sign of a zero (-0 + +0 is +0): the quotient takes x's sign back. An
/// infinite scale (a group holding an infinity) has reciprocal 0: then the product alone is the
/// quotient (+-0 for finite x, NaN for infinite x), where the correction would make NaN of 0 * inf.
FLASHEP_HD float fp8_quotient(float x, float scale_inv, float reciprocal) {
  const float q = x * reciprocal;
  const float remainder = fmaf(-q, scale_inv, x);
  const float corrected = copysignf(fmaf(remainder, reciprocal, q), x);
  return reciprocal != 0.0f ? corrected : q;
}

}  // namespace flashep
