// Opt-in per-warp phase clocks (FLASHEP_DEBUG_PROFILE, docs/env.md), compiled in only with the
// CMake option FLASHEP_ENABLE_DIAGNOSTICS (FLASHEP_DIAGNOSTICS=1): lane 0 of a warp adds the clock64
// cycles spent in each phase of its loop to that warp's counters. In production builds every call
// below compiles to nothing.
#pragma once

#include <cstdint>

#include "kernels/launch.hpp"

#ifndef FLASHEP_DIAGNOSTICS
#define FLASHEP_DIAGNOSTICS 0
#endif

namespace flashep::device {

/// Whether this build carries the diagnostics (phase clocks, FLASHEP_DEBUG_DISPATCH_SKIP).
inline constexpr bool kDiagnostics = FLASHEP_DIAGNOSTICS != 0;

struct PhaseClock {
  unsigned long long* counters;  // this warp's kProfileCounters counters, or nullptr
  long long last;

  __device__ __forceinline__ PhaseClock(unsigned long long* profile, int warps_per_block, int lane)
      : counters(nullptr), last(0) {
    if constexpr (kDiagnostics) {
      if (profile != nullptr && lane == 0) {
        counters = profile + (int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32) * kernels::kProfileCounters;
        last = clock64();
      }
    }
  }
  /// Charges the cycles since the last mark to `phase`.
  __device__ __forceinline__ void mark(int phase) {
    if constexpr (kDiagnostics) {
      if (counters != nullptr) {
        const long long now = clock64();
        counters[phase] += static_cast<unsigned long long>(now - last);
        last = now;
      }
    }
  }
  __device__ __forceinline__ void count_item() {
    if constexpr (kDiagnostics) {
      if (counters != nullptr) counters[kernels::kProfileItems] += 1;
    }
  }
};

}  // namespace flashep::device
