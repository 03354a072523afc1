// The record a kernel leaves in host-mapped memory when it fails (a wait past the timeout, bad input
// found on the GPU, ranks that disagree) or stops because a peer aborted the buffer. The host turns
// it into a flashep::Error naming the rank, the phase and what was awaited (describe(), kind_of()).
#pragma once

#include <string>

#include "flashep/errors.hpp"

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
  kDispatchInvalidExpert,   // notify_dispatch saw an expert id outside [-1, E) in topk_idx
  kSendWaitRowLoad,         // a bulk-copy sender waiting for its own row to land in shared memory
  kCallMismatch,            // the ranks of a call disagree on it (CallInfo, call_check.hpp)
  kCombineBadHandle,        // a combine handle points at rows of x that do not exist
  kDispatchBadHandle,       // a dispatch handle points at output rows that do not exist
  kNotifyBadRankCount,      // num_tokens_per_rank disagrees with is_token_in_rank
  kNotifyBadExpertCount,    // num_tokens_per_expert disagrees with topk_idx
  kKernelEntry,             // a kernel found the buffer aborted before it started
  kTransportCheck,          // check_transports waiting for a peer's data
  kHostRecvCounts,          // the host's poll for notify_dispatch's counts (host-side record)
  kLowLatencyInvalidExpert,   // low-latency dispatch: an expert id outside [-1, E) in topk_idx
  kLowLatencyDispatchRecv,    // low-latency dispatch receive: waiting for a source's messages
  kLowLatencyCombineWeights,  // low-latency combine send: waiting for a source's top-k weights
  kLowLatencyCombineRecv,     // low-latency combine receive: waiting for an expert rank's partial sums
  kLowLatencyCallMismatch,    // low-latency: a peer's call differs (T, H, E, K, dtype or operation)
  kLowLatencyBadMessage,      // low-latency: a message names a row outside its segment
  kLowLatencyOverrun,         // low-latency: a peer is two calls ahead (more than two calls in flight)
  kRailReceive,               // multi-node rail stage: waiting for a source node's tokens
  kRailBadCount,              // multi-node rail stage: a source node's count exceeds what fits
  kRailReturn,                // multi-node combine: waiting for a destination node's returned row
  kLowLatencyCredit,          // low-latency send: waiting for a peer to finish reading the previous call of the half
  kLowLatencyHalfBusy,        // low-latency send: this rank has not received the previous call of the half (its hook)
};

/// Why the record was written.
enum class Cause : int {
  kOwn = 0,        // this rank failed in `phase`
  kPeerAbort = 1,  // this rank stopped in `phase` because rank `peer` aborted the buffer
};

/// Written by the first failing thread of a rank; this rank's own failure may replace a record of
/// a peer's abort (a rank that finds a disagreement itself reports it, even when the peer's abort
/// landed first). `seq` is a sequence lock: odd while the fields are written, even and > 0 once a
/// record is complete, so the host never reads a torn record. Plain ints so the layout is the same
/// on host and device.
struct DeviceErrorRecord {
  volatile int seq;   // 0 = no error; odd = being written; even > 0 = complete
  int rank;
  int phase;          // Phase
  int cause;          // Cause
  int peer;           // rank waited for (or the aborting rank), or -1
  int channel;        // channel (a field index for kCallMismatch), or -1
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
    case Phase::kDispatchInvalidExpert: return "notify_dispatch (invalid expert id in topk_idx)";
    case Phase::kSendWaitRowLoad: return "send (waiting for a row to load from local memory into a stage)";
    case Phase::kCallMismatch: return "barrier (the ranks disagree on the call)";
    case Phase::kCombineBadHandle: return "combine (the handle does not match x)";
    case Phase::kDispatchBadHandle: return "dispatch (the handle does not match the output)";
    case Phase::kNotifyBadRankCount: return "notify_dispatch (num_tokens_per_rank disagrees with is_token_in_rank)";
    case Phase::kNotifyBadExpertCount: return "notify_dispatch (num_tokens_per_expert disagrees with topk_idx)";
    case Phase::kKernelEntry: return "kernel entry";
    case Phase::kTransportCheck: return "check_transports (waiting for a peer's data)";
    case Phase::kHostRecvCounts: return "host wait for notify_dispatch's receive counts";
    case Phase::kLowLatencyInvalidExpert: return "low_latency_dispatch (invalid expert id in topk_idx)";
    case Phase::kLowLatencyDispatchRecv: return "low_latency_dispatch receive (waiting for a source's tokens)";
    case Phase::kLowLatencyCombineWeights: return "low_latency_combine send (waiting for a source's top-k weights)";
    case Phase::kLowLatencyCombineRecv: return "low_latency_combine receive (waiting for an expert rank's sums)";
    case Phase::kLowLatencyCallMismatch: return "low-latency call check";
    case Phase::kLowLatencyBadMessage: return "low_latency_dispatch receive (a message names a row outside its segment)";
    case Phase::kLowLatencyOverrun: return "low-latency call (a peer is two calls ahead)";
    case Phase::kRailReceive: return "multi-node dispatch, rail stage (waiting for a source node's tokens)";
    case Phase::kRailBadCount: return "multi-node dispatch, rail stage (a source node sent more tokens than fit)";
    case Phase::kRailReturn: return "multi-node combine, rail return (waiting for a destination node's row)";
    case Phase::kLowLatencyCredit:
      return "low-latency send (waiting for a peer to finish receiving the previous call of this half)";
    case Phase::kLowLatencyHalfBusy: return "low-latency send (the previous call of this half is not received)";
  }
  return "unknown";
}

