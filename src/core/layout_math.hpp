// The arithmetic of channels and of the NVLink buffer layout, as host+device functions so the CPU
// tests exercise exactly what the kernels compute.
//
// The NVLink allocation of every rank (shared with its peers over CUDA IPC) is:
//
//   [ ring region (num_nvl_bytes): one ring per (channel, source rank), `ring_depth` slots each    ]
//   [ control header: barrier signals | barrier epoch | call infos (CallInfo, per source and epoch
//     parity) | notify slots (one per source) | tails | heads ]
//
// A ring (c, s) in rank d's buffer carries channel c of source s to d. Its *tail* (slots written)
// lives in d's header and is written by s; its *head* (slots consumed) lives in s's header at
// index (c, d) and is written by d. So every spinning reader polls its own memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flashep/config.hpp"

#if defined(__CUDACC__)
#define FLASHEP_HD __host__ __device__ __forceinline__
#else
#define FLASHEP_HD inline
#endif

namespace flashep {

FLASHEP_HD constexpr int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}
FLASHEP_HD constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

/// Channels per block (see flashep::channels_per_block). Every channel has its own sender and
/// receiver warps, each with a pipeline of bulk copies in shared memory (src/kernels/ring_sender.cuh),
/// so a block needs only a few channels to keep NVLink busy; two split the block's shared memory
/// while giving every SM two independent token streams.
inline constexpr int kMaxChannelsPerBlock = 2;
/// Largest NVLink buffer: kernels address it in 16-byte words with 32-bit offsets (64 GiB).
inline constexpr int64_t kMaxNvlBufferBytes = int64_t(16) << 32;
FLASHEP_HD constexpr int block_channel_count(int num_nvl_ranks) { return num_nvl_ranks > 8 ? 1 : kMaxChannelsPerBlock; }

/// Combine receiver warps per channel (tokens of a channel are dealt to them in turn).
inline constexpr int kCombineWorkers = 8;

/// Pipelines of bulk copies: every pipelined warp owns `stages` ring-slot-sized stages of shared
/// memory. The stages of a block share kBulkStageBudgetBytes (H100/H200 allow 227 KB per block).
inline constexpr int kMaxBulkStages = 8;
inline constexpr int kBulkStageBudgetBytes = 200 * 1024;
/// Ring tails a sender warp remembers to publish them late (ring_sender.cuh), per lane.
inline constexpr int kBulkTailHistory = 16;

/// Stages per pipelined warp when `pipelined_warps` warps of a block split the budget; 0 when a
/// single slot does not fit.
FLASHEP_HD int bulk_stages(int pipelined_warps, int slot_bytes) {
  const int fit = kBulkStageBudgetBytes / (pipelined_warps * slot_bytes);
  return fit < kMaxBulkStages ? fit : kMaxBulkStages;
}
/// Dynamic shared memory of a dispatch block: the sender warp of each channel is pipelined
/// (`stages` slots, one mbarrier per stage, a tail history); receivers copy without shared memory.
FLASHEP_HD int dispatch_smem_bytes(int channels_in_block, int stages, int slot_bytes) {
  return channels_in_block * stages * (slot_bytes + 8) + channels_in_block * kBulkTailHistory * 32 * 4;
}
FLASHEP_HD int dispatch_stages(int channels_in_block, int slot_bytes) {
  return bulk_stages(channels_in_block, slot_bytes);
}
/// Threads of a dispatch block: per channel one sender warp and one receiver warp per source.
FLASHEP_HD constexpr int dispatch_block_threads(int channels_in_block, int num_nvl_ranks) {
  return channels_in_block * (1 + num_nvl_ranks) * 32;
}
/// Dynamic shared memory of a combine block: only the sender warps (one per channel) are pipelined.
FLASHEP_HD int combine_smem_bytes(int channels_in_block, int stages, int slot_bytes) {
  return channels_in_block * stages * (slot_bytes + 8) + channels_in_block * kBulkTailHistory * 32 * 4;
}
FLASHEP_HD int combine_stages(int channels_in_block, int slot_bytes) {
  return bulk_stages(channels_in_block, slot_bytes);
}
/// Sender warps of a combine block: one bulk-copy warp per channel, or one plain-copy warp per
/// (channel, destination).
FLASHEP_HD constexpr int combine_sender_warps(int channels_in_block, int num_nvl_ranks, bool bulk_sender) {
  return bulk_sender ? channels_in_block : channels_in_block * num_nvl_ranks;
}
/// Threads of a combine block: its senders and kCombineWorkers receiver warps per channel.
FLASHEP_HD constexpr int combine_block_threads(int channels_in_block, int num_nvl_ranks, bool bulk_sender) {
  return (combine_sender_warps(channels_in_block, num_nvl_ranks, bulk_sender) + channels_in_block * kCombineWorkers) *
         32;
}

