// The FLASHEP_* environment variables of the C++ core, read once per Buffer (at construction) into
// EnvSettings. The one documented table of all of them (C++ and Python) is docs/env.md; keep the
// two in step.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

namespace flashep::env {

inline const char* raw(const char* name) {
  const char* value = std::getenv(name);
  return (value == nullptr || *value == '\0') ? nullptr : value;
}
inline int int_or(const char* name, int fallback) {
  const char* value = raw(name);
  return value == nullptr ? fallback : std::atoi(value);
}

struct EnvSettings {
  /// FLASHEP_TIMEOUT_S (default 100): bound of every GPU spin-wait and host poll, seconds.
  double timeout_s = 100.0;
  /// FLASHEP_NVL_DOMAIN_SIZE (default 0 = min(num_ranks, 8)): ranks per NVLink domain, when the
  /// caller passes none (BufferOptions::nvl_domain_size 0).
  int nvl_domain_size = 0;
  /// FLASHEP_PUBLISH_LAG (default 4, 0..15): items a bulk-copy ring sender lets its stores stay in
  /// flight before it waits for them and publishes the ring tail (src/kernels/ring_sender.cuh).
  int publish_lag = 4;
  /// FLASHEP_DEBUG_KERNEL_RANKS (default 0): run the dispatch/combine kernels instantiated for
  /// domains of at least this many ranks (testing; results stay correct).
  int kernel_ranks = 0;
  /// FLASHEP_DEBUG_DISPATCH_SKIP (default 0; builds with FLASHEP_ENABLE_DIAGNOSTICS only): leave a
  /// stage of dispatch out (1: receivers skip the row copy; 2: senders skip the row copy; 4:
  /// senders write rows to their own buffer). Results are wrong while it is set.
  int dispatch_skip = 0;
  /// FLASHEP_DEBUG_PROFILE (default 0; diagnostics builds only): N > 0 prints, on rank 0, every
  /// N-th dispatch/combine's per-warp phase clocks to stderr.
  int profile_every = 0;
  /// FLASHEP_DEBUG_LL_BLOCKS (default 0 = ll_num_blocks): blocks of the low-latency kernels
  /// (testing and tuning; capped at the SM count).
  int ll_blocks = 0;
  /// FLASHEP_DEBUG_LL_LOGFMT (default 1): low_latency_combine(use_logfmt=True) sends the partial
  /// sums as LogFMT-10; 0 sends exact BF16 either way (an escape hatch, and the tests' reference).
  int ll_logfmt = 1;
};

inline EnvSettings read() {
  EnvSettings s;
  if (const char* value = raw("FLASHEP_TIMEOUT_S")) {
    const double parsed = std::atof(value);
    if (parsed > 0) s.timeout_s = parsed;
  }
  s.nvl_domain_size = std::max(0, int_or("FLASHEP_NVL_DOMAIN_SIZE", 0));
  s.publish_lag = std::clamp(int_or("FLASHEP_PUBLISH_LAG", 4), 0, 15);
  s.kernel_ranks = std::max(0, int_or("FLASHEP_DEBUG_KERNEL_RANKS", 0));
  s.dispatch_skip = std::max(0, int_or("FLASHEP_DEBUG_DISPATCH_SKIP", 0));
  s.profile_every = std::max(0, int_or("FLASHEP_DEBUG_PROFILE", 0));
  s.ll_blocks = std::max(0, int_or("FLASHEP_DEBUG_LL_BLOCKS", 0));
  s.ll_logfmt = int_or("FLASHEP_DEBUG_LL_LOGFMT", 1) != 0 ? 1 : 0;
  return s;
}

}  // namespace flashep::env