/// "dispatch, half 1" for a low-latency credit's channel (wire * 2 + half, LowLatencyWire).
inline std::string ll_wire_half_name(int channel) {
  static const char* const wires[] = {"dispatch", "combine", "hooked combine over NVLink"};
  if (channel < 0 || channel >= 6) return "wire ?";
  return std::string(wires[channel / 2]) + ", half " + std::to_string(channel % 2);
}

/// What kind of error a record is (flashep/errors.hpp).
inline ErrorKind kind_of(const DeviceErrorRecord& r) {
  if (static_cast<Cause>(r.cause) == Cause::kPeerAbort) return ErrorKind::kPeerFailed;
  switch (static_cast<Phase>(r.phase)) {
    case Phase::kLayoutInvalidExpert:
    case Phase::kDispatchInvalidExpert:
    case Phase::kDispatchTooManyTokens:
    case Phase::kCombineBadHandle:
    case Phase::kDispatchBadHandle:
    case Phase::kNotifyBadRankCount:
    case Phase::kNotifyBadExpertCount:
    case Phase::kLowLatencyInvalidExpert:
    case Phase::kLowLatencyBadMessage:
    case Phase::kLowLatencyHalfBusy:
    case Phase::kRailBadCount:
      return ErrorKind::kDeviceFault;
    case Phase::kCallMismatch:
    case Phase::kLowLatencyCallMismatch:
    case Phase::kLowLatencyOverrun:
      return ErrorKind::kPeerMismatch;
    default:
      return ErrorKind::kTimeout;
  }
}