/// The dispatch and combine kernels are instantiated for domains of up to 2, 4, 8 and 16 ranks
/// (register budgets and unrolling differ); each has a launch bound, the block of its largest domain.
FLASHEP_HD constexpr int kernel_instance_for(int num_ranks) {
  return num_ranks <= 2 ? 2 : num_ranks <= 4 ? 4 : num_ranks <= 8 ? 8 : 16;
}
FLASHEP_HD constexpr int dispatch_launch_bound(int instance_ranks) {
  return dispatch_block_threads(block_channel_count(instance_ranks), instance_ranks);
}
FLASHEP_HD constexpr int combine_launch_bound(int instance_ranks, bool bulk_sender) {
  return bulk_sender ? kMaxChannelsPerBlock * (1 + kCombineWorkers) * 32
                     : combine_block_threads(block_channel_count(instance_ranks), instance_ranks, false);
}
/// The instantiation that runs a domain of `num_ranks` whose block has `block_threads` threads,
/// when a debug knob (FLASHEP_DEBUG_KERNEL_RANKS) asks for at least `requested`: the one for
/// max(num_ranks, requested), or the one for num_ranks where the block exceeds the larger one's
/// launch bound (`launch_bound(instance)`; the 16-rank kernels have one channel per block).
template <typename LaunchBound>
FLASHEP_HD int kernel_instance(int num_ranks, int requested, int block_threads, LaunchBound launch_bound) {
  const int wanted = kernel_instance_for(num_ranks > requested ? num_ranks : requested);
  return block_threads <= launch_bound(wanted) ? wanted : kernel_instance_for(num_ranks);
}

/// Half-open token range [begin, end) of `channel` when `num_tokens` are split over `num_channels`
/// contiguous, balanced ranges (sizes differ by at most one).
struct TokenRange {
  int begin;
  int end;
};
FLASHEP_HD TokenRange channel_token_range(int num_tokens, int num_channels, int channel) {
  const int64_t n = num_tokens;
  return TokenRange{static_cast<int>(n * channel / num_channels),
                    static_cast<int>(n * (channel + 1) / num_channels)};
}

/// Channel owning token `token` (inverse of channel_token_range).
FLASHEP_HD int channel_of_token(int num_tokens, int num_channels, int token) {
  // Largest c with floor(n*c/C) <= token; start from the estimate and correct.
  int c = static_cast<int>((static_cast<int64_t>(token) * num_channels) / (num_tokens > 0 ? num_tokens : 1));
  while (c + 1 < num_channels && channel_token_range(num_tokens, num_channels, c + 1).begin <= token) ++c;
  while (c > 0 && channel_token_range(num_tokens, num_channels, c).begin > token) --c;
  return c;
}

/// Every ring slot starts on a 128-byte cache line, so a warp's 512-byte store of a row covers whole
/// lines (a 16-byte-aligned slot would split every store over 5 lines: partial writes over NVLink).
inline constexpr int kSlotAlignment = 128;

/// Ring slot of a dispatch: token row, FP8 scales, top-k (global expert ids, as the caller gave
/// them, and weights), source index.
struct DispatchSlotLayout {
  int row_bytes;     // H * element size
  int scale_offset;  // float32[num_scales]
  int num_scales;    // H / 128 for FP8, else 0
  int topk_idx_offset;      // int64[K], 8-byte aligned
  int topk_weights_offset;  // float32[K]
  int src_idx_offset;       // int32
  int slot_bytes;           // multiple of 16
};
FLASHEP_HD DispatchSlotLayout make_dispatch_slot(int hidden, int elem_size, bool has_scales, int num_topk) {
  DispatchSlotLayout s{};
  s.row_bytes = hidden * elem_size;
  s.scale_offset = static_cast<int>(align_up(s.row_bytes, 16));
  s.num_scales = has_scales ? hidden / 128 : 0;
  s.topk_idx_offset = static_cast<int>(align_up(s.scale_offset + s.num_scales * 4, 8));
  s.topk_weights_offset = s.topk_idx_offset + num_topk * 8;
  s.src_idx_offset = s.topk_weights_offset + num_topk * 4;
  s.slot_bytes = static_cast<int>(align_up(s.src_idx_offset + 4, kSlotAlignment));
  return s;
}

/// Ring slot of a combine: expert output row (bf16) and its top-k weights.
struct CombineSlotLayout {
  int row_bytes;
  int topk_weights_offset;
  int slot_bytes;
};
FLASHEP_HD CombineSlotLayout make_combine_slot(int hidden, int num_topk) {
  CombineSlotLayout s{};
  s.row_bytes = hidden * 2;
  s.topk_weights_offset = static_cast<int>(align_up(s.row_bytes, 16));
  s.slot_bytes = static_cast<int>(align_up(s.topk_weights_offset + num_topk * 4, kSlotAlignment));
  return s;
}

/// What the ranks of one collective call must agree on. Each rank writes its own into every peer at
/// the barrier that opens the call and compares the peers' with its own: a disagreement (one rank
/// in combine while another dispatches, a different config, hidden size, dtype or top-k) is a
/// usage error that would otherwise corrupt the rings or hang until the timeout.
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
inline constexpr int kCallInfoInts = 7;
inline constexpr int kCallInfoOptionalFrom = 3;  // fields from here on are compared only when both are known

