// Division by a divisor fixed on the host: a multiply-high, an add and a shift on the device,
// where a runtime 32-bit division is ~20 dependent instructions (a reciprocal, then corrections).
// The low-latency kernels are chains of dependent steps run by a few warps; each division on the
// chain costs its length in issue latency (docs/results/2026-12-01-h200-r1-ncu.md).
//
// Method (Granlund and Montgomery, "Division by invariant integers using multiplication", 1994):
// with s = ceil(log2 d) and m = floor(2^32 * (2^s - d) / d) + 1, n / d = (mulhi(n, m) + n) >> s
// for every 0 <= n < 2^31 and 1 <= d < 2^31 (the sum stays below 2^32). tests/cpp/test_fast_divmod.cpp
// checks it against `/` and `%`.
#pragma once

#include <cstdint>

#include "core/hd.hpp"

namespace flashep {

/// Default-constructed (divisor 0) it is not a divisor: whoever fills a struct that holds one makes
/// it with `of` (the layout, the launch functions), and the kernels' callers never see divisor 0.
struct FastDivmod {
  uint32_t divisor = 0, multiplier = 0, shift = 0;

  /// The constants of `d` (1 <= d < 2^31; others give divisor 0 and must be refused before): made
  /// on the host, with the layout or the launch parameters.
  FLASHEP_HD static FastDivmod of(int d) {
    FastDivmod f;
    if (d < 1) {
      f.divisor = 0;
      return f;
    }
    f.divisor = static_cast<uint32_t>(d);
    while ((uint64_t(1) << f.shift) < f.divisor) ++f.shift;
    f.multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << f.shift) - f.divisor)) / f.divisor + 1);
    return f;
  }

  /// n / divisor, for 0 <= n < 2^31.
  FLASHEP_HD int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(u, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((uint64_t(u) * multiplier) >> 32);
#endif
    return static_cast<int>((high + u) >> shift);
  }
  /// n % divisor, for 0 <= n < 2^31.
  FLASHEP_HD int mod(int n) const { return n - div(n) * static_cast<int>(divisor); }
};

}  // namespace flashep
