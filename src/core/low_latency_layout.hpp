// The low-latency (decode) region of a buffer: where its signals, its local state and its messages
// live, and the host+device arithmetic the kernels and the CPU tests share.
//
// Wire format (rank-major: the floor of issue 8 says one message per (token, expert) cannot reach
// the aim). Dispatch sends each token once per destination rank; the message carries the row (FP8
// cast in the kernel, or BF16), its scales, the source token index and, per top-k slot, the local
// expert on the destination and the row's position in that expert's segment of this source. The
// destination expands it into one row per local expert. Combine reverses that: the destination
// (the expert side) first receives each source's top-k weights, reduces the rows of its own experts
// per token (float32, weighted), and sends one BF16 partial sum per (token, rank) back; the source
// adds its partial sums.
//
// Every message is its own signal: dispatch sends its counts first (the total, with the call's
// signal), then each message raises its own flag; combine sends its weights first (with a signal),
// then each partial sum raises its own flag. A receiver works on each message as it lands; no
// sender waits for its last block before signalling.
//
// The region (offsets from its base; the same layout in every allocation that holds one):
//   signals      (peers write; depend on R only)   per half and source: dispatch total, combine
//                                                    weights
//   state        (this rank only; R only)           sequence numbers, tickets, send counters, mask
//   credits      (peers write; R only)              per source, wire and half: the last call whose
//                                                    receive phase that source finished (its recv_done)
//   counts       (peers write; R only)              per half and source: call hash, messages, L
//                                                    row counts (stamped 64-bit words)
//   flags        (peers write; R only)              per source, slot and half (the halves adjacent):
//                                                    dispatch messages; per half, source and token (up
//                                                    to the largest T): combine partials; per half,
//                                                    token and top-k slot: per-slot rows
//   weights      (peers write)                      per half and source: call hash, [n][K] float32
//   dispatch in  (peers write)                      per half and source: T messages
//   combine in   (peers write)                      per half and source: T partial rows (BF16 or
//                                                    LogFMT); then per half [T][32] per-slot rows
//   stages       (this rank; NVSHMEM puts read them) dispatch messages, counts, weights, partials
//   zero-copy    (this rank only)                   two halves of [L][R*T][H] BF16
// Signals, state and the flags sit at offsets that do not depend on (T, H, E), so calls of
// other shapes never reinterpret them (a flag in an area that moves with T could read old data of
// another shape as a signal).
//
// Signals are 64-bit words "sequence number of the call << 32 | valid bit | count": a peer's word of
// an older call (same half, two calls back) never reads as the current one, a cleaned (zero) word
// never reads as valid, and nothing has to be reset between calls (CUDA-graph replays included:
// the sequence numbers live on the GPU).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/fast_divmod.hpp"
#include "core/hd.hpp"
#include "core/logfmt.hpp"
#include "flashep/config.hpp"