inline std::string describe(const DeviceErrorRecord& r, double timeout_s) {
  const Phase phase = static_cast<Phase>(r.phase);
  const std::string unusable = "; the buffer is unusable now and must be destroyed";
  std::string s = "flashep: rank " + std::to_string(r.rank) + ": ";
  if (static_cast<Cause>(r.cause) == Cause::kPeerAbort) {
    return s + "stopped in " + phase_name(phase) + " because rank " + std::to_string(r.peer) +
           " failed and aborted the buffer (its own error says why)" + unusable;
  }
  switch (phase) {
    case Phase::kLayoutInvalidExpert:
    case Phase::kDispatchInvalidExpert:
      return s + phase_name(phase) + ": token " + std::to_string(r.expected) + " has expert id " +
             std::to_string(r.observed) + " (num_experts " + std::to_string(r.peer) + "); nothing was written out of "
             "bounds" + unusable;
    case Phase::kLowLatencyInvalidExpert:
      return s + phase_name(phase) + ": topk_idx entry " + std::to_string(r.expected) + " is " +
             std::to_string(r.observed) + ", outside [-1, num_experts = " + std::to_string(r.peer) +
             ") or an expert the token names twice; nothing was sent" + unusable;
    case Phase::kLowLatencyCallMismatch:
      return s + "the ranks disagree on a low-latency call: rank " + std::to_string(r.peer) +
             " made another operation or used another T, H, E, top-k, dtype or combine wire (a combine hooked on one "
             "rank and not on another) (call hashes " +
             std::to_string(r.expected) + " here, " + std::to_string(r.observed) + " there)" + unusable;
    case Phase::kLowLatencyBadMessage:
      return s + phase_name(phase) + ": a message of rank " + std::to_string(r.peer) + " names position " +
             std::to_string(r.observed) + " of a segment of " + std::to_string(r.expected) +
             " rows; nothing was written" + unusable;
    case Phase::kLowLatencyOverrun:
      return s + phase_name(phase) + ": rank " + std::to_string(r.peer) +
             " signalled a later call while this rank waited for call " + std::to_string(r.expected) +
             ": more than two low-latency calls were in flight (at most two may be sent and not yet received)" +
             unusable;
    case Phase::kLowLatencyHalfBusy:
      return s + phase_name(phase) + ": call " + std::to_string(r.observed) + " would overwrite the data of call " +
             std::to_string(r.expected) + " (" + ll_wire_half_name(r.channel) +
             "), whose receive phase (its hook) has not run on this rank: run a call's hook before the next call "
             "on the same wire and half, and before a call of another (T, H, E)" + unusable;
    case Phase::kLowLatencyCredit:
      return s + phase_name(phase) + ": rank " + std::to_string(r.peer) + " did not say it finished receiving call " +
             std::to_string(r.expected) + " (" + ll_wire_half_name(r.channel) + "; the last it said: " +
             (r.observed < 0 ? std::string("none") : std::to_string(r.observed)) +
             ") within the timeout, so this rank could not send the next call there (a rank stopped, or more "
             "calls in flight than the two halves hold)" + unusable;
    case Phase::kCombineBadHandle:
      return s + phase_name(phase) + ": it sends rows up to " + std::to_string(r.observed) + " of x to rank " +
             std::to_string(r.peer) + " on channel " + std::to_string(r.channel) + ", but x has " +
             std::to_string(r.expected) + " rows (a handle of another dispatch, or modified). Nothing was read "
             "out of bounds" + unusable;
    case Phase::kDispatchBadHandle:
      return s + phase_name(phase) + ": rows from rank " + std::to_string(r.peer) + " on channel " +
             std::to_string(r.channel) + " decode to [" + std::to_string(r.observed) + ", +" +
             std::to_string(r.block) + ") but the output has " + std::to_string(r.expected) +
             " rows (negative or decreasing prefix entries: a handle of another dispatch, or modified). Nothing "
             "was written" + unusable;
    case Phase::kNotifyBadRankCount:
      return s + phase_name(phase) + ": num_tokens_per_rank[" + std::to_string(r.peer) + "] is " +
             std::to_string(r.observed) + " but is_token_in_rank routes " + std::to_string(r.expected) +
             " tokens to rank " + std::to_string(r.peer) + unusable;
    case Phase::kNotifyBadExpertCount:
      return s + phase_name(phase) + ": num_tokens_per_expert[" + std::to_string(r.channel) + "] is " +
             std::to_string(r.observed) + " but topk_idx names expert " + std::to_string(r.channel) + " " +
             std::to_string(r.expected) + " times" + unusable;
    case Phase::kDispatchTooManyTokens:
      return s + phase_name(phase) + ": " + std::to_string(r.observed) + " tokens arrived, num_worst_tokens is " +
             std::to_string(r.expected) + unusable;
    case Phase::kCallMismatch: {
      // channel: the CallInfo field (call_check.hpp); expected: this rank's value; observed: the peer's.
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
             ". Every rank must make the same sequence of calls with the same config and shapes" + unusable;
    }
    case Phase::kSendWaitRowLoad:
      return s + "timed out after " + std::to_string(timeout_s) + " s in " + phase_name(phase) + " on channel " +
             std::to_string(r.channel) + " (item " + std::to_string(r.expected) + ", block " +
             std::to_string(r.block) + "): a copy within this GPU did not complete" + unusable;
    default:
      break;
  }
  s += "timed out after " + std::to_string(timeout_s) + " s in " + phase_name(phase);
  if (r.peer >= 0) s += ", waiting for rank " + std::to_string(r.peer);
  if (r.channel >= 0) s += " on channel " + std::to_string(r.channel);
  s += " (awaited " + std::to_string(r.expected) + ", saw " + std::to_string(r.observed) + ", block " +
       std::to_string(r.block) + "). A peer did not join the same operation, or died" + unusable;
  return s;
}

}  // namespace flashep
