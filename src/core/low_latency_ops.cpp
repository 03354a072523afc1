// The low-latency operations of flashep::Buffer: validate -> params -> launch. Everything that can
// be checked on the host is checked before anything is enqueued (kInvalidArgument); expert ids are
// checked by the kernel before it sends anything.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/buffer_impl.hpp"
#include "core/cuda_check.hpp"
#include "core/low_latency_layout.hpp"

namespace flashep {

namespace {

constexpr int kOpDispatch = 1;
constexpr int kOpCombine = 2;

void check_shape(int max_tokens, int hidden, int num_ranks, int num_experts, const std::string& op) {
  FLASHEP_REQUIRE(max_tokens >= 1 && max_tokens <= kMaxLowLatencyTokens,
          op + ": num_max_dispatch_tokens_per_rank must be in [1, " + str(kMaxLowLatencyTokens) + "], got " +
              str(max_tokens));
  FLASHEP_REQUIRE(hidden >= 128 && hidden % 128 == 0 && hidden <= kMaxLowLatencyHidden,
          op + ": hidden must be a multiple of 128 in [128, " + str(kMaxLowLatencyHidden) + "], got " + str(hidden));
  FLASHEP_REQUIRE(num_ranks >= 1 && num_ranks <= kMaxRanks, op + ": num_ranks " + str(num_ranks) + " out of range");
  FLASHEP_REQUIRE(num_experts >= num_ranks && num_experts % num_ranks == 0,
          op + ": num_experts (" + str(num_experts) + ") must be a positive multiple of the number of ranks (" +
              str(num_ranks) + ")");
  FLASHEP_REQUIRE(num_experts <= kMaxLowLatencyExperts,
          op + ": low-latency mode supports at most " + str(kMaxLowLatencyExperts) + " experts, got " + str(num_experts));
  FLASHEP_REQUIRE(num_experts / num_ranks <= kMaxLocalExperts,
          op + ": at most " + str(kMaxLocalExperts) + " experts per rank, got " + str(num_experts / num_ranks));
}

}  // namespace

size_t low_latency_region_bytes_hint(int max_tokens_per_rank, int hidden, int num_ranks, int num_experts) {
  check_shape(max_tokens_per_rank, hidden, num_ranks, num_experts, "get_low_latency_rdma_size_hint");
  return static_cast<size_t>(low_latency_region_bytes(max_tokens_per_rank, hidden, num_ranks, num_experts));
}

size_t low_latency_plan_ints(int num_ranks, int max_tokens_per_rank, int num_topk) {
  return static_cast<size_t>(ll_plan_ints(num_ranks, max_tokens_per_rank, num_topk));
}

int BufferImpl::low_latency_blocks(int max_tokens) const {
  const int blocks = ll_num_blocks(options_.num_ranks, max_tokens, num_device_sms_);
  return env_.ll_blocks > 0 ? std::min(env_.ll_blocks, num_device_sms_) : blocks;
}

void BufferImpl::require_low_latency(const char* op) const {
  require_usable(op);
  FLASHEP_REQUIRE(options_.low_latency_mode && ll_bytes_ > 0,
          std::string(op) + ": this buffer has no low-latency region; create it with low_latency_mode=True and "
                            "num_rdma_bytes=get_low_latency_rdma_size_hint(T, H, R, E)");
}

kernels::LowLatencyComm BufferImpl::low_latency_comm(int max_tokens, int hidden, int num_experts, const char* op) const {
  kernels::LowLatencyComm ll{};
  ll.layout = make_low_latency_layout(max_tokens, hidden, options_.num_ranks, num_experts);
  FLASHEP_REQUIRE(ll.layout.end <= ll_bytes_,
          std::string(op) + ": (T=" + str(max_tokens) + ", H=" + str(hidden) + ", R=" + str(options_.num_ranks) +
              ", E=" + str(num_experts) + ") needs num_rdma_bytes >= " + str(ll.layout.end) + " but the buffer has " +
              str(ll_bytes_) + "; size it with get_low_latency_rdma_size_hint(T, H, R, E)");
  char* sym = sym_ ? sym_->local_base() : nullptr;
  ll.sym = sym;
  if (ll_nvl_offset_ >= 0) {
    ll.local = nvl_->local_base() + ll_nvl_offset_;
    if (ll_direct_nvlink_)
      for (int p = 0; p < nvl_domain_size_; ++p) ll.nvl_peer[p] = nvl_->peer_base(node_ * nvl_domain_size_ + p) + ll_nvl_offset_;
  } else {
    ll.local = sym;
  }
  ll.shrink = options_.enable_shrink ? 1 : 0;
  ll.all_direct = ll_needs_nvshmem_ ? 0 : 1;
  return ll;
}

void BufferImpl::check_low_latency_handle(const LowLatencyHandle& h, const char* op) const {
  const std::string o(op);
  FLASHEP_REQUIRE(h.buffer_id == id_, o + ": the handle was made by another buffer (or not by low_latency_dispatch)");
  FLASHEP_REQUIRE(h.src_info != nullptr && h.layout_range != nullptr && h.plan != nullptr, o + ": the handle has null tensors");
  check_shape(h.max_tokens, h.hidden, options_.num_ranks, h.num_experts, o);
  FLASHEP_REQUIRE(h.num_topk >= 1 && h.num_topk <= kMaxTopk, o + ": the handle's top-k " + str(h.num_topk) + " is out of range");
}

void BufferImpl::low_latency_dispatch(const LowLatencyDispatchArgs& a, cudaStream_t stream) {
  const char* op = "low_latency_dispatch";
  require_low_latency(op);
  const int R = options_.num_ranks;
  check_shape(a.max_tokens, a.hidden, R, a.num_experts, op);
  FLASHEP_REQUIRE(a.num_tokens >= 0 && a.num_tokens <= a.max_tokens,
          std::string(op) + ": x has " + str(a.num_tokens) + " tokens but num_max_dispatch_tokens_per_rank is " +
              str(a.max_tokens));
  FLASHEP_REQUIRE(a.num_topk >= 1 && a.num_topk <= kMaxTopk,
          std::string(op) + ": top-k must be in [1, " + str(kMaxTopk) + "], got " + str(a.num_topk));
  FLASHEP_REQUIRE(!a.use_ue8m0 || (a.use_fp8 && a.round_scale),
          std::string(op) + ": use_ue8m0 requires use_fp8 and round_scale (UE8M0 stores power-of-two scales)");
  FLASHEP_REQUIRE(!a.use_ue8m0 || a.hidden % 512 == 0,
          std::string(op) + ": use_ue8m0 packs 4 scales per int32 and needs hidden % 512 == 0, got " + str(a.hidden));
  FLASHEP_REQUIRE(a.phases >= 1 && a.phases <= 3, std::string(op) + ": phases must be send, receive or both");
  FLASHEP_REQUIRE(a.call_slot >= 0 && a.call_slot < kLowLatencyCallSlots,
          std::string(op) + ": call_slot must be in [0, " + str(kLowLatencyCallSlots) + ")");
  FLASHEP_REQUIRE(a.num_tokens == 0 || (a.x != nullptr && a.topk_idx != nullptr), std::string(op) + ": x and topk_idx are required");
  FLASHEP_REQUIRE(a.handle != nullptr, std::string(op) + ": handle is required");
  if (a.phases & kLowLatencyReceive) {
    FLASHEP_REQUIRE(a.recv_x != nullptr && a.recv_count != nullptr && (!a.use_fp8 || a.recv_scales != nullptr),
            std::string(op) + ": recv_x, recv_count (and recv_scales with FP8) are required");
    FLASHEP_REQUIRE(a.handle->src_info != nullptr && a.handle->layout_range != nullptr && a.handle->plan != nullptr,
            std::string(op) + ": the handle's src_info, layout_range and plan must be allocated");
  }
  kernels::LowLatencyDispatchParams p{};
  p.comm = device_comm();
  p.ll = low_latency_comm(a.max_tokens, a.hidden, a.num_experts, op);
  p.x = a.x;
  p.topk_idx = a.topk_idx;
  p.num_tokens = a.num_tokens;
  p.num_topk = a.num_topk;
  p.phases = a.phases;
  p.call_slot = a.call_slot;
  p.fp8 = a.use_fp8 ? 1 : 0;
  p.round_scale = a.round_scale ? 1 : 0;
  p.ue8m0 = a.use_ue8m0 ? 1 : 0;
  p.call_hash = ll_call_hash(kOpDispatch, a.max_tokens, a.hidden, a.num_experts, a.num_topk, p.fp8);
  p.recv_x = a.recv_x;
  p.recv_scales = a.recv_scales;
  p.recv_count = a.recv_count;
  p.recv_stats = a.cumulative_local_expert_recv_stats;
  p.wait_stats = a.dispatch_wait_recv_cost_stats;
  p.src_info = a.handle->src_info;
  p.layout_range = a.handle->layout_range;
  p.plan = a.handle->plan;
  a.handle->max_tokens = a.max_tokens;
  a.handle->hidden = a.hidden;
  a.handle->num_experts = a.num_experts;
  a.handle->num_topk = a.num_topk;
  a.handle->buffer_id = id_;
  launch_check(kernels::launch_low_latency_dispatch(p, low_latency_blocks(a.max_tokens), stream),
               op);
}

void* BufferImpl::low_latency_combine_buffer(const LowLatencyHandle& h) const {
  require_low_latency("get_next_low_latency_combine_buffer");
  check_low_latency_handle(h, "get_next_low_latency_combine_buffer");
  const kernels::LowLatencyComm ll = low_latency_comm(h.max_tokens, h.hidden, h.num_experts, "get_next_low_latency_combine_buffer");
  return ll.local + ll.layout.zero_copy(static_cast<int>(ll_combine_calls_ & 1u));
}

void BufferImpl::low_latency_combine(const LowLatencyCombineArgs& a, cudaStream_t stream) {
  const char* op = "low_latency_combine";
  require_low_latency(op);
  FLASHEP_REQUIRE(a.handle != nullptr, std::string(op) + ": handle is required");
  const LowLatencyHandle& h = *a.handle;
  check_low_latency_handle(h, op);
  FLASHEP_REQUIRE(a.phases >= 1 && a.phases <= 3, std::string(op) + ": phases must be send, receive or both");
  FLASHEP_REQUIRE(a.call_slot >= 0 && a.call_slot < kLowLatencyCallSlots,
          std::string(op) + ": call_slot must be in [0, " + str(kLowLatencyCallSlots) + ")");
  FLASHEP_REQUIRE(a.num_tokens >= 0 && a.num_tokens <= h.max_tokens,
          std::string(op) + ": " + str(a.num_tokens) + " tokens, but the dispatch's T is " + str(h.max_tokens));
  FLASHEP_REQUIRE(a.num_tokens == 0 || (a.topk_idx != nullptr && a.topk_weights != nullptr),
          std::string(op) + ": topk_idx and topk_weights are required");
  FLASHEP_REQUIRE(a.zero_copy || a.x != nullptr || !(a.phases & kLowLatencySend), std::string(op) + ": x is required (or zero_copy)");
  FLASHEP_REQUIRE(a.out != nullptr || !(a.phases & kLowLatencyReceive) || a.num_tokens == 0, std::string(op) + ": out is required");
  kernels::LowLatencyCombineParams p{};
  p.comm = device_comm();
  p.ll = low_latency_comm(h.max_tokens, h.hidden, h.num_experts, op);
  if (a.phases & kLowLatencySend) {
    p.x = a.zero_copy ? p.ll.local + p.ll.layout.zero_copy(static_cast<int>(ll_combine_calls_ & 1u)) : a.x;
    ++ll_combine_calls_;
  }
  p.topk_idx = a.topk_idx;
  p.topk_weights = a.topk_weights;
  p.num_tokens = a.num_tokens;
  p.num_topk = h.num_topk;
  p.phases = a.phases;
  p.call_slot = a.call_slot;
  p.logfmt = a.use_logfmt && env_.ll_logfmt != 0 ? 1 : 0;
  // A hooked call (one phase per launch) whose peers are all direct: the per-slot combine, whose
  // send waits for no peer (LowLatencyCombineParams::slot_mode). Both launches of the call agree.
  p.slot_mode = (a.phases != kLowLatencyBoth && !ll_needs_nvshmem_) ? 1 : 0;
  // Both ends of a combine must agree on the wire format: it is part of the call hash.
  p.call_hash = ll_call_hash(kOpCombine, h.max_tokens, h.hidden, h.num_experts, h.num_topk, p.logfmt | (p.slot_mode << 1));
  p.plan = h.plan;
  p.out = a.out;
  p.wait_stats = a.combine_wait_recv_cost_stats;
  // A hook's receive: one block per (token, chunk) item, not the send's count (min(R * T, SMs)).
  const int blocks = a.phases == kLowLatencyReceive && env_.ll_blocks <= 0
                         ? ll_combine_receive_blocks(p.num_tokens, h.hidden, num_device_sms_, p.ll.shrink != 0)
                         : low_latency_blocks(h.max_tokens);
  launch_check(kernels::launch_low_latency_combine(p, blocks, stream), op);
}

void BufferImpl::clean_low_latency_buffer(cudaStream_t stream) {
  require_low_latency("clean_low_latency_buffer");
  const LowLatencyLayout fixed = make_low_latency_layout(1, 128, options_.num_ranks, options_.num_ranks);
  const kernels::LowLatencyComm ll = low_latency_comm(1, 128, options_.num_ranks, "clean_low_latency_buffer");
  std::vector<char*> regions{ll.local};
  if (ll.sym != nullptr && ll.sym != ll.local) regions.push_back(ll.sym);  // NVSHMEM peers' signals
  // Everything but the mask: signals, state (the sequence restarts at 0 on every rank), the credits
  // (a peer's credit of the old sequence would pass every check of the new one) and every area whose
  // offsets depend on (T, H, E), the dispatch flags among them, so that no flag of an earlier call
  // can read as one of the restarted sequence.
  for (char* region : regions) {
    launch_check(cudaMemsetAsync(region, 0, static_cast<size_t>(fixed.mask_offset), stream), "clean_low_latency_buffer");
    launch_check(cudaMemsetAsync(region + fixed.credits_offset, 0, static_cast<size_t>(ll_bytes_ - fixed.credits_offset),
                                 stream),
                 "clean_low_latency_buffer");
  }
  ll_combine_calls_ = 0;
}

void BufferImpl::low_latency_update_mask(int rank, bool mask, cudaStream_t stream) {
  require_low_latency("low_latency_update_mask_buffer");
  FLASHEP_REQUIRE(options_.enable_shrink, "low_latency_update_mask_buffer: requires Buffer(..., enable_shrink=True)");
  FLASHEP_REQUIRE(rank >= 0 && rank < options_.num_ranks, "low_latency_update_mask_buffer: rank " + str(rank) + " out of range");
  const kernels::LowLatencyComm ll = low_latency_comm(1, 128, options_.num_ranks, "low_latency_update_mask_buffer");
  launch_check(cudaMemsetAsync(ll.local + ll.layout.mask(rank), 0, sizeof(int), stream), "low_latency_update_mask_buffer");
  if (mask)  // a 1 in the lowest byte of a zeroed int32 (little-endian)
    launch_check(cudaMemsetAsync(ll.local + ll.layout.mask(rank), 1, 1, stream), "low_latency_update_mask_buffer");
}

void BufferImpl::low_latency_query_mask(int* mask_out, cudaStream_t stream) const {
  require_low_latency("low_latency_query_mask_buffer");
  FLASHEP_REQUIRE(options_.enable_shrink, "low_latency_query_mask_buffer: requires Buffer(..., enable_shrink=True)");
  FLASHEP_REQUIRE(mask_out != nullptr, "low_latency_query_mask_buffer: mask_status is required");
  const kernels::LowLatencyComm ll = low_latency_comm(1, 128, options_.num_ranks, "low_latency_query_mask_buffer");
  FLASHEP_CUDA_CHECK(cudaMemcpyAsync(mask_out, ll.local + ll.layout.mask(0), sizeof(int) * options_.num_ranks,
                                     cudaMemcpyDeviceToDevice, stream));
}

void BufferImpl::low_latency_clean_mask(cudaStream_t stream) {
  require_low_latency("low_latency_clean_mask_buffer");
  FLASHEP_REQUIRE(options_.enable_shrink, "low_latency_clean_mask_buffer: requires Buffer(..., enable_shrink=True)");
  const kernels::LowLatencyComm ll = low_latency_comm(1, 128, options_.num_ranks, "low_latency_clean_mask_buffer");
  launch_check(cudaMemsetAsync(ll.local + ll.layout.mask(0), 0, sizeof(int) * options_.num_ranks, stream),
               "low_latency_clean_mask_buffer");
}

// ---- Buffer forwarding ---------------------------------------------------------------------------

void Buffer::low_latency_dispatch(const LowLatencyDispatchArgs& args, cudaStream_t stream) {
  impl_->low_latency_dispatch(args, stream);
}
void Buffer::low_latency_combine(const LowLatencyCombineArgs& args, cudaStream_t stream) {
  impl_->low_latency_combine(args, stream);
}
void* Buffer::low_latency_combine_buffer(const LowLatencyHandle& handle) const {
  return impl_->low_latency_combine_buffer(handle);
}
void Buffer::clean_low_latency_buffer(cudaStream_t stream) { impl_->clean_low_latency_buffer(stream); }
void Buffer::low_latency_update_mask(int rank, bool mask, cudaStream_t stream) {
  impl_->low_latency_update_mask(rank, mask, stream);
}
void Buffer::low_latency_query_mask(int* mask_out, cudaStream_t stream) const {
  impl_->low_latency_query_mask(mask_out, stream);
}
void Buffer::low_latency_clean_mask(cudaStream_t stream) { impl_->low_latency_clean_mask(stream); }

}  // namespace flashep