namespace flashep {

/// Largest E of a low-latency call (per-(source, expert) counts are staged in shared memory).
inline constexpr int kMaxLowLatencyExperts = 2048;
/// Largest T (num_max_dispatch_tokens_per_rank): positions in a segment stay far below 2^31.
inline constexpr int kMaxLowLatencyTokens = 8192;
/// Largest H: a 512-thread block moves a row in at most two 16-byte words per thread.
inline constexpr int kMaxLowLatencyHidden = 8192;
/// Top-k slots a message reserves (any K <= kMaxTopk fits).
inline constexpr int kLowLatencyTopkSlots = kMaxTopk;
/// 64-bit words of one source's counts block: the call hash, the message count, then L row counts
/// (L <= E / R). Every word is stamped like a signal (ll_signal(seq, value)), so a receiver can
/// read the block without waiting for its signal: a word of this call says so itself.
inline constexpr int kCountWordHash = 0;
inline constexpr int kCountWordMessages = 1;
inline constexpr int kCountWordRows = 2;
FLASHEP_HD int ll_count_words(int num_ranks) {
  const int most_local = (kMaxLowLatencyExperts + num_ranks - 1) / num_ranks;
  return kCountWordRows + (most_local < kMaxLocalExperts ? most_local : kMaxLocalExperts);
}

// ---- signals -------------------------------------------------------------------------------------

inline constexpr uint64_t kSignalValid = 0x80000000ull;
FLASHEP_HD uint64_t ll_signal(uint32_t seq, int count) {
  return (uint64_t(seq) << 32) | kSignalValid | uint64_t(uint32_t(count) & 0x7fffffffu);
}
/// Whether `value` is the signal of call `seq`.
FLASHEP_HD bool ll_signal_is(uint64_t value, uint32_t seq) {
  return (value >> 32) == uint64_t(seq) && (value & kSignalValid) != 0;
}
/// Whether `value` is the signal of a call later than `seq` (a peer two calls ahead: more than two
/// low-latency calls in flight, which the double buffer cannot hold). Wrap-safe.
FLASHEP_HD bool ll_signal_is_ahead(uint64_t value, uint32_t seq) {
  return (value & kSignalValid) != 0 && static_cast<int32_t>(static_cast<uint32_t>(value >> 32) - seq) > 0;
}
FLASHEP_HD int ll_signal_count(uint64_t value) { return static_cast<int>(value & 0x7fffffffull); }
/// Whether `value` is the signal of call `seq` or of a later one (a credit: the receive of `seq`, or
/// of a later call of the same wire and half, has finished). Wrap-safe.
FLASHEP_HD bool ll_signal_at_least(uint64_t value, uint32_t seq) {
  return (value & kSignalValid) != 0 && static_cast<int32_t>(static_cast<uint32_t>(value >> 32) - seq) >= 0;
}

// ---- messages ------------------------------------------------------------------------------------

/// One dispatch message: [row][scales (FP8)][meta], `bytes` long for this dtype. Messages sit
/// `stride` apart, the stride of the largest form (BF16), so one layout serves every dtype.
/// Meta (int32): src_token, reserved[3], expert[slots] (global expert id of each top-k slot, -1
/// for empty or masked; the destination keeps its own), pos[slots] (the row's position in its
/// expert's segment of this source). The message is the same for every destination, so NVSHMEM
/// destinations share one staged copy.
struct LowLatencyMessage {
  int row_bytes;      // H * element size of this call
  int scale_offset;   // float32[H / 128] (FP8 only)
  int meta_offset;
  int bytes;          // what travels
  int stride;         // bytes between messages (any dtype), multiple of 128
};
inline constexpr int kLowLatencyMetaBytes = 16 + 8 * kLowLatencyTopkSlots;
FLASHEP_HD LowLatencyMessage make_ll_message(int hidden, bool fp8) {
  LowLatencyMessage m{};
  m.row_bytes = hidden * (fp8 ? 1 : 2);
  m.scale_offset = static_cast<int>(align_up(m.row_bytes, 16));
  m.meta_offset = static_cast<int>(align_up(m.scale_offset + (fp8 ? (hidden / 128) * 4 : 0), 16));
  m.bytes = m.meta_offset + kLowLatencyMetaBytes;
  const int64_t largest = align_up(int64_t(hidden) * 2, 16) + align_up((hidden / 128) * 4, 16) + kLowLatencyMetaBytes;
  m.stride = static_cast<int>(align_up(largest, 128));
  return m;
}
/// Int offsets inside the meta block.
inline constexpr int kMetaSrcToken = 0;
inline constexpr int kMetaExpert = 4;
inline constexpr int kMetaPos = 4 + kLowLatencyTopkSlots;

// ---- the region ----------------------------------------------------------------------------------

/// This rank's state (the `state` block), at LowLatencyLayout::state().
inline constexpr int kLowLatencyCallSlots = 16;
struct LowLatencyState {
  uint32_t send_seq;   // calls whose send phase ran
  uint32_t barrier_generation;  // grid_barrier's (shrink mode)
  int ticket[4];       // blocks done, per kernel phase (kTicket*)
  /// The sequence number each call's send phase used, by the host's call slot (call index % 16):
  /// a receive phase launched later (the hook) reads its own call's number here, so hooks may run
  /// in any order and a fused call may come between a send and its hook.
  uint32_t call_seq[kLowLatencyCallSlots];
  /// LowLatencyLayout::layout_id of the last call this rank sent (0: none since the last clean). A
  /// call of another layout may overlap any area of any half: its send waits for every credit.
  uint32_t layout_id;
  int reserved[9];
  /// Per wire and half (LowLatencyWire): ll_signal(seq, 0) of the last call this rank sent there
  /// (written by the send phase's last block) and of the last call whose receive phase finished
  /// here (written by every block of that receive at its end). Read by later kernels only.
  uint64_t last_sent[3][2];
  uint64_t recv_done[3][2];
  // followed by: int msg_counter[2][R]; int expert_counter[2][kMaxLowLatencyExperts]; int mask[R]
};
/// Bytes reserved for the state block.
inline constexpr int kLowLatencyStateBytes = 256;
static_assert(sizeof(LowLatencyState) <= kLowLatencyStateBytes, "the state fits its block");
static_assert(offsetof(LowLatencyState, last_sent) % 16 == 0 && offsetof(LowLatencyState, recv_done) % 16 == 0,
              "the kernels load each (wire) pair of these words with one 16-byte load");
/// The areas of a half that calls write (their "wire"): a call may write a half of one wire only
/// once every rank has finished reading the previous call of that half and wire (the credits).
enum LowLatencyWire : int {
  kWireDispatch = 0,        // counts, dispatch flags, dispatch messages
  kWireCombineReduced = 1,  // weights (read by the expert side's send phase), partial sums, their flags
  kWireCombineSlots = 2,    // per-slot rows and their flags (hooked combine, every peer direct)
  kLowLatencyWires = 3,
};
inline constexpr int kTicketDispatchSend = 0;
inline constexpr int kTicketGridBarrier = 1;  // arrivals at grid_barrier
inline constexpr int kTicketCombineSend = 2;

/// The 64-bit signal words, per half and source (LowLatencyLayout::signal).
enum LowLatencySignal : int {
  kSignalDispatchTotal = 0,   // seq | messages this source sent (its counts block is there)
  kSignalCombineWeights = 1,  // seq | tokens (its weights block is there)
  kLowLatencySignalKinds = 2,
};

struct LowLatencyLayout {
  int num_ranks;         // R
  int num_experts;       // E
  int max_tokens;        // T
  int hidden;            // H
  LowLatencyMessage msg; // of the largest form (BF16): the stride is the same for FP8
  int num_local;         // L = E / R, experts per rank
  int count_words;       // ll_count_words(R): the stride of a counts block
  uint32_t layout_id;    // (T, H, E) hashed, never 0 (LowLatencyState::layout_id)
  // Divisions the kernels do on their critical path, by divisors of the layout (R, L, and the
  // words a source's counts block holds, kCountWordRows + L).
  FastDivmod div_ranks, div_local, div_source_words;
  int64_t state_offset, msg_counter_offset, expert_counter_offset,
      mask_offset, credits_offset, counts_offset, dispatch_flags_offset, combine_flags_offset, combine_slot_flags_offset, weights_offset,
      dispatch_in_offset, combine_in_offset, combine_slot_in_offset, dispatch_stage_offset,
      counts_stage_offset, weights_stage_offset, combine_stage_offset, zero_copy_offset, end;

