// flashep: the low-latency (decode) mode of the C++ API. Torch-free; the Buffer methods that take
// these structs are in flashep/buffer.hpp.
//
// A buffer in low-latency mode (BufferOptions::low_latency_mode) owns a region of
// low_latency_region_bytes(T, H, R, E) bytes (BufferOptions::num_rdma_bytes). Peers of the NVLink
// domain get direct stores into it (unless allow_nvlink_for_low_latency is false); others get
// NVSHMEM puts and signals.
//
// Every call has a send phase and a receive phase. Without the hook both run in one kernel; with
// it (`phases` = kSend, later kReceive with the same arguments) the send phase posts the data and
// exits, and the receive phase, launched later, finishes the call: no SM is held in between. The
// kernels keep their sequence numbers on the GPU, so every call can be captured in a CUDA graph and
// replayed. Consecutive calls use alternating halves of the region: at most two calls may be in
// flight (sent and not yet received), and every rank issues the same calls in the same order. A
// call rewrites the half of the call two before it on the same wire (dispatch, the fused combine,
// the hooked combine over NVLink), so that call's receive phase must have run on this rank (else
// the send phase fails: ErrorKind::kDeviceFault, nothing sent); on peers reached directly, the send
// phase waits (bounded) until each of them has finished receiving that call too (credits: without
// them a rank could rewrite a half a slower peer is still reading). The send phase leaves its call's
// number in slot `call_slot` (0..15): the receive phase of the same call passes the same slot, and
// calls in flight at the same time use different ones (the Python layer passes its call count
// modulo 16); receive phases may then run in any order.
//
// Combine with the hook, when every peer is reached directly (one NVLink domain), sends each expert
// row to its token's top-k slot and weights it on the receiving side, so that its send phase never
// waits for a peer's call (the fused combine, and the hook over NVSHMEM, send one weighted partial
// sum per (token, rank), which needs the source's weights first). Every rank of a combine must use
// the hook or not alike: the two wire formats do not mix (a mismatch fails with a named error,
// ErrorKind::kPeerMismatch). With that wire the receive phase reads `topk_weights` (and
// `topk_idx`), so both must stay valid and unchanged until the receive phase has run.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flashep {

/// The phases a low-latency call launches.
enum LowLatencyPhases : int {
  kLowLatencySend = 1,
  kLowLatencyReceive = 2,
  kLowLatencyBoth = 3,
};

/// Bytes of the low-latency region for (T, H, R, E): get_low_latency_rdma_size_hint.
size_t low_latency_region_bytes_hint(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts);
/// int32 entries of the combine plan a dispatch of (R, T, K) writes (LowLatencyHandle::plan).
size_t low_latency_plan_ints(int num_ranks, int max_tokens_per_rank, int num_topk);

/// What a low-latency dispatch leaves for its combine (DeepEP's handle plus the combine plan). The
/// caller allocates the tensors; the dispatch's receive phase fills them.
struct LowLatencyHandle {
  int* src_info = nullptr;        ///< [L, R*T] source token of each output row
  int64_t* layout_range = nullptr;  ///< [L, R] (begin << 32) | count of each source's segment
  int* plan = nullptr;            ///< [low_latency_plan_ints(R, T, K)]
  int max_tokens = 0;             ///< T
  int hidden = 0;                 ///< H
  int num_experts = 0;            ///< E
  int num_topk = 0;               ///< K
  uint64_t buffer_id = 0;         ///< Buffer::id() of the buffer that made it
};

struct LowLatencyDispatchArgs {
  const void* x = nullptr;             ///< bf16 [n, H], contiguous
  const int64_t* topk_idx = nullptr;   ///< [n, K], -1 = empty slot
  int num_tokens = 0;                  ///< n <= T
  int hidden = 0;                      ///< H, a multiple of 128 (512 with UE8M0)
  int num_topk = 0;                    ///< K <= kMaxTopk
  int max_tokens = 0;                  ///< T (num_max_dispatch_tokens_per_rank)
  int num_experts = 0;                 ///< E, a multiple of R
  bool use_fp8 = true;
  bool round_scale = false;
  bool use_ue8m0 = false;              ///< requires round_scale
  int phases = kLowLatencyBoth;
  int call_slot = 0;                   ///< [0, 16): see the top of this file
  /// out: fp8 [L, R*T, H] (bf16 without use_fp8); scales float32 [L, R*T, H/128] or, with UE8M0,
  /// int32 [L, R*T, H/512], both with strides (R*T*G, 1, R*T) (column-major in the last two dims).
  void* recv_x = nullptr;
  void* recv_scales = nullptr;
  int* recv_count = nullptr;                    ///< out [L]
  int* cumulative_local_expert_recv_stats = nullptr;   ///< [L] += counts, or nullptr
  int64_t* dispatch_wait_recv_cost_stats = nullptr;    ///< [R] += wait cycles, or nullptr
  LowLatencyHandle* handle = nullptr;           ///< out (tensors allocated by the caller)
};

struct LowLatencyCombineArgs {
  /// bf16 [L, R*T, H] expert outputs in the dispatch's layout; nullptr with zero_copy (they are in
  /// low_latency_combine_buffer(handle) already).
  const void* x = nullptr;
  bool zero_copy = false;
  /// The partial sums travel as LogFMT-10 (lossy, ~10 bits a value; within DeepEP's calc_diff <
  /// 9e-4). Not yet validated on GPUs: honoured only with FLASHEP_DEBUG_LL_LOGFMT=1, else the
  /// sums travel as exact BF16.
  bool use_logfmt = false;
  const int64_t* topk_idx = nullptr;    ///< [n, K]: the routing given to the dispatch
  const float* topk_weights = nullptr;  ///< [n, K]
  int num_tokens = 0;
  const LowLatencyHandle* handle = nullptr;
  int phases = kLowLatencyBoth;
  int call_slot = 0;                   ///< [0, 16): see the top of this file
  void* out = nullptr;                             ///< out bf16 [n, H]
  int64_t* combine_wait_recv_cost_stats = nullptr;  ///< [R] += wait cycles, or nullptr
};

}  // namespace flashep
