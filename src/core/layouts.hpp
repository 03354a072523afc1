// Where things live: token channels, ring slots, and the layout of every memory region a buffer
// owns. Host+device functions (hd.hpp), exercised by the CPU tests.
//
// A rank's buffer has two allocations, each reached through its own memory domain
// (src/transport/memory_domain.hpp):
//
//   NVLink allocation (CUDA IPC; every rank of the NVLink domain maps every other's):
//     [ intranode ring data: num_nvl_bytes, what get_local_buffer_tensor exposes              ]
//     [ intranode counters: notify slots | ring tails | ring heads                           ]
//     [ control block: abort word | error claim | barrier epoch | barrier signals | call infos ]
//   NVSHMEM allocation (symmetric heap; only when the buffer spans several NVLink domains and
//   num_rdma_bytes > 0):
//     [ RDMA data: num_rdma_bytes ][ RDMA header: abort word | transport-check signals ]
//
// The control block is shared by every mode (one epoch, one abort word, one error record per
// buffer); each mode has its own data region with its own layout struct (today the intranode
// rings; the low-latency double buffer and the RDMA rings come with their modes). State that must
// survive between operations lives outside the user-visible range, so scratch use of
// get_local_buffer_tensor cannot break the counters' invariants.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/hd.hpp"
#include "flashep/config.hpp"

namespace flashep {

/// Largest world (ranks of a buffer) the layouts address: 64 nodes of 16 ranks.
inline constexpr int kMaxRanks = 1024;

// ---- channels ------------------------------------------------------------------------------------

/// Half-open token range [begin, end) of `channel` when `num_tokens` are split over `num_channels`
/// contiguous, balanced ranges (sizes differ by at most one).
struct TokenRange {
  int begin;
  int end;
};
FLASHEP_HD TokenRange channel_token_range(int num_tokens, int num_channels, int channel) {
  const int64_t n = num_tokens;
  return TokenRange{static_cast<int>(n * channel / num_channels), static_cast<int>(n * (channel + 1) / num_channels)};
}

/// Channel owning token `token` (inverse of channel_token_range).
FLASHEP_HD int channel_of_token(int num_tokens, int num_channels, int token) {
  // Largest c with floor(n*c/C) <= token; start from the estimate and correct.
  int c = static_cast<int>((static_cast<int64_t>(token) * num_channels) / (num_tokens > 0 ? num_tokens : 1));
  while (c + 1 < num_channels && channel_token_range(num_tokens, num_channels, c + 1).begin <= token) ++c;
  while (c > 0 && channel_token_range(num_tokens, num_channels, c).begin > token) --c;
  return c;
}

// ---- experts -------------------------------------------------------------------------------------

/// Local index of `expert` on `rank` (experts [rank*L, rank*L + L)), or -1 when it lives elsewhere.
FLASHEP_HD int local_expert_index(int64_t expert, int rank, int num_local_experts) {
  const int64_t begin = int64_t(rank) * num_local_experts;
  return (expert >= begin && expert < begin + num_local_experts) ? int(expert - begin) : -1;
}

/// Largest expert_alignment accepted: aligned counts stay far from int overflow (a rank receives at
/// most kMaxRanks * INT32 rows only in theory; real counts are < 2^24).
inline constexpr int kMaxExpertAlignment = 1 << 20;
/// `count` rounded up to a multiple of `alignment`, in 64 bits (no overflow for any int inputs).
FLASHEP_HD int64_t aligned_count(int64_t count, int64_t alignment) {
  return (count + alignment - 1) / alignment * alignment;
}

// ---- ring slots ----------------------------------------------------------------------------------

/// Every ring slot starts on a 128-byte cache line, so a warp's 512-byte store of a row covers whole
/// lines (a 16-byte-aligned slot would split every store over 5 lines: partial writes over NVLink).
inline constexpr int kSlotAlignment = 128;

/// Ring slot of a dispatch: token row, FP8 scales, top-k (global expert ids, as the caller gave
/// them, and weights), source index.
struct DispatchSlotLayout {
  int row_bytes;            // H * element size
  int scale_offset;         // float32[num_scales]
  int num_scales;           // H / 128 for FP8, else 0
  int topk_idx_offset;      // int64[K], 8-byte aligned
  int topk_weights_offset;  // float32[K]
  int src_idx_offset;       // int32
  int slot_bytes;           // multiple of kSlotAlignment
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

/// Ring bytes that `num_channels` channels of `ring_depth` slots of `slot_bytes` need on a domain
/// of `num_ranks` (a multiple of 128).
FLASHEP_HD int64_t ring_region_bytes(int num_ranks, int num_channels, int ring_depth, int slot_bytes) {
  return align_up(int64_t(num_channels) * num_ranks * ring_depth * slot_bytes, 128);
}

// ---- the intranode (high-throughput, one NVLink domain) region -----------------------------------

/// A ring (c, s) in rank d's region carries channel c of source s to d. Its *tail* (slots written)
/// lives in d's counters and is written by s; its *head* (slots consumed) lives in s's counters at
/// index (c, d) and is written by d. So every spinning reader polls its own memory. Ring contents
/// are transient; tails are reset by their reader at the end of each operation, heads by their
/// owner at the barrier that opens the next one.
struct IntranodeLayout {
  int num_ranks;                // of the NVLink domain
  int64_t ring_capacity;        // bytes available to rings (num_nvl_bytes), from offset 0
  int64_t notify_offset;        // num_ranks notify slots
  int64_t notify_slot_ints;     // ints per notify slot
  int64_t tail_offset;          // int[kMaxChannels][num_ranks]
  int64_t head_offset;          // int[kMaxChannels][num_ranks]
  int64_t end;                  // first byte after the region (multiple of 128)

