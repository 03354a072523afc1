// Typed launch parameters of the kernels and their host-side launch functions. Plain C++ so the
// host code (compiled by the C++ compiler) fills them; the kernels (.cu) read them by value.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/device_error.hpp"
#include "core/layout_math.hpp"

namespace flashep::kernels {

/// Diagnostics (FLASHEP_DEBUG_PROFILE): per-warp cycle counters, kProfileCounters per warp, of up to
/// kProfileMaxWarps warps per block. Counter kProfileItems counts the warp's items, the others are
/// phases (src/kernels/profile.cuh; the phase names are in src/core/profile.hpp).
inline constexpr int kProfileCounters = 8;
inline constexpr int kProfileItems = 7;
inline constexpr int kProfileMaxWarps = 32;

/// What every communicating kernel knows about its rank and its peers.
struct CommContext {
  int rank = 0;
  int num_ranks = 1;
  void* const* peer_buffers = nullptr;  // device array [num_ranks]; peer_buffers[rank] is ours
  void* local_buffer = nullptr;
  NvlBufferLayout layout{};
  DeviceErrorRecord* error = nullptr;  // host-mapped
  unsigned long long* profile = nullptr;  // FLASHEP_DEBUG_PROFILE counters, normally null
  int* abort_flag = nullptr;           // device memory
  uint64_t timeout_ns = 0;
};

/// Host-mapped results of notify_dispatch, polled by the host. `seq` is written last.
struct MappedRecvCounts {
  volatile int seq;
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kMaxLocalExperts];
};

struct LayoutParams {
  const int64_t* topk_idx;
  int num_tokens, num_topk, num_experts, num_ranks, nvl_domain_size;
  int* num_tokens_per_rank;
  int* num_tokens_per_rdma_rank;  // nullable
  int* num_tokens_per_expert;
  bool* is_token_in_rank;
  DeviceErrorRecord* error;
  int* abort_flag;
  int rank;
};

struct NotifyDispatchParams {
  CommContext comm;
  const int* num_tokens_per_rank;
  const int* num_tokens_per_expert;
  const bool* is_token_in_rank;
  int num_tokens, num_experts, expert_alignment, num_channels;
  int* rank_prefix_matrix;
  int* channel_prefix_matrix;
  int* recv_channel_prefix_matrix;
  MappedRecvCounts* mapped;  // nullptr in worst-case mode
  int seq;
  CallInfo call;  // checked against every rank's at the first barrier
};

struct BarrierParams {
  CommContext comm;
  int num_channels;  // heads of these channels are reset
  CallInfo call;     // the call this barrier opens, checked against every rank's
};

struct DispatchParams {
  CommContext comm;
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
  int debug_skip;  // FLASHEP_DEBUG_DISPATCH_SKIP (docs/env.md): diagnostics only, results are wrong
  int kernel_ranks;  // run the kernel built for domains of max(R, this) ranks (FLASHEP_DEBUG_KERNEL_RANKS)
  void* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;
  int* send_head;
};

struct CombineParams {
  CommContext comm;
  const void* x;
  const float* topk_weights;
  const void* bias0;
  const void* bias1;
  const int* rank_prefix_matrix;
  const int* channel_prefix_matrix;
  const int* recv_channel_prefix_matrix;
  const int* send_head;
  int num_tokens, hidden, num_topk, num_channels, ring_depth, chunk_tokens;
  int num_recv_tokens;  // rows of x (the handle's matrices must stay inside them)
  CombineSlotLayout slot;
  int channels_per_block;  // block_channel_count(R)
  int stages;              // combine_stages(channels_per_block, slot.slot_bytes) >= 1
  int publish_lag;         // in [0, kBulkTailHistory - 1] (ring_sender.cuh)
  bool bulk_sender;        // bulk-copy sender per channel, else plain-copy warps per (channel, peer)
  int kernel_ranks;        // as DispatchParams::kernel_ranks
  void* combined_x;
  float* combined_topk_weights;
};

cudaError_t launch_get_dispatch_layout(const LayoutParams& p, cudaStream_t stream);
cudaError_t launch_notify_dispatch(const NotifyDispatchParams& p, cudaStream_t stream);
cudaError_t launch_notify_barrier(const BarrierParams& p, cudaStream_t stream);
cudaError_t launch_dispatch(const DispatchParams& p, int num_sms, cudaStream_t stream);
cudaError_t launch_combine(const CombineParams& p, int num_sms, cudaStream_t stream);

}  // namespace flashep::kernels
