// Wrap-safe comparison of the counters that live for the whole life of a buffer (barrier epochs,
// call sequence numbers). A 32-bit epoch advanced thousands of times a second wraps within days;
// a signed `>=` then lets one barrier pass unsynchronised and reads every later wait as a failure.
// Every long-lived counter is therefore compared through the signed difference of its unsigned
// value, which is right as long as the two sides are less than 2^31 apart (peers of one barrier
// are at most one epoch apart).
#pragma once

#include <cstdint>

#include "core/hd.hpp"

namespace flashep {

/// `value - target` as a signed distance, modulo 2^32.
FLASHEP_HD int32_t seq_distance(uint32_t value, uint32_t target) { return static_cast<int32_t>(value - target); }
/// Whether a counter that only moves forward has reached `target` (wrap-safe).
FLASHEP_HD bool seq_reached(uint32_t value, uint32_t target) { return seq_distance(value, target) >= 0; }

/// The 64-bit versions (NVSHMEM signals are 64-bit).
FLASHEP_HD int64_t seq_distance64(uint64_t value, uint64_t target) { return static_cast<int64_t>(value - target); }
FLASHEP_HD bool seq_reached64(uint64_t value, uint64_t target) { return seq_distance64(value, target) >= 0; }

}  // namespace flashep
