// The record a kernel leaves in host-mapped memory when a wait times out or device-side input
// validation fails. The host turns it into a flashep::Error naming rank, phase and what was awaited.
#pragma once

#include <string>

namespace flashep {

enum class Phase : int {
  kNone = 0,
  kLayoutInvalidExpert,     // get_dispatch_layout saw an expert id outside [-1, E)
  kNotifyBarrier,           // notify_dispatch: barrier with peers
  kNotifyCombineBarrier,    // notify_combine (or cached dispatch): barrier with peers
  kDispatchSendWaitSpace,   // dispatch sender waiting for ring space (receiver's head)
  kDispatchRecvWaitData,    // dispatch receiver waiting for tokens (sender's tail)
  kDispatchTooManyTokens,   // worst-case mode: more tokens arrived than num_worst_tokens
  kCombineSendWaitSpace,    // combine sender waiting for ring space
  kCombineRecvWaitData,     // combine receiver waiting for expert outputs
  kCombineReleaseWait,      // combine receiver's coordinator waiting for its own workers
  kDispatchInvalidExpert,   // dispatch saw an expert id outside [-1, E)
  kSendWaitRowLoad,         // a bulk-copy sender waiting for its own row to land in shared memory
  kCallMismatch,            // the ranks of a call disagree on it (CallInfo, layout_math.hpp)
  kCombineBadHandle,        // a combine handle points at rows of x that do not exist
};

/// Written by the first failing thread (flag set last, after the fields). Plain ints so the layout
/// is the same on host and device.
struct DeviceErrorRecord {
  volatile int flag;  // 0 = no error, 1 = error recorded
  int rank;
  int phase;          // Phase
  int peer;           // rank waited for, or -1
  int channel;        // channel, or -1
  int expected;       // value awaited (a counter, an epoch, a count)
  int observed;       // value seen last
  int block;
};

inline const char* phase_name(Phase phase) {
  switch (phase) {
    case Phase::kNone: return "none";
    case Phase::kLayoutInvalidExpert: return "layout (invalid expert id in topk_idx)";
    case Phase::kNotifyBarrier: return "notify_dispatch barrier";
    case Phase::kNotifyCombineBarrier: return "notify barrier before combine/cached dispatch";
    case Phase::kDispatchSendWaitSpace: return "dispatch send (waiting for ring space)";
    case Phase::kDispatchRecvWaitData: return "dispatch receive (waiting for tokens)";
    case Phase::kDispatchTooManyTokens: return "dispatch (received more tokens than num_worst_tokens)";
    case Phase::kCombineSendWaitSpace: return "combine send (waiting for ring space)";
    case Phase::kCombineRecvWaitData: return "combine receive (waiting for expert outputs)";
    case Phase::kCombineReleaseWait: return "combine receive (waiting for local workers)";
    case Phase::kDispatchInvalidExpert: return "dispatch (invalid expert id in topk_idx)";
    case Phase::kSendWaitRowLoad: return "send (waiting for a row to load from local memory into a stage)";
    case Phase::kCallMismatch: return "barrier (the ranks disagree on the call)";
    case Phase::kCombineBadHandle: return "combine (the handle does not match x)";
  }
  return "unknown";
}

inline bool phase_is_timeout(Phase phase) {
  return phase != Phase::kLayoutInvalidExpert && phase != Phase::kDispatchTooManyTokens &&
         phase != Phase::kDispatchInvalidExpert && phase != Phase::kCallMismatch && phase != Phase::kCombineBadHandle &&
         phase != Phase::kNone;
}

inline std::string describe(const DeviceErrorRecord& r, double timeout_s) {
  const Phase phase = static_cast<Phase>(r.phase);
  std::string s = "flashep: rank " + std::to_string(r.rank) + ": ";
  if (phase == Phase::kLayoutInvalidExpert || phase == Phase::kDispatchInvalidExpert) {
    return s + phase_name(phase) + ": token " + std::to_string(r.expected) + " has expert id " +
           std::to_string(r.observed) + " (num_experts " + std::to_string(r.peer) + ")";
  }
  if (phase == Phase::kCombineBadHandle) {
    return s + phase_name(phase) + ": it sends rows up to " + std::to_string(r.observed) + " of x to rank " +
           std::to_string(r.peer) + " on channel " + std::to_string(r.channel) + ", but x has " +
           std::to_string(r.expected) + " rows (a handle of another dispatch, or modified). Nothing was read "
           "out of bounds; the buffer is unusable now and must be destroyed";
  }
  if (phase == Phase::kDispatchTooManyTokens) {
    return s + phase_name(phase) + ": " + std::to_string(r.observed) + " tokens arrived, num_worst_tokens is " +
           std::to_string(r.expected);
  }
  if (phase == Phase::kCallMismatch) {
    // channel: the CallInfo field (layout_math.hpp); expected: this rank's value; observed: the peer's.
    static const char* const kFields[] = {"operation", "channel count (from config.num_sms)",
                                          "ring depth (config.num_max_nvl_chunked_recv_tokens)", "hidden size",
                                          "dtype", "top-k width", "num_experts"};
    constexpr int kNumFields = sizeof(kFields) / sizeof(kFields[0]);
    auto value = [&](int v) -> std::string {
      switch (r.channel) {
        case 0: return v == 1 ? "dispatch" : v == 2 ? "cached dispatch" : v == 3 ? "combine" : std::to_string(v);
        case 4: return v == 1 ? "bf16" : v == 2 ? "fp8 e4m3" : std::to_string(v);
        case 5: return std::to_string(v - 1);  // stored as top-k + 1
        default: return std::to_string(v);
      }
    };
    const char* field = (r.channel >= 0 && r.channel < kNumFields) ? kFields[r.channel] : "unknown field";
    return s + "the ranks disagree on the call: " + field + " is " + value(r.expected) + " here and " +
           value(r.observed) + " on rank " + std::to_string(r.peer) +
           ". Every rank must make the same sequence of calls with the same config and shapes; the buffer "
           "is unusable now and must be destroyed";
  }
  s += "timed out after " + std::to_string(timeout_s) + " s in " + phase_name(phase);
  if (phase == Phase::kSendWaitRowLoad) {
    return s + " on channel " + std::to_string(r.channel) + " (item " + std::to_string(r.expected) + ", block " +
           std::to_string(r.block) + "): a copy within this GPU did not complete; the buffer is unusable now and "
           "must be destroyed";
  }
  if (r.peer >= 0) s += ", waiting for rank " + std::to_string(r.peer);
  if (r.channel >= 0) s += " on channel " + std::to_string(r.channel);
  s += " (awaited " + std::to_string(r.expected) + ", saw " + std::to_string(r.observed) + ", block " +
       std::to_string(r.block) + "). A peer did not join the same operation, or died; the buffer is "
       "unusable now and must be destroyed";
  return s;
}

}  // namespace flashep
