// Typed launch parameters of the kernels and their host-side launch functions. Plain C++ so the
// host code (compiled by the C++ compiler) fills them; the kernels (.cu) take them by value.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/call_check.hpp"
#include "core/device_comm.hpp"
#include "core/layouts.hpp"

namespace flashep::kernels {

/// Diagnostics (FLASHEP_DEBUG_PROFILE, diagnostics builds): per-warp cycle counters,
/// kProfileCounters per warp, of up to kProfileMaxWarps warps per block. Counter kProfileItems
/// counts the warp's items, the others are phases (src/kernels/profile.cuh; names in
/// src/core/profile.hpp).
inline constexpr int kProfileCounters = 8;
inline constexpr int kProfileItems = 7;
inline constexpr int kProfileMaxWarps = 32;

/// Host-mapped results of notify_dispatch, polled by the host. `seq` is written last.
struct MappedRecvCounts {
  volatile uint32_t seq;
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kMaxLocalExperts];
};

struct LayoutParams {
  DeviceComm comm;  // for the error record and the abort (no peer is read)
  const int64_t* topk_idx;
  int num_tokens, num_topk, num_experts;
  int* num_tokens_per_rank;
  int* num_tokens_per_rdma_rank;  // nullable
  int* num_tokens_per_expert;
  bool* is_token_in_rank;
};

struct NotifyDispatchParams {
  DeviceComm comm;
  const int* num_tokens_per_rank;
  const int* num_tokens_per_expert;
  const bool* is_token_in_rank;
  const int64_t* topk_idx;  // nullable: no per-expert check without top-k
  int num_tokens, num_topk, num_experts, expert_alignment, num_channels;
  int* rank_prefix_matrix;
  int* channel_prefix_matrix;
  int* recv_channel_prefix_matrix;
  MappedRecvCounts* mapped;  // nullptr in worst-case mode
  uint32_t seq;
  CallInfo call;  // checked against every rank's at the first barrier
};

struct BarrierParams {
  DeviceComm comm;
  int num_channels;  // heads of these channels are reset
  CallInfo call;     // the call this barrier opens, checked against every rank's
};

struct DispatchParams {
  DeviceComm comm;
  const void* x;
  const float* x_scales;
  int64_t scale_token_stride, scale_hidden_stride;
  const int64_t* topk_idx;
  const float* topk_weights;
  const bool* is_token_in_rank;
  const int* rank_prefix_matrix;
  const int* recv_channel_prefix_matrix;
  int num_tokens, num_topk, num_experts, num_channels, ring_depth, chunk_tokens, num_output_rows;
  DispatchSlotLayout slot;
  int channels_per_block;  // block_channel_count(R)
  int stages;              // dispatch_stages(channels_per_block, slot.slot_bytes) >= 1
  int publish_lag;         // in [0, kBulkTailHistory - 1] (ring_sender.cuh)
  bool cached;
  int debug_skip;    // FLASHEP_DEBUG_DISPATCH_SKIP (diagnostics builds only; results are wrong)
  int kernel_ranks;  // run the kernel built for domains of max(R, this) ranks (FLASHEP_DEBUG_KERNEL_RANKS)
  void* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  int* send_head;
};

struct CombineParams {
  DeviceComm comm;
  const void* x;
  const float* topk_weights;
  const void* bias0;
  const void* bias1;
  const int* rank_prefix_matrix;
  const int* channel_prefix_matrix;
  const int* recv_channel_prefix_matrix;
  const int* send_head;
  int num_tokens, hidden, num_topk, num_channels, ring_depth, chunk_tokens;
  int num_recv_tokens;  // rows of x (the handle's rows must stay inside them)
  CombineSlotLayout slot;
  int channels_per_block;  // block_channel_count(R)
  int kernel_ranks;        // as DispatchParams::kernel_ranks
  void* combined_x;
  float* combined_topk_weights;
};

/// check_transports: every rank sends `words` 32-bit words of a pattern to every peer and checks
/// what it received. NVLink peers: from and into the intranode ring region (offset 0), signals in
/// the control block; NVSHMEM peers: from and into the RDMA region, signals in its header.
struct TransportCheckParams {
  DeviceComm comm;
  int64_t words;              // per peer
  uint64_t seq;               // this check's number (signals wait for it)
  int nvshmem_peers;          // 1: peers of other domains take part (this build has NVSHMEM)
  long long* mismatches;      // out [num_ranks]: words that arrived wrong from each peer
};

/// probe_put_bandwidth: the last `bytes` of our symmetric region (from `offset`) into the same
/// range of `peer`'s, in `chunk`-byte block puts spread over the grid, then nvshmem_quiet. What
/// NVSHMEM alone carries between the two GPUs (no flags, no layout), for the benchmarks.
struct PutProbeParams {
  DeviceComm comm;
  int peer;
  int64_t offset, bytes, chunk;
};

cudaError_t launch_get_dispatch_layout(const LayoutParams& p, cudaStream_t stream);
cudaError_t launch_notify_dispatch(const NotifyDispatchParams& p, cudaStream_t stream);
cudaError_t launch_notify_barrier(const BarrierParams& p, cudaStream_t stream);
cudaError_t launch_dispatch(const DispatchParams& p, int num_sms, cudaStream_t stream);
cudaError_t launch_combine(const CombineParams& p, int num_sms, cudaStream_t stream);
cudaError_t launch_transport_check(const TransportCheckParams& p, cudaStream_t stream);
cudaError_t launch_put_probe(const PutProbeParams& p, int num_blocks, cudaStream_t stream);

}  // namespace flashep::kernels
