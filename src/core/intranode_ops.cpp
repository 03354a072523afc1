// The intranode (one NVLink domain) high-throughput operations of flashep::Buffer, each as
// validate -> params -> launch. Every argument is checked here, before anything is enqueued; what
// only the GPU can see (routing counts, handle contents, expert ids) is checked by the kernels
// before they write anything, and aborts the buffer on every rank.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "core/buffer_impl.hpp"
#include "core/cuda_check.hpp"
#include "core/launch_policy.hpp"

namespace flashep {

namespace {

/// Kernels move rows with 16-byte vector accesses: a misaligned pointer would fault the context.
void require_aligned(const void* ptr, int alignment, const char* op, const char* name) {
  FLASHEP_REQUIRE(reinterpret_cast<uintptr_t>(ptr) % alignment == 0,
          std::string(op) + ": " + name + " must be " + std::to_string(alignment) +
              "-byte aligned (a tensor view with an odd storage offset?)");
}

/// Dynamic shared memory a block may use on Hopper: 227 KB, less 1 KB for the kernels' static
/// shared variables (a few ints each).
constexpr int kMaxBlockSmem = 226 * 1024;

}  // namespace

// ---- checks ----------------------------------------------------------------------------------------

void BufferImpl::require_intranode(const char* op) const {
  // On a buffer of several NVLink domains the intranode operations run inside this rank's domain
  // (ranks, experts and handles numbered within it): the NVLink stage of the composed multi-node
  // path (docs/design.md). The whole multi-node dispatch is composed by the caller (Python).
  require_usable(op);
}

void BufferImpl::validate_config(const Config& config, const char* op) const {
  try {
    config.validate();
  } catch (const std::invalid_argument& e) {
    throw_invalid(std::string(op) + ": " + e.what());
  }
  FLASHEP_REQUIRE(config.num_sms <= num_device_sms_, std::string(op) + ": config.num_sms " + str(config.num_sms) +
                                                 " exceeds the device's " + str(num_device_sms_) + " SMs");
  FLASHEP_REQUIRE(num_channels(config.num_sms, nvl_domain_size_) <= kMaxChannels,
          std::string(op) + ": too many channels (" + str(num_channels(config.num_sms, nvl_domain_size_)) + " > " +
              str(kMaxChannels) + "); use fewer SMs");
}

void BufferImpl::require_ring_space(const Config& config, int slot_bytes, const char* op) const {
  const int64_t need = ring_region_bytes(nvl_domain_size_, num_channels(config.num_sms, nvl_domain_size_),
                                         config.num_max_nvl_chunked_recv_tokens, slot_bytes);
  FLASHEP_REQUIRE(need <= nvl_layout_.intranode.ring_capacity,
          std::string(op) + ": num_nvl_bytes " + str(nvl_layout_.intranode.ring_capacity) +
              " is too small for this config (" + str(need) + " bytes needed: num_sms " + str(config.num_sms) +
              ", num_max_nvl_chunked_recv_tokens " + str(config.num_max_nvl_chunked_recv_tokens) +
              "); use Config.get_nvl_buffer_size_hint()");
}

void BufferImpl::check_handle(const DispatchHandle& h, const Config& config, const char* op,
                              bool needs_send_head) const {
  const std::string where = std::string(op) + ": the handle ";
  FLASHEP_REQUIRE(h.buffer_id == id_, where + "was made by another Buffer (id " + str(static_cast<int64_t>(h.buffer_id)) +
                                  ", this one " + str(static_cast<int64_t>(id_)) + ")");
  const int C = num_channels(config.num_sms, nvl_domain_size_);
  FLASHEP_REQUIRE(h.num_ranks == nvl_domain_size_,
          where + "is of " + str(h.num_ranks) + " ranks, this buffer has " + str(nvl_domain_size_));
  FLASHEP_REQUIRE(h.num_channels == C, where + "has " + str(h.num_channels) + " channels but this config has " + str(C) +
                                   " (num_sms " + str(config.num_sms) + "): use the config of the dispatch");
  FLASHEP_REQUIRE(h.num_tokens >= 0 && h.num_recv_tokens >= 0, where + "has negative sizes");
  FLASHEP_REQUIRE(h.rank_prefix_matrix && h.channel_prefix_matrix && h.recv_channel_prefix_matrix,
          where + "has null prefix matrices");
  FLASHEP_REQUIRE(h.num_tokens == 0 || h.is_token_in_rank, where + "has a null is_token_in_rank");
  FLASHEP_REQUIRE(!needs_send_head || h.num_tokens == 0 || h.send_head, where + "has a null send_head");
}

// ---- get_dispatch_layout ---------------------------------------------------------------------------

void BufferImpl::get_dispatch_layout(const LayoutArgs& a, cudaStream_t stream) {
  require_usable("get_dispatch_layout");
  const int R = options_.num_ranks;
  FLASHEP_REQUIRE(a.num_tokens >= 0, "get_dispatch_layout: num_tokens must be >= 0");
  FLASHEP_REQUIRE(a.num_topk >= 1 && a.num_topk <= kMaxTopk,
          "get_dispatch_layout: num_topk must be in [1, " + str(kMaxTopk) + "], got " + str(a.num_topk));
  FLASHEP_REQUIRE(a.num_experts >= 1 && a.num_experts % R == 0, "get_dispatch_layout: num_experts (" + str(a.num_experts) +
                                                            ") must be a positive multiple of num_ranks (" + str(R) +
                                                            ")");
  FLASHEP_REQUIRE(a.num_experts / R <= kMaxLocalExperts,
          "get_dispatch_layout: more than " + str(kMaxLocalExperts) + " experts per rank");
  FLASHEP_REQUIRE(a.num_tokens == 0 || a.topk_idx != nullptr, "get_dispatch_layout: topk_idx is null");
  FLASHEP_REQUIRE(a.num_tokens_per_rank && a.num_tokens_per_expert && (a.num_tokens == 0 || a.is_token_in_rank),
          "get_dispatch_layout: an output pointer is null");
  FLASHEP_REQUIRE(num_nodes_ == 1 || a.num_tokens_per_rdma_rank != nullptr,
          "get_dispatch_layout: num_tokens_per_rdma_rank is required with several nodes");
  FLASHEP_REQUIRE(sizeof(int) * (int64_t(a.num_experts) + R + num_nodes_) <= kMaxBlockSmem,
          "get_dispatch_layout: too many experts for one block's counters");
  kernels::LayoutParams p{};
  p.comm = device_comm();
  p.topk_idx = a.topk_idx;
  p.num_tokens = a.num_tokens;
  p.num_topk = a.num_topk;
  p.num_experts = a.num_experts;
  p.num_tokens_per_rank = a.num_tokens_per_rank;
  p.num_tokens_per_rdma_rank = num_nodes_ > 1 ? a.num_tokens_per_rdma_rank : nullptr;
  p.num_tokens_per_expert = a.num_tokens_per_expert;
  p.is_token_in_rank = a.is_token_in_rank;
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  launch_check(kernels::launch_get_dispatch_layout(p, stream), "get_dispatch_layout");
}

// ---- notify_dispatch / wait_recv_counts ------------------------------------------------------------

void BufferImpl::notify_dispatch(const NotifyDispatchArgs& a, cudaStream_t stream) {
  require_intranode("notify_dispatch");
  validate_config(a.config, "notify_dispatch");
  const int R = nvl_domain_size_;
  const int C = num_channels(a.config.num_sms, R);
  FLASHEP_REQUIRE(a.num_tokens >= 0, "notify_dispatch: num_tokens must be >= 0");
  FLASHEP_REQUIRE(a.num_experts >= 1 && a.num_experts % R == 0,
          "notify_dispatch: num_experts (" + str(a.num_experts) + ") must be a positive multiple of num_ranks");
  FLASHEP_REQUIRE(a.num_experts / R <= kMaxLocalExperts,
          "notify_dispatch: more than " + str(kMaxLocalExperts) + " experts per rank");
  FLASHEP_REQUIRE(a.expert_alignment >= 1 && a.expert_alignment <= kMaxExpertAlignment,
          "notify_dispatch: expert_alignment must be in [1, " + str(kMaxExpertAlignment) + "], got " +
              str(a.expert_alignment));
  FLASHEP_REQUIRE(a.num_worst_tokens >= 0, "notify_dispatch: num_worst_tokens must be >= 0");
  FLASHEP_REQUIRE(a.hidden > 0, "notify_dispatch: hidden (the row width of the dispatch that follows) must be > 0");
  FLASHEP_REQUIRE(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "notify_dispatch: num_topk must be in [0, " + str(kMaxTopk) + "]");
  FLASHEP_REQUIRE(a.num_topk == 0 || a.num_tokens == 0 || a.topk_idx != nullptr,
          "notify_dispatch: topk_idx is required when num_topk > 0 (the GPU checks the counts against it)");
  FLASHEP_REQUIRE(a.num_tokens_per_rank && a.num_tokens_per_expert, "notify_dispatch: a count pointer is null");
  FLASHEP_REQUIRE(a.handle != nullptr, "notify_dispatch: handle is null");
  DispatchHandle& h = *a.handle;
  FLASHEP_REQUIRE((a.num_tokens == 0 || h.is_token_in_rank) && h.rank_prefix_matrix && h.channel_prefix_matrix &&
              h.recv_channel_prefix_matrix,
          "notify_dispatch: handle.is_token_in_rank or a prefix matrix is null");
  const bool check_experts = a.num_topk > 0 && a.topk_idx != nullptr;
  FLASHEP_REQUIRE(sizeof(int) * (int64_t(R) * C + (check_experts ? a.num_experts : 0)) <= kMaxBlockSmem,
          "notify_dispatch: too many channels and experts for one block's counters");

  kernels::NotifyDispatchParams p{};
  p.comm = device_comm();
  p.num_tokens_per_rank = a.num_tokens_per_rank;
  p.num_tokens_per_expert = a.num_tokens_per_expert;
  p.is_token_in_rank = h.is_token_in_rank;
  p.topk_idx = check_experts ? a.topk_idx : nullptr;
  p.num_tokens = a.num_tokens;
  p.num_topk = a.num_topk;
  p.num_experts = a.num_experts;
  p.expert_alignment = a.expert_alignment;
  p.num_channels = C;
  p.rank_prefix_matrix = h.rank_prefix_matrix;
  p.channel_prefix_matrix = h.channel_prefix_matrix;
  p.recv_channel_prefix_matrix = h.recv_channel_prefix_matrix;
  p.call = make_call_info(CallOp::kDispatch, C, a.config.num_max_nvl_chunked_recv_tokens, a.hidden,
                          static_cast<int>(a.dtype), a.num_topk, a.num_experts);
  if (a.num_worst_tokens == 0) {
    // The host polls mapped_counts_->seq for this value (equality, so it may wrap); a stale notify
    // can never match it.
    ++notify_seq_;
    mapped_counts_->seq = notify_seq_ - 1u;
    p.mapped = mapped_counts_device_;
    p.seq = notify_seq_;
    num_local_experts_pending_ = a.num_experts / R;
  }
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  launch_check(kernels::launch_notify_dispatch(p, stream), "notify_dispatch");
  h.num_ranks = R;
  h.num_channels = C;
  h.num_tokens = a.num_tokens;
  h.buffer_id = id_;
  notified_ = Notified{true,
                       C,
                       p.call,
                       a.num_tokens,
                       h.is_token_in_rank,
                       p.topk_idx,
                       h.rank_prefix_matrix,
                       h.channel_prefix_matrix,
                       h.recv_channel_prefix_matrix};
  awaiting_counts_ = a.num_worst_tokens == 0;
}

RecvCounts BufferImpl::wait_recv_counts() {
  require_usable("wait_recv_counts");
  FLASHEP_REQUIRE(awaiting_counts_, "wait_recv_counts: no notify_dispatch (outside worst-case mode) is pending");
  awaiting_counts_ = false;
  using clock = std::chrono::steady_clock;
  // The GPU bounds its own waits by timeout_s and then records why; give it a margin to do so (the
  // notify kernel may queue behind an earlier kernel that waits up to timeout_s itself).
  const auto deadline = clock::now() + std::chrono::duration<double>(2 * timeout_s_ + 5.0);
  for (uint64_t polls = 0;; ++polls) {
    if (mapped_counts_->seq == notify_seq_) break;
    check();
    if ((polls & 1023) == 1023) {
      const cudaError_t sticky = cudaStreamQuery(comm_stream_);
      if (sticky != cudaSuccess && sticky != cudaErrorNotReady)
        fail_on_host(ErrorKind::kDeviceFault, "flashep: rank " + str(options_.rank) +
                                                  ": CUDA error while waiting for the receive counts: " +
                                                  cudaGetErrorString(sticky));
      if (clock::now() > deadline)
        fail_on_host(ErrorKind::kTimeout, "flashep: rank " + str(options_.rank) + ": timed out after " +
                                              std::to_string(timeout_s_) + " s in " +
                                              phase_name(Phase::kHostRecvCounts) +
                                              " (the GPU never published them and recorded no error); the buffer "
                                              "is unusable now and must be destroyed");
      if (polls > (1u << 20)) std::this_thread::yield();
    }
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  RecvCounts counts;
  counts.num_recv_tokens = mapped_counts_->num_recv_tokens;
  counts.num_recv_tokens_per_expert.assign(mapped_counts_->num_recv_tokens_per_expert,
                                           mapped_counts_->num_recv_tokens_per_expert + num_local_experts_pending_);
  return counts;
}

// ---- dispatch --------------------------------------------------------------------------------------

void BufferImpl::dispatch(const DispatchArgs& a, cudaStream_t stream) {
  const bool after_notify = !a.cached && notified_.pending;
  try {
    checked_dispatch(a, stream);
  } catch (const Error& e) {
    // The peers ran notify_dispatch with this rank and now wait for its rows: a dispatch that
    // cannot follow its notify aborts them, rather than leaving them to the timeout.
    if (after_notify && e.kind() == ErrorKind::kInvalidArgument) fail_on_host(e.kind(), e.what());
    throw;
  }
}

void BufferImpl::checked_dispatch(const DispatchArgs& a, cudaStream_t stream) {
  require_intranode("dispatch");
  validate_config(a.config, "dispatch");
  const int R = nvl_domain_size_;
  const int C = num_channels(a.config.num_sms, R);
  const int elem = dtype_size(a.dtype);
  const bool fp8 = a.dtype == DType::kFloat8E4M3;
  FLASHEP_REQUIRE(a.num_tokens >= 0 && a.hidden > 0, "dispatch: num_tokens must be >= 0 and hidden > 0");
  FLASHEP_REQUIRE((int64_t(a.hidden) * elem) % 16 == 0,
          "dispatch: a row of x must be a multiple of 16 bytes (hidden " + str(a.hidden) + ")");
  // Sizes say what is present (num_topk > 0: top-k; FP8: scales); pointers are required only where
  // there is data behind them (an empty tensor's data pointer may be null).
  const bool has_topk = a.num_topk > 0;
  const bool has_input = a.num_tokens > 0, has_output = a.num_output_rows > 0;
  FLASHEP_REQUIRE(!fp8 || a.hidden % 128 == 0, "dispatch: FP8 x needs hidden % 128 == 0 (one scale per 128 channels)");
  FLASHEP_REQUIRE(!fp8 || !has_input || a.x_scales != nullptr, "dispatch: FP8 x needs x_scales [n, hidden/128]");
  FLASHEP_REQUIRE(fp8 || a.x_scales == nullptr, "dispatch: x_scales only go with FP8 x");
  FLASHEP_REQUIRE(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "dispatch: num_topk must be in [0, " + str(kMaxTopk) + "]");
  FLASHEP_REQUIRE(!has_topk || !has_input || (a.topk_idx && a.topk_weights),
          "dispatch: topk_idx and topk_weights are required when num_topk > 0");
  FLASHEP_REQUIRE(has_topk || (a.topk_idx == nullptr && a.topk_weights == nullptr),
          "dispatch: topk_idx/topk_weights given with num_topk == 0");
  FLASHEP_REQUIRE(!a.cached || !has_topk, "dispatch: cached mode takes no topk_idx/topk_weights");
  FLASHEP_REQUIRE(!has_topk || (a.num_experts > 0 && a.num_experts % R == 0),
          "dispatch: num_experts must be a positive multiple of num_ranks");
  FLASHEP_REQUIRE(!has_input || a.x, "dispatch: x is null");
  FLASHEP_REQUIRE(a.num_output_rows >= 0, "dispatch: num_output_rows must be >= 0");
  FLASHEP_REQUIRE(!has_output || a.recv_x, "dispatch: recv_x is null");
  FLASHEP_REQUIRE(!fp8 || !has_output || a.recv_x_scales, "dispatch: recv_x_scales is null");
  FLASHEP_REQUIRE(!has_topk || !has_output || (a.recv_topk_idx && a.recv_topk_weights),
          "dispatch: recv_topk_idx/recv_topk_weights are null");
  FLASHEP_REQUIRE(a.handle != nullptr, "dispatch: handle is null");
  require_aligned(a.x, 16, "dispatch", "x");
  require_aligned(a.recv_x, 16, "dispatch", "recv_x");
  // The senders copy top-k ids (8 bytes) and weights/scales (4 bytes) with cp.async.
  require_aligned(a.topk_idx, 8, "dispatch", "topk_idx");
  require_aligned(a.topk_weights, 4, "dispatch", "topk_weights");
  require_aligned(a.x_scales, 4, "dispatch", "x_scales");
  DispatchHandle& h = *a.handle;
  FLASHEP_REQUIRE(h.num_tokens == a.num_tokens, "dispatch: the handle is of " + str(h.num_tokens) + " tokens, x has " +
                                            str(a.num_tokens));
  if (a.cached) {
    check_handle(h, a.config, "dispatch", false);
    FLASHEP_REQUIRE(h.num_recv_tokens == a.num_output_rows, "dispatch: the handle is of " + str(h.num_recv_tokens) +
                                                        " received rows, the outputs have " + str(a.num_output_rows));
  } else {
    // What the peers checked at the count exchange must be what this rank now sends.
    FLASHEP_REQUIRE(notified_.pending, "dispatch: call notify_dispatch first (a fresh dispatch needs its count exchange)");
    notified_.pending = false;
    FLASHEP_REQUIRE(notified_.num_channels == C, "dispatch: notify_dispatch used " + str(notified_.num_channels) +
                                             " channels, this config " + str(C) + ": pass the same config");
    const CallInfo now = make_call_info(CallOp::kDispatch, C, a.config.num_max_nvl_chunked_recv_tokens, a.hidden,
                                        static_cast<int>(a.dtype), a.num_topk, 0);
    FLASHEP_REQUIRE(notified_.call.hidden == now.hidden && notified_.call.dtype == now.dtype &&
                notified_.call.num_topk == now.num_topk,
            "dispatch: hidden " + str(a.hidden) + ", dtype or top-k " + str(a.num_topk) +
                " differ from what notify_dispatch announced (hidden " + str(notified_.call.hidden) + ", top-k " +
                str(notified_.call.num_topk - 1) + ")");
    FLASHEP_REQUIRE(notified_.num_tokens == a.num_tokens && notified_.is_token_in_rank == h.is_token_in_rank &&
                notified_.rank_prefix_matrix == h.rank_prefix_matrix &&
                notified_.channel_prefix_matrix == h.channel_prefix_matrix &&
                notified_.recv_channel_prefix_matrix == h.recv_channel_prefix_matrix,
            "dispatch: num_tokens or the handle differ from what notify_dispatch was given");
    FLASHEP_REQUIRE(!has_topk || a.num_experts == notified_.call.num_experts,
            "dispatch: num_experts " + str(a.num_experts) + " differs from notify_dispatch's " +
                str(notified_.call.num_experts));
    FLASHEP_REQUIRE(!has_topk || !has_input || notified_.topk_idx == a.topk_idx,
            "dispatch: topk_idx differs from the one notify_dispatch checked");
    FLASHEP_REQUIRE((!has_output || h.recv_src_idx) && (!has_input || h.send_head),
            "dispatch: handle.recv_src_idx/send_head are null");
    h.num_recv_tokens = a.num_output_rows;
  }
  const DispatchSlotLayout slot = make_dispatch_slot(a.hidden, elem, fp8, a.num_topk);
  const int G = block_channel_count(R);
  const int stages = dispatch_stages(G, slot.slot_bytes);
  FLASHEP_REQUIRE(stages >= 1, "dispatch: rows of " + str(slot.slot_bytes) + " bytes do not fit the kernel's shared memory "
                       "(hidden " + str(a.hidden) + " too large)");
  require_ring_space(a.config, slot.slot_bytes, "dispatch");
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  if (a.cached) {
    const kernels::BarrierParams barrier{
        device_comm(), C,
        make_call_info(CallOp::kCachedDispatch, C, a.config.num_max_nvl_chunked_recv_tokens, a.hidden,
                       static_cast<int>(a.dtype), a.num_topk, 0)};
    launch_check(kernels::launch_notify_barrier(barrier, stream), "notify (cached dispatch)");
  }
  if (a.worst_case_mode && a.num_output_rows > 0) {
    // Rows past the real count must read as "no expert" (and a -1 source).
    if (a.recv_topk_idx)
      launch_check(cudaMemsetAsync(a.recv_topk_idx, 0xff, sizeof(int64_t) * a.num_output_rows * a.num_topk, stream),
                   "a memset of recv_topk_idx");
    if (a.recv_topk_weights)
      launch_check(cudaMemsetAsync(a.recv_topk_weights, 0, sizeof(float) * a.num_output_rows * a.num_topk, stream),
                   "a memset of recv_topk_weights");
    if (h.recv_src_idx && !a.cached)
      launch_check(cudaMemsetAsync(h.recv_src_idx, 0xff, sizeof(int) * a.num_output_rows, stream),
                   "a memset of recv_src_idx");
  }
  kernels::DispatchParams p{};
  p.comm = device_comm();
  p.x = a.x;
  p.x_scales = a.x_scales;
  p.scale_token_stride = a.scale_token_stride;
  p.scale_hidden_stride = a.scale_hidden_stride;
  p.topk_idx = a.topk_idx;
  p.topk_weights = a.topk_weights;
  p.is_token_in_rank = h.is_token_in_rank;
  p.rank_prefix_matrix = h.rank_prefix_matrix;
  p.recv_channel_prefix_matrix = h.recv_channel_prefix_matrix;
  p.num_tokens = a.num_tokens;
  p.num_topk = a.num_topk;
  p.num_experts = a.num_experts;
  p.num_channels = C;
  p.ring_depth = a.config.num_max_nvl_chunked_recv_tokens;
  p.chunk_tokens = a.config.num_max_nvl_chunked_send_tokens;
  p.num_output_rows = a.num_output_rows;
  p.slot = slot;
  p.channels_per_block = G;
  p.stages = stages;
  p.publish_lag = env_.publish_lag;
  p.cached = a.cached;
  p.debug_skip = env_.dispatch_skip;
  p.kernel_ranks = env_.kernel_ranks;
  p.recv_x = a.recv_x;
  p.recv_x_scales = a.recv_x_scales;
  p.recv_topk_idx = a.recv_topk_idx;
  p.recv_topk_weights = a.recv_topk_weights;
  p.recv_src_idx = a.cached ? nullptr : h.recv_src_idx;
  p.send_head = a.cached ? nullptr : h.send_head;
  p.comm.profile = profile_begin(a.config.num_sms, stream);
  launch_check(kernels::launch_dispatch(p, a.config.num_sms, stream), "dispatch");
  profile_end("dispatch", a.config.num_sms, dispatch_block_threads(G, R) / 32,
              {{"sender", 0, G, {"load", "row_wait", "store", "publish", "drain"}},
               {"receiver", G, G * R, {"tail_wait", "copy", "release"}}},
              stream);
}

// ---- combine ---------------------------------------------------------------------------------------

void BufferImpl::combine(const CombineArgs& a, cudaStream_t stream) {
  require_intranode("combine");
  validate_config(a.config, "combine");
  const int R = nvl_domain_size_;
  const int C = num_channels(a.config.num_sms, R);
  FLASHEP_REQUIRE(a.handle != nullptr, "combine: handle is null");
  const DispatchHandle& h = *a.handle;
  check_handle(h, a.config, "combine", true);
  const int num_tokens = h.num_tokens, num_recv_tokens = h.num_recv_tokens;
  FLASHEP_REQUIRE(a.hidden > 0 && a.hidden % 8 == 0, "combine: hidden must be a positive multiple of 8");
  FLASHEP_REQUIRE(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "combine: num_topk must be in [0, " + str(kMaxTopk) + "]");
  // num_topk > 0 means top-k weights travel with the rows (every rank must agree: it sets the
  // ring slot layout); pointers are required only where there are rows behind them.
  const bool has_weights = a.num_topk > 0;
  FLASHEP_REQUIRE(!has_weights || num_recv_tokens == 0 || a.topk_weights, "combine: topk_weights is null");
  FLASHEP_REQUIRE(!has_weights || num_tokens == 0 || a.combined_topk_weights, "combine: combined_topk_weights is null");
  FLASHEP_REQUIRE(has_weights || (a.topk_weights == nullptr && a.combined_topk_weights == nullptr),
          "combine: topk weights given with num_topk == 0");
  FLASHEP_REQUIRE(num_recv_tokens == 0 || a.x, "combine: x is null");
  FLASHEP_REQUIRE(num_tokens == 0 || a.combined_x, "combine: combined_x is null");
  require_aligned(a.x, 16, "combine", "x");
  require_aligned(a.bias0, 16, "combine", "bias0");
  require_aligned(a.bias1, 16, "combine", "bias1");
  require_aligned(a.combined_x, 16, "combine", "combined_x");
  const CombineSlotLayout slot = make_combine_slot(a.hidden, a.num_topk);
  require_ring_space(a.config, slot.slot_bytes, "combine");
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  const kernels::BarrierParams barrier{
      device_comm(), C,
      make_call_info(CallOp::kCombine, C, a.config.num_max_nvl_chunked_recv_tokens, a.hidden,
                     static_cast<int>(DType::kBFloat16), a.num_topk, 0)};
  launch_check(kernels::launch_notify_barrier(barrier, stream), "notify (combine)");
  kernels::CombineParams p{};
  p.comm = device_comm();
  p.x = a.x;
  p.topk_weights = a.topk_weights;
  p.bias0 = a.bias0;
  p.bias1 = a.bias1;
  p.rank_prefix_matrix = h.rank_prefix_matrix;
  p.channel_prefix_matrix = h.channel_prefix_matrix;
  p.recv_channel_prefix_matrix = h.recv_channel_prefix_matrix;
  p.send_head = h.send_head;
  p.num_tokens = num_tokens;
  p.hidden = a.hidden;
  p.num_topk = a.num_topk;
  p.num_recv_tokens = num_recv_tokens;
  p.num_channels = C;
  p.ring_depth = a.config.num_max_nvl_chunked_recv_tokens;
  p.chunk_tokens = a.config.num_max_nvl_chunked_send_tokens;
  p.slot = slot;
  p.channels_per_block = block_channel_count(R);
  p.kernel_ranks = env_.kernel_ranks;
  p.combined_x = a.combined_x;
  p.combined_topk_weights = a.combined_topk_weights;
  const int G = p.channels_per_block;
  p.comm.profile = profile_begin(a.config.num_sms, stream);
  launch_check(kernels::launch_combine(p, a.config.num_sms, stream), "combine");
  profile_end("combine", a.config.num_sms, combine_block_threads(G, R) / 32,
              {{"receiver", combine_sender_warps(G, R), G * kCombineWorkers, {"row_wait", "reduce", "release"}}},
              stream);
}

// ---- FLASHEP_DEBUG_PROFILE (diagnostics builds) ----------------------------------------------------

unsigned long long* BufferImpl::profile_begin(int num_blocks, cudaStream_t stream) {
#if FLASHEP_DIAGNOSTICS
  if (env_.profile_every <= 0) return nullptr;
  const size_t bytes =
      sizeof(unsigned long long) * size_t(num_blocks) * kernels::kProfileMaxWarps * kernels::kProfileCounters;
  if (profile_ == nullptr)
    FLASHEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&profile_), sizeof(unsigned long long) * 1024 *
                                                                          kernels::kProfileMaxWarps *
                                                                          kernels::kProfileCounters));
  FLASHEP_CUDA_CHECK(cudaMemsetAsync(profile_, 0, bytes, stream));
  return profile_;
#else
  (void)num_blocks;
  (void)stream;
  return nullptr;
#endif
}

void BufferImpl::profile_end(const char* op, int num_blocks, int warps_per_block,
                             const std::vector<profile::WarpRole>& roles, cudaStream_t stream) {
#if FLASHEP_DIAGNOSTICS
  if (env_.profile_every <= 0 || options_.rank != 0 || ++profile_calls_ % env_.profile_every != 0) return;
  FLASHEP_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<unsigned long long> counters(size_t(num_blocks) * warps_per_block * kernels::kProfileCounters);
  FLASHEP_CUDA_CHECK(cudaMemcpy(counters.data(), profile_, sizeof(unsigned long long) * counters.size(),
                                cudaMemcpyDeviceToHost));
  int clock_khz = 0;
  FLASHEP_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_));
  std::fprintf(stderr, "flashep profile: %s call %d, %d blocks\n%s", op, profile_calls_, num_blocks,
               profile::summarize(counters, num_blocks, warps_per_block, roles, clock_khz).c_str());
#else
  (void)op;
  (void)num_blocks;
  (void)warps_per_block;
  (void)roles;
  (void)stream;
#endif
}

}  // namespace flashep
