// Launch policy of the intranode kernels: channels per block, warps per role, pipeline stages and
// which template instance runs a domain. Pure host+device functions (hd.hpp): the host launches
// with them and the CPU tests check them for every domain size.
#pragma once

#include "core/hd.hpp"

namespace flashep {

/// Channels per block (see flashep::channels_per_block). Every channel has its own sender and
/// receiver warps, the senders with a pipeline of bulk copies in shared memory
/// (src/kernels/ring_sender.cuh), so a block needs only a few channels to keep NVLink busy; two
/// split the block's shared memory while giving every SM two independent token streams.
inline constexpr int kMaxChannelsPerBlock = 2;
FLASHEP_HD constexpr int block_channel_count(int num_nvl_ranks) { return num_nvl_ranks > 8 ? 1 : kMaxChannelsPerBlock; }

/// Combine receiver warps per channel (tokens of a channel are dealt to them in turn).
inline constexpr int kCombineWorkers = 8;

/// Pipelines of bulk copies: every pipelined warp owns `stages` ring-slot-sized stages of shared
/// memory. The stages of a block share kBulkStageBudgetBytes (H100/H200 allow 227 KB per block).
inline constexpr int kMaxBulkStages = 8;
inline constexpr int kBulkStageBudgetBytes = 200 * 1024;
/// Ring tails a sender warp remembers to publish them late (ring_sender.cuh), per lane.
inline constexpr int kBulkTailHistory = 16;
/// Stages per pipelined warp when `pipelined_warps` warps of a block split `budget` bytes; 0 when
/// a single slot does not fit.
FLASHEP_HD int bulk_stages(int pipelined_warps, int slot_bytes, int budget = kBulkStageBudgetBytes) {
  const int fit = budget / (pipelined_warps * slot_bytes);
  return fit < kMaxBulkStages ? fit : kMaxBulkStages;
}
FLASHEP_HD int dispatch_stages(int channels_in_block, int slot_bytes) { return bulk_stages(channels_in_block, slot_bytes); }
/// Dynamic shared memory of a dispatch block: the sender warp of each channel is pipelined
/// (`stages` slots, one mbarrier per stage, a tail history); receivers copy without shared memory.
FLASHEP_HD int dispatch_smem_bytes(int channels_in_block, int stages, int slot_bytes) {
  return channels_in_block * stages * (slot_bytes + 8) + channels_in_block * kBulkTailHistory * 32 * 4;
}
/// Threads of a dispatch block: per channel one sender warp and one receiver warp per source.
FLASHEP_HD constexpr int dispatch_block_threads(int channels_in_block, int num_nvl_ranks) {
  return channels_in_block * (1 + num_nvl_ranks) * 32;
}
/// Sender warps of a combine block: one plain-copy warp per (channel, destination).
FLASHEP_HD constexpr int combine_sender_warps(int channels_in_block, int num_nvl_ranks) {
  return channels_in_block * num_nvl_ranks;
}
/// Threads of a combine block: its senders and kCombineWorkers receiver warps per channel.
FLASHEP_HD constexpr int combine_block_threads(int channels_in_block, int num_nvl_ranks) {
  return (combine_sender_warps(channels_in_block, num_nvl_ranks) + channels_in_block * kCombineWorkers) * 32;
}

/// The dispatch and combine kernels are instantiated for domains of up to 2, 4, 8 and 16 ranks
/// (register budgets and unrolling differ); each has a launch bound, the block of its largest domain.
FLASHEP_HD constexpr int kernel_instance_for(int num_ranks) {
  return num_ranks <= 2 ? 2 : num_ranks <= 4 ? 4 : num_ranks <= 8 ? 8 : 16;
}
FLASHEP_HD constexpr int dispatch_launch_bound(int instance_ranks) {
  return dispatch_block_threads(block_channel_count(instance_ranks), instance_ranks);
}
FLASHEP_HD constexpr int combine_launch_bound(int instance_ranks) {
  return combine_block_threads(block_channel_count(instance_ranks), instance_ranks);
}
/// The instantiation that runs a domain of `num_ranks` whose block has `block_threads` threads,
/// when a test knob (FLASHEP_DEBUG_KERNEL_RANKS) asks for at least `requested`: the one for
/// max(num_ranks, requested), or the one for num_ranks where the block exceeds the larger one's
/// launch bound (`launch_bound(instance)`; the 16-rank kernels have one channel per block).
template <typename LaunchBound>
FLASHEP_HD int kernel_instance(int num_ranks, int requested, int block_threads, LaunchBound launch_bound) {
  const int wanted = kernel_instance_for(num_ranks > requested ? num_ranks : requested);
  return block_threads <= launch_bound(wanted) ? wanted : kernel_instance_for(num_ranks);
}

}  // namespace flashep