  /// Notify slot layout (ints): [num_tokens_per_rank: R][channel prefix: kMaxChannels][experts: L]
  FLASHEP_HD int64_t notify_slot(int src) const { return notify_offset + int64_t(src) * notify_slot_ints * 4; }
  FLASHEP_HD int64_t tail(int channel, int peer) const { return tail_offset + (int64_t(channel) * num_ranks + peer) * 4; }
  FLASHEP_HD int64_t head(int channel, int peer) const { return head_offset + (int64_t(channel) * num_ranks + peer) * 4; }
  /// Byte offset of slot 0 of ring (channel, src).
  FLASHEP_HD int64_t ring(int channel, int src, int ring_depth, int slot_bytes) const {
    return (int64_t(channel) * num_ranks + src) * ring_depth * int64_t(slot_bytes);
  }
};
FLASHEP_HD IntranodeLayout make_intranode_layout(int num_ranks, int64_t ring_capacity) {
  IntranodeLayout l{};
  l.num_ranks = num_ranks;
  l.ring_capacity = ring_capacity;
  l.notify_offset = align_up(ring_capacity, 128);
  l.notify_slot_ints = num_ranks + kMaxChannels + kMaxLocalExperts;
  l.tail_offset = align_up(l.notify_offset + int64_t(num_ranks) * l.notify_slot_ints * 4, 128);
  l.head_offset = align_up(l.tail_offset + int64_t(kMaxChannels) * num_ranks * 4, 128);
  l.end = align_up(l.head_offset + int64_t(kMaxChannels) * num_ranks * 4, 128);
  return l;
}

// ---- the control block (every mode) --------------------------------------------------------------

/// Ints a CallInfo occupies (call_check.hpp).
inline constexpr int kCallInfoInts = 7;

/// Words at fixed offsets from `base` inside the NVLink allocation.
struct ControlLayout {
  int64_t base;
  /// int: 0, or 1 + the rank that failed first. Written by this rank and by any peer (NVLink
  /// store); once set, every wait of every kernel of this buffer gives up and no kernel writes to
  /// peers any more.
  FLASHEP_HD int64_t abort_word() const { return base; }
  /// int, local only: the first failing thread of this rank claims the host-mapped error record.
  FLASHEP_HD int64_t error_claim() const { return base + 4; }
  /// uint32: this rank's barrier count (device state, so CUDA-graph replays stay in step).
  FLASHEP_HD int64_t barrier_epoch() const { return base + 8; }
  /// uint32[kMaxNvlRanks]: the epoch each NVLink peer signalled last.
  FLASHEP_HD int64_t barrier_signal(int peer) const { return base + 128 + int64_t(peer) * 4; }
  /// int[2][kMaxNvlRanks][kCallInfoInts]: each peer's CallInfo, double-buffered by epoch parity (a
  /// peer can write epoch e + 2's only after this rank read epoch e's and signalled e + 1).
  FLASHEP_HD int64_t call_info(uint32_t epoch, int peer) const {
    return base + 256 + (int64_t(epoch & 1u) * kMaxNvlRanks + peer) * kCallInfoInts * 4;
  }
  /// uint64[kMaxNvlRanks]: transport-check signals from each NVLink peer.
  FLASHEP_HD int64_t check_signal(int peer) const {
    return base + align_up(256 + int64_t(2) * kMaxNvlRanks * kCallInfoInts * 4, 128) + int64_t(peer) * 8;
  }
  FLASHEP_HD int64_t end() const { return check_signal(kMaxNvlRanks); }
};
FLASHEP_HD ControlLayout make_control_layout(int64_t base) { return ControlLayout{align_up(base, 128)}; }

/// Largest NVLink allocation: kernels address it in 16-byte words with 32-bit offsets (64 GiB).
inline constexpr int64_t kMaxNvlBufferBytes = int64_t(16) << 32;

/// The whole NVLink allocation of one rank.
struct NvlAllocationLayout {
  IntranodeLayout intranode;
  ControlLayout control;
  int64_t bytes;  // to allocate (multiple of 128)
};
FLASHEP_HD NvlAllocationLayout make_nvl_allocation(int nvl_ranks, int64_t num_nvl_bytes) {
  NvlAllocationLayout a{};
  a.intranode = make_intranode_layout(nvl_ranks, num_nvl_bytes);
  a.control = make_control_layout(a.intranode.end);
  a.bytes = align_up(a.control.end(), 128);
  return a;
}

// ---- the RDMA (NVSHMEM) allocation ---------------------------------------------------------------

/// The symmetric-heap allocation: data first, then a header that peers on other NVLink domains
/// write through NVSHMEM (signals are 64-bit there).
struct RdmaLayout {
  int64_t data_bytes;     // num_rdma_bytes
  int64_t header_offset;  // multiple of 128
  /// uint64: 0, or 1 + the rank that failed first (peers of other NVLink domains).
  FLASHEP_HD int64_t abort_word() const { return header_offset; }
  /// uint64[kMaxRanks]: transport-check signals from each rank.
  FLASHEP_HD int64_t check_signal(int rank) const { return header_offset + 128 + int64_t(rank) * 8; }
  FLASHEP_HD int64_t bytes() const { return align_up(check_signal(kMaxRanks), 128); }
};
FLASHEP_HD RdmaLayout make_rdma_layout(int64_t num_rdma_bytes) {
  return RdmaLayout{num_rdma_bytes, align_up(num_rdma_bytes, 128)};
}

}  // namespace flashep