  FLASHEP_HD int num_local_experts() const { return num_local; }
  FLASHEP_HD int64_t row_bytes_bf16() const { return int64_t(hidden) * 2; }
  /// A combine partial on the wire: BF16 (2H bytes) or LogFMT-10 (groups, then metas).
  FLASHEP_HD int64_t combine_row_bytes() const { return logfmt_row_bytes(hidden); }
  // signals: uint64 [kLowLatencySignalKinds][2][R]
  FLASHEP_HD int64_t signal(int kind, int half, int rank) const {
    return ((int64_t(kind) * 2 + half) * num_ranks + rank) * 8;
  }
  FLASHEP_HD int64_t dispatch_total(int half, int src) const { return signal(kSignalDispatchTotal, half, src); }
  FLASHEP_HD int64_t combine_weights(int half, int src) const { return signal(kSignalCombineWeights, half, src); }
  FLASHEP_HD int64_t state() const { return state_offset; }
  FLASHEP_HD int64_t msg_counter(int half, int dst) const { return msg_counter_offset + (int64_t(half) * num_ranks + dst) * 4; }
  FLASHEP_HD int64_t expert_counter(int half, int expert) const {
    return expert_counter_offset + (int64_t(half) * kMaxLowLatencyExperts + expert) * 4;
  }
  FLASHEP_HD int64_t mask(int rank) const { return mask_offset + int64_t(rank) * 4; }
  /// `src`'s receive progress on `wire` and `half` (ll_signal(seq, 0) of the last call whose receive
  /// phase it finished), which `src` forwards at the entry of each of its send phases. The halves of
  /// one (src, wire) are adjacent (one 16-byte load), and the sources of one wire too (the threads
  /// of a warp that load them, one per source, share lines).
  FLASHEP_HD int64_t credit(int src, int wire, int half) const {
    return credits_offset + ((int64_t(wire) * num_ranks + src) * 2 + half) * 8;
  }
  FLASHEP_HD int64_t counts(int half, int src) const {
    return counts_offset + (int64_t(half) * num_ranks + src) * count_words * 8;
  }
  /// A source's combine weights: int32 call hash, 3 reserved, then float32 [n][K].
  FLASHEP_HD int64_t weights_block_bytes() const { return align_up(int64_t(max_tokens) * kLowLatencyTopkSlots * 4 + 16, 16); }
  FLASHEP_HD int64_t weights(int half, int src) const {
    return weights_offset + (int64_t(half) * num_ranks + src) * weights_block_bytes();
  }
  /// The 64-bit signal of message `slot` from `src` (ll_signal(seq, 0) once the message is there):
  /// a dispatch message is its own signal, so the receiver expands it as soon as it lands. The two
  /// halves' flags of one (src, slot) are adjacent (16-byte aligned): a hook's receive loads both
  /// with one acquire before it knows which half its call is.
  FLASHEP_HD int64_t dispatch_flag(int half, int src, int slot) const {
    return dispatch_flags_offset + ((int64_t(src) * kMaxLowLatencyTokens + slot) * 2 + half) * 8;
  }
  /// The 64-bit signal of `src`'s partial sum for our token `token` (ll_signal(seq, 0) once there).
  FLASHEP_HD int64_t combine_flag(int half, int src, int token) const {
    return combine_flags_offset + ((int64_t(half) * num_ranks + src) * kMaxLowLatencyTokens + token) * 8;
  }
  FLASHEP_HD int64_t dispatch_in(int half, int src, int slot) const {
    return dispatch_in_offset + ((int64_t(half) * num_ranks + src) * max_tokens + slot) * msg.stride;
  }
  /// Rows of a call's partial sums sit `combine_stride(logfmt)` apart: 2H for BF16 (the area holds
  /// the wider LogFMT rows too).
  FLASHEP_HD int64_t combine_stride(bool logfmt) const { return logfmt ? combine_row_bytes() : row_bytes_bf16(); }
  /// A half of an inbox of combine rows starts at the same place for either stride (a LogFMT call
  /// and a BF16 call in flight at once use different halves, and must not overlap).
  FLASHEP_HD int64_t combine_in(int half, int src, int token, bool logfmt) const {
    return combine_in_offset + int64_t(half) * num_ranks * max_tokens * combine_row_bytes() +
           (int64_t(src) * max_tokens + token) * combine_stride(logfmt);
  }
  /// Per-slot combine (a hooked call whose peers are all direct): the expert row for our token
  /// `token`'s top-k slot `k`, in its own area (a reduced call of the same half may be in flight),
  /// and its 64-bit flag (ll_signal(seq, the call hash) once there), at an offset no (T, H, E)
  /// moves.
  FLASHEP_HD int64_t combine_slot_in(int half, int token, int k, bool logfmt) const {
    return combine_slot_in_offset + int64_t(half) * max_tokens * kLowLatencyTopkSlots * combine_row_bytes() +
           (int64_t(token) * kLowLatencyTopkSlots + k) * combine_stride(logfmt);
  }
  FLASHEP_HD int64_t combine_slot_flag(int half, int token, int k) const {
    return combine_slot_flags_offset + ((int64_t(half) * kMaxLowLatencyTokens + token) * kLowLatencyTopkSlots + k) * 8;
  }
  FLASHEP_HD int64_t dispatch_stage(int half, int token) const {
    return dispatch_stage_offset + (int64_t(half) * max_tokens + token) * msg.stride;
  }
  FLASHEP_HD int64_t counts_stage(int half, int dst) const {
    return counts_stage_offset + (int64_t(half) * num_ranks + dst) * count_words * 8;
  }
  FLASHEP_HD int64_t weights_stage(int half) const { return weights_stage_offset + int64_t(half) * weights_block_bytes(); }
  FLASHEP_HD int64_t combine_stage(int half, int dst, int slot, bool logfmt) const {
    return combine_stage_offset + ((int64_t(half) * num_ranks + dst) * max_tokens + slot) * combine_stride(logfmt);
  }
  /// Rows of one expert in the dispatch output: R * T.
  FLASHEP_HD int64_t rows_per_expert() const { return int64_t(num_ranks) * max_tokens; }
  FLASHEP_HD int64_t zero_copy_half_bytes() const {
    return int64_t(num_local_experts()) * rows_per_expert() * row_bytes_bf16();
  }
  FLASHEP_HD int64_t zero_copy(int half) const { return zero_copy_offset + int64_t(half) * zero_copy_half_bytes(); }
};

FLASHEP_HD LowLatencyLayout make_low_latency_layout(int max_tokens, int hidden, int num_ranks, int num_experts) {
  LowLatencyLayout l{};
  l.num_ranks = num_ranks;
  l.num_experts = num_experts;
  l.max_tokens = max_tokens;
  l.hidden = hidden;
  l.msg = make_ll_message(hidden, false);
  l.num_local = num_ranks > 0 ? num_experts / num_ranks : 0;
  l.count_words = ll_count_words(num_ranks);
  {
    const int fields[3] = {max_tokens, hidden, num_experts};
    l.layout_id = call_fields_hash(fields, 3) | 1u;
  }
  l.div_ranks = FastDivmod::of(num_ranks);
  l.div_local = FastDivmod::of(l.num_local);
  l.div_source_words = FastDivmod::of(kCountWordRows + l.num_local);
  const int64_t R = num_ranks, T = max_tokens;
  int64_t at = align_up(int64_t(kLowLatencySignalKinds) * 2 * R * 8, 128);
  l.state_offset = at;
  at += kLowLatencyStateBytes;
  l.msg_counter_offset = at;
  at = align_up(at + 2 * R * 4, 128);
  l.expert_counter_offset = at;
  at = align_up(at + 2 * kMaxLowLatencyExperts * 4, 128);
  l.mask_offset = at;
  at = align_up(at + R * 4, 128);
  l.credits_offset = at;
  at = align_up(at + R * kLowLatencyWires * 2 * 8, 128);
  l.counts_offset = at;
  at = align_up(at + 2 * R * ll_count_words(num_ranks) * 8, 128);
  l.dispatch_flags_offset = at;
  at = align_up(at + 2 * R * int64_t(kMaxLowLatencyTokens) * 8, 128);
  l.combine_flags_offset = at;
  at = align_up(at + 2 * R * int64_t(kMaxLowLatencyTokens) * 8, 128);
  l.combine_slot_flags_offset = at;
  at = align_up(at + 2 * int64_t(kMaxLowLatencyTokens) * kLowLatencyTopkSlots * 8, 128);
  // From here on the offsets depend on (T, H, E).
  l.weights_offset = at;
  at = align_up(at + 2 * R * l.weights_block_bytes(), 128);
  l.dispatch_in_offset = at;
  at = align_up(at + 2 * R * T * l.msg.stride, 128);
  l.combine_in_offset = at;
  at = align_up(at + 2 * R * T * l.combine_row_bytes(), 128);
  l.combine_slot_in_offset = at;
  at = align_up(at + 2 * T * int64_t(kLowLatencyTopkSlots) * l.combine_row_bytes(), 128);
  l.dispatch_stage_offset = at;
  at = align_up(at + 2 * T * l.msg.stride, 128);
  l.counts_stage_offset = at;
  at = align_up(at + 2 * R * ll_count_words(num_ranks) * 8, 128);
  l.weights_stage_offset = at;
  at = align_up(at + 2 * l.weights_block_bytes(), 128);
  l.combine_stage_offset = at;
  at = align_up(at + 2 * R * T * l.combine_row_bytes(), 128);
  l.zero_copy_offset = at;
  at = align_up(at + 2 * l.zero_copy_half_bytes(), 128);
  l.end = at;
  return l;
}

/// Bytes of the part of the region every layout shares (signals, state, counts): what
/// clean_low_latency_buffer resets.
FLASHEP_HD int64_t ll_fixed_bytes(int num_ranks) { return make_low_latency_layout(1, 128, num_ranks, num_ranks).weights_offset; }

/// get_low_latency_rdma_size_hint(T, H, R, E): the region's bytes (a multiple of 128).
FLASHEP_HD int64_t low_latency_region_bytes(int max_tokens, int hidden, int num_ranks, int num_experts) {
  return make_low_latency_layout(max_tokens, hidden, num_ranks, num_experts).end;
}

/// The combine plan a dispatch leaves in its handle (int32): per source, its message count, then
/// per message the source token and, per top-k slot, the output row (expert * R*T + row) or -1.
FLASHEP_HD int64_t ll_plan_ints(int num_ranks, int max_tokens, int num_topk) {
  return int64_t(num_ranks) + int64_t(num_ranks) * max_tokens * (num_topk + 1);
}
FLASHEP_HD int64_t ll_plan_entry(int num_ranks, int max_tokens, int num_topk, int src, int slot) {
  return int64_t(num_ranks) + (int64_t(src) * max_tokens + slot) * (num_topk + 1);
}

/// What every rank of a low-latency call must agree on, folded into one int that travels with the
/// counts (a mismatch fails the call on the receiver instead of misreading messages).
FLASHEP_HD int ll_call_hash(int op, int max_tokens, int hidden, int num_experts, int num_topk, int fp8) {
  const int fields[6] = {op, max_tokens, hidden, num_experts, num_topk, fp8};
  return static_cast<int>(call_fields_hash(fields, 6));
}

/// Blocks of a low-latency kernel: one per item (a token to send, a message to expand, a sum to
/// make), up to R * T items, at most the SMs (every block must be resident: the kernels are
/// launched cooperatively, and blocks wait for each other's signals).
inline int ll_num_blocks(int num_ranks, int max_tokens, int num_device_sms) {
  const int64_t want = int64_t(num_ranks) * max_tokens;
  return static_cast<int>(want < 1 ? 1 : (want > num_device_sms ? num_device_sms : want));
}

/// How a combine receive spreads its tokens over the blocks: each token's output row is cut into
/// `chunks` runs of `chunk_words` 16-byte words (a multiple of 32: whole warps, and whole LogFMT
/// groups of 16 words), one work item per (token, chunk), so that a few tokens still use many SMs
/// (one block per token left most of the GPU idle at small batches, with a block's threads walking
/// a 7168-wide row in two rounds). Every word of every token is in exactly one item; items <= the
/// blocks when the tokens are fewer than the blocks, else one chunk per token.
struct LowLatencyReceiveSplit {
  int chunks = 1;       // items per token
  int chunk_words = 0;  // words per item (the last chunk of a row may be shorter)
};
inline constexpr int kLowLatencyMinChunkWords = 32;

FLASHEP_HD LowLatencyReceiveSplit ll_combine_receive_split(int num_tokens, int num_blocks, int num_words) {
  LowLatencyReceiveSplit split;
  split.chunk_words = num_words;
  if (num_tokens < 1 || num_blocks <= num_tokens || num_words <= kLowLatencyMinChunkWords) return split;
  const int most = (num_words + kLowLatencyMinChunkWords - 1) / kLowLatencyMinChunkWords;
  const int want = num_blocks / num_tokens < most ? num_blocks / num_tokens : most;
  const int per = (num_words + want - 1) / want;
  split.chunk_words = (per + kLowLatencyMinChunkWords - 1) / kLowLatencyMinChunkWords * kLowLatencyMinChunkWords;
  split.chunks = (num_words + split.chunk_words - 1) / split.chunk_words;
  if (split.chunks == 1) split.chunk_words = num_words;  // a whole row, however it was reached
  return split;
}

/// Blocks of a combine's receive-only kernel (a hook): one per (token, chunk) item of the split it
/// will run with (ll_combine_receive_split on the SMs; whole rows in shrink mode), at most the SMs.
/// It has no send phase to size for, and a block without an item would still run the entry's loads.
/// launch_low_latency_combine, given this count, computes the same split again.
inline int ll_combine_receive_blocks(int num_tokens, int hidden, int num_device_sms, bool shrink) {
  const int chunks = shrink ? 1 : ll_combine_receive_split(num_tokens, num_device_sms, hidden / 8).chunks;
  const int64_t want = int64_t(num_tokens) * chunks;
  return static_cast<int>(want < 1 ? 1 : (want > num_device_sms ? num_device_sms : want));
}

}  // namespace flashep
