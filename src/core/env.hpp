// The FLASHEP_* environment variables read by the C++ core. The one documented table of all of
// them (C++ and Python) is docs/env.md; keep the two in step.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

namespace flashep::env {

/// FLASHEP_TIMEOUT_S (default 100): bound of every GPU spin-wait and host poll, seconds.
inline double timeout_s() {
  const char* value = std::getenv("FLASHEP_TIMEOUT_S");
  if (value == nullptr || *value == '\0') return 100.0;
  const double parsed = std::atof(value);
  return parsed > 0 ? parsed : 100.0;
}

/// FLASHEP_DEBUG_DISPATCH_SKIP (default 0): diagnostics that leave a stage of dispatch out to
/// locate its bottleneck (1: receivers skip the row copy; 2: senders skip the row copy; 4: senders
/// write rows to their own buffer instead of the peer's). Results are wrong while it is set.
inline int debug_dispatch_skip() {
  const char* value = std::getenv("FLASHEP_DEBUG_DISPATCH_SKIP");
  return value == nullptr ? 0 : std::atoi(value);
}

/// FLASHEP_DEBUG_KERNEL_RANKS (default 0): run the dispatch/combine kernels instantiated for
/// domains of at least this many ranks (their register budgets and unrolling differ), so that a
/// machine with fewer GPUs tests the code that larger domains run. Results stay correct.
inline int debug_kernel_ranks() {
  const char* value = std::getenv("FLASHEP_DEBUG_KERNEL_RANKS");
  return value == nullptr ? 0 : std::max(0, std::atoi(value));
}

/// FLASHEP_DEBUG_PROFILE (default 0): N > 0 prints, on rank 0, every N-th dispatch/combine's
/// per-warp phase clocks to stderr (synchronizes the stream after those calls). Diagnostics only.
inline int debug_profile() {
  const char* value = std::getenv("FLASHEP_DEBUG_PROFILE");
  return value == nullptr ? 0 : std::max(0, std::atoi(value));
}

/// FLASHEP_COMBINE_SENDER (default "warp"): diagnostics only. "bulk" sends combine rows with the
/// bulk-copy ring sender (one warp per channel), which can deadlock: one warp serving every peer is
/// head-of-line blocked by a full ring while combine receivers free slots in token order (review,
/// docs/design.md). "warp" (plain-copy warps per (channel, peer)) is safe. Read at every call.
inline bool combine_bulk_sender() {
  const char* value = std::getenv("FLASHEP_COMBINE_SENDER");
  return value != nullptr && std::string(value) == "bulk";
}

/// FLASHEP_PUBLISH_LAG (default 4, range 0..15): how many items a ring sender lets its bulk stores
/// stay in flight before it waits for them and publishes the ring tail (src/kernels/ring_sender.cuh).
/// Read at every call, so a benchmark can sweep it.
inline int publish_lag() {
  const char* value = std::getenv("FLASHEP_PUBLISH_LAG");
  const int parsed = (value == nullptr || *value == '\0') ? 4 : std::atoi(value);
  return parsed < 0 ? 0 : (parsed > 15 ? 15 : parsed);
}

}  // namespace flashep::env
