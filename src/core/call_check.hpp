// The cross-rank call check: what the ranks of one collective call must agree on. Each rank writes
// its CallInfo into every peer's control block together with its barrier signal (ordered by the
// signal's release) and compares the peers' with its own. A disagreement (one rank in combine while
// another dispatches, a different config, hidden size, dtype or top-k) is a usage error that would
// otherwise corrupt the rings or hang until the timeout; it fails the call on every rank at once.
#pragma once

#include "core/hd.hpp"
#include "core/layouts.hpp"

namespace flashep {

enum class CallOp : int { kDispatch = 1, kCachedDispatch = 2, kCombine = 3 };

struct CallInfo {
  int op;            // CallOp
  int num_channels;  // from config.num_sms
  int ring_depth;    // config.num_max_nvl_chunked_recv_tokens
  // From here on 0 means "not known here" (not compared); known values are encoded to be > 0.
  int hidden;        // row width in elements
  int dtype;         // DType + 1
  int num_topk;      // top-k width + 1 (a combine without topk_weights: 1)
  int num_experts;   // a fresh dispatch's expert count
};
static_assert(sizeof(CallInfo) == kCallInfoInts * sizeof(int), "CallInfo travels as kCallInfoInts ints");
inline constexpr int kCallInfoOptionalFrom = 3;  // fields from here on are compared only when both are known

/// Index of the first field on which two ranks' CallInfo (as kCallInfoInts ints) disagree, or -1.
FLASHEP_HD int call_info_mismatch(const int* mine, const int* theirs) {
  for (int i = 0; i < kCallInfoInts; ++i) {
    const bool compared = i < kCallInfoOptionalFrom || (mine[i] != 0 && theirs[i] != 0);
    if (compared && mine[i] != theirs[i]) return i;
  }
  return -1;
}

/// The CallInfo of a call; hidden 0 = row shape not known here (not compared).
FLASHEP_HD CallInfo make_call_info(CallOp op, int num_channels, int ring_depth, int hidden, int dtype, int num_topk,
                                   int num_experts) {
  const bool shape_known = hidden > 0;
  return CallInfo{static_cast<int>(op), num_channels, ring_depth, shape_known ? hidden : 0,
                  shape_known ? dtype + 1 : 0, shape_known ? num_topk + 1 : 0, num_experts};
}

}  // namespace flashep