/// Index of the first field on which two ranks' CallInfo (as kCallInfoInts ints) disagree, or -1.
FLASHEP_HD int call_info_mismatch(const int* mine, const int* theirs) {
  for (int i = 0; i < kCallInfoInts; ++i) {
    const bool compared = i < kCallInfoOptionalFrom || (mine[i] != 0 && theirs[i] != 0);
    if (compared && mine[i] != theirs[i]) return i;
  }
  return -1;
}

/// Offsets in one rank's NVLink allocation for a domain of `num_ranks` ranks. The first
/// `ring_capacity` bytes (= num_nvl_bytes, the part users see through get_local_buffer_tensor) hold
/// the rings, whose contents are transient; the control header after them holds state that must
/// survive between operations (barrier epochs, zeroed ring counters), out of users' reach.
struct NvlBufferLayout {
  int num_ranks;
  int64_t ring_capacity;          // bytes available to rings (num_nvl_bytes)
  int64_t barrier_signal_offset;  // int[kMaxNvlRanks]: epoch last signalled by each peer
  int64_t barrier_epoch_offset;   // int: this rank's barrier count (device state, graph-safe)
  int64_t call_info_offset;       // int[2][kMaxNvlRanks][kCallInfoInts]: each peer's CallInfo, by epoch parity
  int64_t notify_offset;          // num_ranks notify slots
  int64_t notify_slot_ints;       // ints per notify slot
  int64_t tail_offset;            // int[kMaxChannels][num_ranks]
  int64_t head_offset;            // int[kMaxChannels][num_ranks]
  int64_t allocation_bytes;       // total bytes to allocate (multiple of 128)

  /// Notify slot layout (ints): [num_tokens_per_rank: R][channel prefix: kMaxChannels][experts: L]
  FLASHEP_HD int64_t notify_slot(int src) const { return notify_offset + int64_t(src) * notify_slot_ints * 4; }
  /// Where `src` leaves its CallInfo for barrier `epoch` (double-buffered by parity: a peer can
  /// write epoch e + 2's only after this rank has read epoch e's and signalled e + 1).
  FLASHEP_HD int64_t call_info(int epoch, int src) const {
    return call_info_offset + (int64_t(epoch & 1) * kMaxNvlRanks + src) * kCallInfoInts * 4;
  }
  FLASHEP_HD int64_t tail(int channel, int peer) const { return tail_offset + (int64_t(channel) * num_ranks + peer) * 4; }
  FLASHEP_HD int64_t head(int channel, int peer) const { return head_offset + (int64_t(channel) * num_ranks + peer) * 4; }
  /// Byte offset of slot 0 of ring (channel, src).
  FLASHEP_HD int64_t ring(int channel, int src, int ring_depth, int slot_bytes) const {
    return (int64_t(channel) * num_ranks + src) * ring_depth * int64_t(slot_bytes);
  }
};

/// Ring bytes that `num_channels` channels of `ring_depth` slots of `slot_bytes` need on a domain
/// of `num_ranks` (a multiple of 128).
FLASHEP_HD int64_t ring_region_bytes(int num_ranks, int num_channels, int ring_depth, int slot_bytes) {
  return align_up(int64_t(num_channels) * num_ranks * ring_depth * slot_bytes, 128);
}

FLASHEP_HD NvlBufferLayout make_nvl_layout(int num_ranks, int64_t ring_capacity) {
  NvlBufferLayout l{};
  l.num_ranks = num_ranks;
  l.ring_capacity = ring_capacity;
  const int64_t header = align_up(ring_capacity, 128);
  l.barrier_signal_offset = header;
  l.barrier_epoch_offset = header + kMaxNvlRanks * 4;
  l.call_info_offset = align_up(l.barrier_epoch_offset + 4, 16);
  l.notify_offset = align_up(l.call_info_offset + int64_t(2) * kMaxNvlRanks * kCallInfoInts * 4, 128);
  l.notify_slot_ints = num_ranks + kMaxChannels + kMaxLocalExperts;
  l.tail_offset = align_up(l.notify_offset + int64_t(num_ranks) * l.notify_slot_ints * 4, 128);
  l.head_offset = align_up(l.tail_offset + int64_t(kMaxChannels) * num_ranks * 4, 128);
  l.allocation_bytes = align_up(l.head_offset + int64_t(kMaxChannels) * num_ranks * 4, 128);
  return l;
}

/// send_head encoding (a handle field): for token t and rank r, the ring slot index of t in its
/// channel's ring to r if t was sent to r, else -(slots used before t) - 1. Either way
/// slots_before() gives how many of the channel's tokens before t went to r, which is what a
/// combine receiver needs to release ring space in order.
FLASHEP_HD int encode_send_head(bool sent, int slots_before) { return sent ? slots_before : -slots_before - 1; }
FLASHEP_HD int slots_before(int send_head) { return send_head >= 0 ? send_head : -send_head - 1; }

/// The expert range [begin, end) of rank r when E experts are spread over R ranks.
FLASHEP_HD int local_expert_index(int64_t expert, int rank, int num_local_experts) {
  const int64_t begin = int64_t(rank) * num_local_experts;
  return (expert >= begin && expert < begin + num_local_experts) ? int(expert - begin) : -1;
}

}  // namespace flashep
