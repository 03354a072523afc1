// flashep::Buffer: allocation, peer mapping, argument validation and kernel launches.
#include "flashep/buffer.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "core/cuda_check.hpp"
#include "core/env.hpp"
#include "core/layout_math.hpp"
#include "core/profile.hpp"
#include "kernels/launch.hpp"
#include "transport/transport.hpp"

namespace flashep {

namespace {

void require(bool condition, const std::string& message) {
  if (!condition) throw_error(message);
}

std::string str(int64_t v) { return std::to_string(v); }

/// Kernels move rows with 16-byte vector accesses: a misaligned pointer would fault the context.
void require_aligned(const void* ptr, int alignment, const char* op, const char* name) {
  require(reinterpret_cast<uintptr_t>(ptr) % alignment == 0,
          std::string(op) + ": " + name + " must be " + std::to_string(alignment) +
              "-byte aligned (a tensor view with an odd storage offset?)");
}
void require_aligned16(const void* ptr, const char* op, const char* name) { require_aligned(ptr, 16, op, name); }

}  // namespace

class BufferImpl {
 public:
  explicit BufferImpl(const BufferOptions& options) : options_(options) {
    require(options.num_ranks >= 1, "num_ranks must be >= 1, got " + str(options.num_ranks));
    require(options.rank >= 0 && options.rank < options.num_ranks,
            "rank " + str(options.rank) + " out of [0, " + str(options.num_ranks) + ")");
    nvl_domain_size_ = options.nvl_domain_size > 0 ? options.nvl_domain_size : std::min(options.num_ranks, 8);
    require(nvl_domain_size_ <= kMaxNvlRanks,
            "nvl_domain_size " + str(nvl_domain_size_) + " exceeds " + str(kMaxNvlRanks));
    require(options.num_ranks % nvl_domain_size_ == 0, "num_ranks (" + str(options.num_ranks) +
                                                           ") must be a multiple of nvl_domain_size (" +
                                                           str(nvl_domain_size_) + ")");
    timeout_s_ = options.timeout_s > 0 ? options.timeout_s : env::timeout_s();
    if (options.device >= 0) {
      device_ = options.device;
    } else {
      FLASHEP_CUDA_CHECK(cudaGetDevice(&device_));
    }
    FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
    FLASHEP_CUDA_CHECK(cudaDeviceGetAttribute(&num_device_sms_, cudaDevAttrMultiProcessorCount, device_));

    // The NVLink domain of this rank; single-node kernels need the whole group in it.
    layout_ = make_nvl_layout(nvl_domain_size_, static_cast<int64_t>(options.num_nvl_bytes));
    // Combine receivers address ring rows as 32-bit offsets in 16-byte words.
    require(layout_.allocation_bytes <= kMaxNvlBufferBytes,
            "num_nvl_bytes " + str(options.num_nvl_bytes) + " plus the control header (" +
                str(layout_.allocation_bytes) + " bytes) exceeds the maximum of " + str(kMaxNvlBufferBytes) + " bytes");
    FLASHEP_CUDA_CHECK(cudaMalloc(&local_buffer_, layout_.allocation_bytes));
    FLASHEP_CUDA_CHECK(cudaMemset(local_buffer_, 0, layout_.allocation_bytes));
    void* raw = nullptr;
    FLASHEP_CUDA_CHECK(cudaMalloc(&raw, sizeof(int)));
    abort_flag_ = static_cast<int*>(raw);
    FLASHEP_CUDA_CHECK(cudaMemset(abort_flag_, 0, sizeof(int)));
    FLASHEP_CUDA_CHECK(cudaMalloc(&raw, sizeof(void*) * nvl_domain_size_));
    peer_table_ = static_cast<void**>(raw);
    // Host-mapped: the GPU writes receive counts and error records the host polls without a sync.
    FLASHEP_CUDA_CHECK(cudaHostAlloc(&raw, sizeof(kernels::MappedRecvCounts), cudaHostAllocMapped));
    std::memset(raw, 0, sizeof(kernels::MappedRecvCounts));
    mapped_counts_ = static_cast<kernels::MappedRecvCounts*>(raw);
    FLASHEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped_counts_device_), raw, 0));
    FLASHEP_CUDA_CHECK(cudaHostAlloc(&raw, sizeof(DeviceErrorRecord), cudaHostAllocMapped));
    std::memset(raw, 0, sizeof(DeviceErrorRecord));
    error_ = static_cast<DeviceErrorRecord*>(raw);
    FLASHEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), raw, 0));
    FLASHEP_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    FLASHEP_CUDA_CHECK(cudaDeviceSynchronize());

    transport_ = transport::make_nvlink_ipc_transport(local_rank(), nvl_domain_size_, nvl_domain_size_, local_buffer_,
                                                      layout_.allocation_bytes, device_);
  }

  ~BufferImpl() { destroy(); }

  int local_rank() const { return options_.rank % nvl_domain_size_; }

  std::vector<uint8_t> local_handle() const { return transport_->export_local(); }

  void connect(const std::vector<std::vector<uint8_t>>& all) {
    require(!destroyed_, "connect: buffer destroyed");
    require(static_cast<int>(all.size()) == options_.num_ranks,
            "connect: expected " + str(options_.num_ranks) + " handles, got " + str(all.size()));
    // The transport maps the ranks of this rank's NVLink domain.
    const int domain_begin = options_.rank - local_rank();
    std::vector<std::vector<uint8_t>> domain(all.begin() + domain_begin, all.begin() + domain_begin + nvl_domain_size_);
    FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
    transport_->import_peers(domain);
    std::vector<void*> peers(nvl_domain_size_);
    for (int peer = 0; peer < nvl_domain_size_; ++peer) peers[peer] = transport_->peer_pointer(peer);
    FLASHEP_CUDA_CHECK(cudaMemcpy(peer_table_, peers.data(), sizeof(void*) * peers.size(), cudaMemcpyHostToDevice));
    available_ = true;
  }

  void destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    available_ = false;
    // Best effort: the device may be in an error state already (a timed-out kernel); free anyway.
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    if (transport_) transport_->close();
    transport_.reset();
    cudaFree(local_buffer_);
    cudaFree(abort_flag_);
    cudaFree(peer_table_);
    cudaFree(profile_);
    profile_ = nullptr;
    cudaFreeHost(const_cast<kernels::MappedRecvCounts*>(mapped_counts_));
    mapped_counts_ = nullptr;
    cudaFreeHost(const_cast<DeviceErrorRecord*>(error_));
    error_ = nullptr;
    cudaStreamDestroy(comm_stream_);
    local_buffer_ = nullptr;
  }

  // ---- checks ------------------------------------------------------------------------------------
  /// The CallInfo of a call (layout_math.hpp); hidden 0 = row shape not known here.
  static CallInfo call_info(CallOp op, const Config& config, int num_channels, int hidden, DType dtype, int num_topk,
                            int num_experts) {
    const bool shape_known = hidden > 0;
    return CallInfo{static_cast<int>(op),
                    num_channels,
                    config.num_max_nvl_chunked_recv_tokens,
                    shape_known ? hidden : 0,
                    shape_known ? static_cast<int>(dtype) + 1 : 0,
                    shape_known ? num_topk + 1 : 0,
                    num_experts};
  }

  void check() const {
    if (error_ != nullptr && !destroyed_ && error_->flag != 0) {
      DeviceErrorRecord copy;
      std::memcpy(&copy, const_cast<const DeviceErrorRecord*>(error_), sizeof(copy));  // volatile read done
      throw Error(describe(copy, timeout_s_));
    }
  }

  void require_usable(const char* op) const {
    require(!destroyed_, std::string(op) + ": the buffer was destroyed");
    require(available_, std::string(op) + ": the buffer is not connected (call connect() first)");
    check();
    require(nvl_domain_size_ == options_.num_ranks,
            std::string(op) + ": multi-node mode (num_ranks " + str(options_.num_ranks) + " > nvl_domain_size " +
                str(nvl_domain_size_) + ") is not implemented yet");
  }

  void validate_config(const Config& config, const char* op) const {
    try {
      config.validate();
    } catch (const std::invalid_argument& e) {
      throw_error(std::string(op) + ": " + e.what());
    }
    require(config.num_sms <= num_device_sms_, std::string(op) + ": config.num_sms " + str(config.num_sms) +
                                                   " exceeds the device's " + str(num_device_sms_) + " SMs");
    require(num_channels(config.num_sms, nvl_domain_size_) <= kMaxChannels,
            std::string(op) + ": too many channels (" + str(num_channels(config.num_sms, nvl_domain_size_)) +
                " > " + str(kMaxChannels) + "); use fewer SMs");
  }

  void require_ring_space(const Config& config, int slot_bytes, const char* op) const {
    const int64_t need = ring_region_bytes(nvl_domain_size_, num_channels(config.num_sms, nvl_domain_size_),
                                           config.num_max_nvl_chunked_recv_tokens, slot_bytes);
    require(need <= layout_.ring_capacity,
            std::string(op) + ": num_nvl_bytes " + str(layout_.ring_capacity) + " is too small for this config (" +
                str(need) + " bytes needed: num_sms " + str(config.num_sms) + ", num_max_nvl_chunked_recv_tokens " +
                str(config.num_max_nvl_chunked_recv_tokens) + "); use Config.get_nvl_buffer_size_hint()");
  }

  kernels::CommContext comm_context() const {
    kernels::CommContext c;
    c.rank = local_rank();
    c.num_ranks = nvl_domain_size_;
    c.peer_buffers = peer_table_;
    c.local_buffer = local_buffer_;
    c.layout = layout_;
    c.error = error_device_;
    c.abort_flag = abort_flag_;
    c.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
    return c;
  }

  // ---- FLASHEP_DEBUG_PROFILE (diagnostics) -------------------------------------------------------
  unsigned long long* profile_begin(int num_blocks, cudaStream_t stream) {
    if (profile_every_ <= 0) return nullptr;
    const size_t bytes = sizeof(unsigned long long) * size_t(num_blocks) * kernels::kProfileMaxWarps *
                         kernels::kProfileCounters;
    if (profile_ == nullptr) FLASHEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&profile_), sizeof(unsigned long long) * 1024 *
                                                                          kernels::kProfileMaxWarps *
                                                                          kernels::kProfileCounters));
    FLASHEP_CUDA_CHECK(cudaMemsetAsync(profile_, 0, bytes, stream));
    return profile_;
  }
  void profile_end(const char* op, int num_blocks, int warps_per_block, const std::vector<profile::WarpRole>& roles,
                   cudaStream_t stream) {
    if (profile_every_ <= 0 || options_.rank != 0 || ++profile_calls_ % profile_every_ != 0) return;
    FLASHEP_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<unsigned long long> counters(size_t(num_blocks) * warps_per_block * kernels::kProfileCounters);
    FLASHEP_CUDA_CHECK(cudaMemcpy(counters.data(), profile_, sizeof(unsigned long long) * counters.size(),
                                  cudaMemcpyDeviceToHost));
    int clock_khz = 0;
    FLASHEP_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_));
    std::fprintf(stderr, "flashep profile: %s call %d, %d blocks\n%s", op, profile_calls_, num_blocks,
                 profile::summarize(counters, num_blocks, warps_per_block, roles, clock_khz).c_str());
  }

  void launch_check(cudaError_t status, const char* what) const {
    if (status != cudaSuccess) throw Error(std::string("flashep: launching ") + what + ": " + cudaGetErrorString(status));
  }

  // ---- operations --------------------------------------------------------------------------------
  void get_dispatch_layout(const LayoutArgs& a, cudaStream_t stream) {
    require(!destroyed_, "get_dispatch_layout: the buffer was destroyed");
    check();
    const int R = options_.num_ranks;
    require(a.num_tokens >= 0, "get_dispatch_layout: num_tokens must be >= 0");
    require(a.num_topk >= 1 && a.num_topk <= kMaxTopk,
            "get_dispatch_layout: num_topk must be in [1, " + str(kMaxTopk) + "], got " + str(a.num_topk));
    require(a.num_experts >= 1 && a.num_experts % R == 0,
            "get_dispatch_layout: num_experts (" + str(a.num_experts) + ") must be a positive multiple of num_ranks (" +
                str(R) + ")");
    require(a.num_experts / R <= kMaxLocalExperts, "get_dispatch_layout: more than " + str(kMaxLocalExperts) +
                                                       " experts per rank");
    require(a.num_tokens == 0 || a.topk_idx != nullptr, "get_dispatch_layout: topk_idx is null");
    require(a.num_tokens_per_rank && a.num_tokens_per_expert && (a.num_tokens == 0 || a.is_token_in_rank),
            "get_dispatch_layout: an output pointer is null");
    const int num_nodes = R / nvl_domain_size_;
    require(num_nodes == 1 || a.num_tokens_per_rdma_rank != nullptr,
            "get_dispatch_layout: num_tokens_per_rdma_rank is required with several nodes");
    kernels::LayoutParams p{};
    p.topk_idx = a.topk_idx;
    p.num_tokens = a.num_tokens;
    p.num_topk = a.num_topk;
    p.num_experts = a.num_experts;
    p.num_ranks = R;
    p.nvl_domain_size = nvl_domain_size_;
    p.num_tokens_per_rank = a.num_tokens_per_rank;
    p.num_tokens_per_rdma_rank = a.num_tokens_per_rdma_rank;
    p.num_tokens_per_expert = a.num_tokens_per_expert;
    p.is_token_in_rank = a.is_token_in_rank;
    p.error = error_device_;
    p.abort_flag = abort_flag_;
    p.rank = options_.rank;
    FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
    launch_check(kernels::launch_get_dispatch_layout(p, stream), "get_dispatch_layout");
  }

  void notify_dispatch(const NotifyDispatchArgs& a, cudaStream_t stream) {
    require_usable("notify_dispatch");
    validate_config(a.config, "notify_dispatch");
    const int R = nvl_domain_size_;
    require(a.num_tokens >= 0, "notify_dispatch: num_tokens must be >= 0");
    require(a.num_experts >= 1 && a.num_experts % R == 0, "notify_dispatch: num_experts (" + str(a.num_experts) +
                                                              ") must be a positive multiple of num_ranks");
    require(a.num_experts / R <= kMaxLocalExperts, "notify_dispatch: more than " + str(kMaxLocalExperts) +
                                                       " experts per rank");
    require(a.expert_alignment >= 1, "notify_dispatch: expert_alignment must be >= 1");
    require(a.num_worst_tokens >= 0, "notify_dispatch: num_worst_tokens must be >= 0");
    require(a.num_tokens_per_rank && a.num_tokens_per_expert && (a.num_tokens == 0 || a.is_token_in_rank) &&
                a.rank_prefix_matrix && a.channel_prefix_matrix && a.recv_channel_prefix_matrix,
            "notify_dispatch: a required pointer is null");
    kernels::NotifyDispatchParams p{};
    p.comm = comm_context();
    p.num_tokens_per_rank = a.num_tokens_per_rank;
    p.num_tokens_per_expert = a.num_tokens_per_expert;
    p.is_token_in_rank = a.is_token_in_rank;
    p.num_tokens = a.num_tokens;
    p.num_experts = a.num_experts;
    p.expert_alignment = a.expert_alignment;
    p.num_channels = num_channels(a.config.num_sms, R);
    p.rank_prefix_matrix = a.rank_prefix_matrix;
    p.channel_prefix_matrix = a.channel_prefix_matrix;
    p.recv_channel_prefix_matrix = a.recv_channel_prefix_matrix;
    require(a.hidden >= 0 && a.num_topk >= 0, "notify_dispatch: hidden and num_topk must be >= 0");
    p.call = call_info(CallOp::kDispatch, a.config, p.num_channels, a.hidden, a.dtype, a.num_topk, a.num_experts);
    if (a.num_worst_tokens == 0) {
      // The host polls mapped_counts_->seq for this value; a stale notify can never match it.
      ++notify_seq_;
      mapped_counts_->seq = -1;
      p.mapped = mapped_counts_device_;
      p.seq = notify_seq_;
      num_local_experts_pending_ = a.num_experts / R;
    }
    FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
    launch_check(kernels::launch_notify_dispatch(p, stream), "notify_dispatch");
    notified_channels_ = p.num_channels;
    notified_call_ = p.call;
    awaiting_counts_ = a.num_worst_tokens == 0;
  }

  RecvCounts wait_recv_counts() {
    require(awaiting_counts_, "wait_recv_counts: no notify_dispatch (outside worst-case mode) is pending");
    awaiting_counts_ = false;
    using clock = std::chrono::steady_clock;
    // The GPU bounds its own waits by timeout_s and then records why; give it a margin to do so.
    const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s_ + 5.0);
    for (uint64_t polls = 0;; ++polls) {
      if (mapped_counts_->seq == notify_seq_) break;
      check();
      if ((polls & 1023) == 1023) {
        const cudaError_t sticky = cudaStreamQuery(comm_stream_);
        if (sticky != cudaSuccess && sticky != cudaErrorNotReady)
          throw Error(std::string("flashep: rank ") + str(options_.rank) +
                      ": CUDA error while waiting for the receive counts: " + cudaGetErrorString(sticky));
        if (clock::now() > deadline)
          throw Error("flashep: rank " + str(options_.rank) + ": timed out after " + std::to_string(timeout_s_) +
                      " s waiting (host) for notify_dispatch's receive counts");
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

  void dispatch(const DispatchArgs& a, cudaStream_t stream) {
    require_usable("dispatch");
    validate_config(a.config, "dispatch");
    const int R = nvl_domain_size_;
    const int C = num_channels(a.config.num_sms, R);
    const int elem = dtype_size(a.dtype);
    const bool fp8 = a.dtype == DType::kFloat8E4M3;
    require(a.num_tokens >= 0 && a.hidden > 0, "dispatch: num_tokens must be >= 0 and hidden > 0");
    require((int64_t(a.hidden) * elem) % 16 == 0,
            "dispatch: a row of x must be a multiple of 16 bytes (hidden " + str(a.hidden) + ")");
    // Sizes say what is present (num_topk > 0: top-k; FP8: scales); pointers are required only where
    // there is data behind them (an empty tensor's data pointer may be null).
    const bool has_topk = a.num_topk > 0;
    const bool has_input = a.num_tokens > 0, has_output = a.num_output_rows > 0;
    require(!fp8 || a.hidden % 128 == 0, "dispatch: FP8 x needs hidden % 128 == 0 (one scale per 128 channels)");
    require(!fp8 || !has_input || a.x_scales != nullptr, "dispatch: FP8 x needs x_scales [n, hidden/128]");
    require(fp8 || a.x_scales == nullptr, "dispatch: x_scales only go with FP8 x");
    require(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "dispatch: num_topk must be in [0, " + str(kMaxTopk) + "]");
    require(!has_topk || !has_input || (a.topk_idx && a.topk_weights),
            "dispatch: topk_idx and topk_weights are required when num_topk > 0");
    require(has_topk || (a.topk_idx == nullptr && a.topk_weights == nullptr),
            "dispatch: topk_idx/topk_weights given with num_topk == 0");
    require(!a.cached || !has_topk, "dispatch: cached mode takes no topk_idx/topk_weights");
    require(!has_topk || (a.num_experts > 0 && a.num_experts % R == 0),
            "dispatch: num_experts must be a positive multiple of num_ranks");
    require(!has_input || (a.x && a.is_token_in_rank), "dispatch: x or is_token_in_rank is null");
    require(a.rank_prefix_matrix && a.recv_channel_prefix_matrix, "dispatch: layout matrices are null");
    require(a.num_output_rows >= 0, "dispatch: num_output_rows must be >= 0");
    require(!has_output || a.recv_x, "dispatch: recv_x is null");
    require(!fp8 || !has_output || a.recv_x_scales, "dispatch: recv_x_scales is null");
    require(!has_topk || !has_output || (a.recv_topk_idx && a.recv_topk_weights),
            "dispatch: recv_topk_idx/recv_topk_weights are null");
    require(a.cached || ((!has_output || a.recv_src_idx) && (!has_input || a.send_head)),
            "dispatch: recv_src_idx/send_head are null");
    require_aligned16(a.x, "dispatch", "x");
    require_aligned16(a.recv_x, "dispatch", "recv_x");
    // The senders copy top-k ids (8 bytes) and weights/scales (4 bytes) with cp.async.
    require_aligned(a.topk_idx, 8, "dispatch", "topk_idx");
    require_aligned(a.topk_weights, 4, "dispatch", "topk_weights");
    require_aligned(a.x_scales, 4, "dispatch", "x_scales");
    const DispatchSlotLayout slot = make_dispatch_slot(a.hidden, elem, fp8, a.num_topk);
    require(dispatch_stages(block_channel_count(R), slot.slot_bytes) >= 1,
            "dispatch: rows of " + str(slot.slot_bytes) + " bytes do not fit the kernel's shared memory (hidden " +
                str(a.hidden) + " too large)");
    require_ring_space(a.config, slot.slot_bytes, "dispatch");
    if (!a.cached) {
      require(notified_channels_ == C, "dispatch: call notify_dispatch with the same config first (it used " +
                                           str(notified_channels_) + " channels, this config " + str(C) + ")");
      notified_channels_ = -1;
      // What the peers checked at the count exchange must be what this rank now sends.
      const CallInfo now = call_info(CallOp::kDispatch, a.config, C, a.hidden, a.dtype, a.num_topk, 0);
      require(notified_call_.hidden == 0 ||
                  (notified_call_.hidden == now.hidden && notified_call_.dtype == now.dtype &&
                   notified_call_.num_topk == now.num_topk),
              "dispatch: hidden " + str(a.hidden) + ", dtype or top-k " + str(a.num_topk) +
                  " differ from what notify_dispatch announced (hidden " + str(notified_call_.hidden) + ", top-k " +
                  str(notified_call_.num_topk - 1) + ")");
    }
    FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
    if (a.cached) {
      const kernels::BarrierParams barrier{comm_context(), C,
                                           call_info(CallOp::kCachedDispatch, a.config, C, a.hidden, a.dtype,
                                                     a.num_topk, 0)};
      launch_check(kernels::launch_notify_barrier(barrier, stream), "notify (cached dispatch)");
    }
    if (a.worst_case_mode && a.num_output_rows > 0) {
      // Rows past the real count must read as "no expert" (and a -1 source).
      if (a.recv_topk_idx)
        FLASHEP_CUDA_CHECK(cudaMemsetAsync(a.recv_topk_idx, 0xff, sizeof(int64_t) * a.num_output_rows * a.num_topk, stream));
      if (a.recv_topk_weights)
        FLASHEP_CUDA_CHECK(cudaMemsetAsync(a.recv_topk_weights, 0, sizeof(float) * a.num_output_rows * a.num_topk, stream));
      if (a.recv_src_idx && !a.cached)
        FLASHEP_CUDA_CHECK(cudaMemsetAsync(a.recv_src_idx, 0xff, sizeof(int) * a.num_output_rows, stream));
    }
    kernels::DispatchParams p{};
    p.comm = comm_context();
    p.x = a.x;
    p.x_scales = a.x_scales;
    p.scale_token_stride = a.scale_token_stride;
    p.scale_hidden_stride = a.scale_hidden_stride;
    p.topk_idx = a.topk_idx;
    p.topk_weights = a.topk_weights;
    p.is_token_in_rank = a.is_token_in_rank;
    p.rank_prefix_matrix = a.rank_prefix_matrix;
    p.recv_channel_prefix_matrix = a.recv_channel_prefix_matrix;
    p.num_tokens = a.num_tokens;
    p.num_topk = a.num_topk;
    p.num_experts = a.num_experts;
    p.num_channels = C;
    p.ring_depth = a.config.num_max_nvl_chunked_recv_tokens;
    p.chunk_tokens = a.config.num_max_nvl_chunked_send_tokens;
    p.num_output_rows = a.num_output_rows;
    p.slot = slot;
    p.channels_per_block = block_channel_count(R);
    p.stages = dispatch_stages(p.channels_per_block, slot.slot_bytes);
    p.publish_lag = env::publish_lag();
    p.cached = a.cached;
    p.debug_skip = debug_dispatch_skip_;
    p.kernel_ranks = env::debug_kernel_ranks();
    p.recv_x = a.recv_x;
    p.recv_x_scales = a.recv_x_scales;
    p.recv_topk_idx = a.recv_topk_idx;
    p.recv_topk_weights = a.recv_topk_weights;
    p.recv_src_idx = a.recv_src_idx;
    p.send_head = a.send_head;
    const int dispatch_warps = dispatch_block_threads(p.channels_per_block, R) / 32;
    p.comm.profile = profile_begin(a.config.num_sms, stream);
    launch_check(kernels::launch_dispatch(p, a.config.num_sms, stream), "dispatch");
    profile_end("dispatch", a.config.num_sms, dispatch_warps,
                {{"sender", 0, p.channels_per_block, {"load", "row_wait", "store", "publish", "drain"}},
                 {"receiver", p.channels_per_block, p.channels_per_block * R, {"tail_wait", "copy", "release"}}},
                stream);
  }

  void combine(const CombineArgs& a, cudaStream_t stream) {
    require_usable("combine");
    validate_config(a.config, "combine");
    const int R = nvl_domain_size_;
    const int C = num_channels(a.config.num_sms, R);
    require(a.num_tokens >= 0 && a.num_recv_tokens >= 0, "combine: token counts must be >= 0");
    require(a.hidden > 0 && a.hidden % 8 == 0, "combine: hidden must be a positive multiple of 8");
    require(a.num_topk >= 0 && a.num_topk <= kMaxTopk, "combine: num_topk must be in [0, " + str(kMaxTopk) + "]");
    // num_topk > 0 means top-k weights travel with the rows (every rank must agree: it sets the
    // ring slot layout); pointers are required only where there are rows behind them.
    const bool has_weights = a.num_topk > 0;
    require(!has_weights || a.num_recv_tokens == 0 || a.topk_weights, "combine: topk_weights is null");
    require(!has_weights || a.num_tokens == 0 || a.combined_topk_weights, "combine: combined_topk_weights is null");
    require(has_weights || (a.topk_weights == nullptr && a.combined_topk_weights == nullptr),
            "combine: topk weights given with num_topk == 0");
    require(a.num_recv_tokens == 0 || a.x, "combine: x is null");
    require(a.num_tokens == 0 || (a.combined_x && a.send_head && a.is_token_in_rank),
            "combine: combined_x/send_head/is_token_in_rank is null");
    require(a.rank_prefix_matrix && a.channel_prefix_matrix && a.recv_channel_prefix_matrix,
            "combine: handle matrices are null");
    require_aligned16(a.x, "combine", "x");
    require_aligned16(a.bias0, "combine", "bias0");
    require_aligned16(a.bias1, "combine", "bias1");
    require_aligned16(a.combined_x, "combine", "combined_x");
    const CombineSlotLayout slot = make_combine_slot(a.hidden, a.num_topk);
    require(combine_stages(block_channel_count(R), slot.slot_bytes) >= 1,
            "combine: rows of " + str(slot.slot_bytes) + " bytes do not fit the kernel's shared memory (hidden " +
                str(a.hidden) + " too large)");
    require_ring_space(a.config, slot.slot_bytes, "combine");
    FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
    const kernels::BarrierParams barrier{
        comm_context(), C, call_info(CallOp::kCombine, a.config, C, a.hidden, DType::kBFloat16, a.num_topk, 0)};
    launch_check(kernels::launch_notify_barrier(barrier, stream), "notify (combine)");
    kernels::CombineParams p{};
    p.comm = comm_context();
    p.x = a.x;
    p.topk_weights = a.topk_weights;
    p.bias0 = a.bias0;
    p.bias1 = a.bias1;
    p.rank_prefix_matrix = a.rank_prefix_matrix;
    p.channel_prefix_matrix = a.channel_prefix_matrix;
    p.recv_channel_prefix_matrix = a.recv_channel_prefix_matrix;
    p.send_head = a.send_head;
    p.num_tokens = a.num_tokens;
    p.hidden = a.hidden;
    p.num_topk = a.num_topk;
    p.num_recv_tokens = a.num_recv_tokens;
    p.num_channels = C;
    p.ring_depth = a.config.num_max_nvl_chunked_recv_tokens;
    p.chunk_tokens = a.config.num_max_nvl_chunked_send_tokens;
    p.slot = slot;
    p.channels_per_block = block_channel_count(R);
    p.stages = combine_stages(p.channels_per_block, slot.slot_bytes);
    p.publish_lag = env::publish_lag();
    p.bulk_sender = env::combine_bulk_sender();
    p.kernel_ranks = env::debug_kernel_ranks();
    p.combined_x = a.combined_x;
    p.combined_topk_weights = a.combined_topk_weights;
    const int combine_warps = combine_block_threads(p.channels_per_block, R, p.bulk_sender) / 32;
    const int sender_warps = combine_sender_warps(p.channels_per_block, R, p.bulk_sender);
    p.comm.profile = profile_begin(a.config.num_sms, stream);
    launch_check(kernels::launch_combine(p, a.config.num_sms, stream), "combine");
    profile_end("combine", a.config.num_sms, combine_warps,
                {{"sender", 0, p.bulk_sender ? sender_warps : 0, {"load", "row_wait", "store", "publish", "drain"}},
                 {"receiver", sender_warps, p.channels_per_block * kCombineWorkers, {"row_wait", "reduce", "release"}}},
                stream);
  }

  BufferOptions options_;
  int nvl_domain_size_ = 1;
  int device_ = 0;
  int num_device_sms_ = 0;
  double timeout_s_ = 100;
  NvlBufferLayout layout_{};
  void* local_buffer_ = nullptr;
  int* abort_flag_ = nullptr;
  void** peer_table_ = nullptr;
  volatile kernels::MappedRecvCounts* mapped_counts_ = nullptr;
  kernels::MappedRecvCounts* mapped_counts_device_ = nullptr;
  volatile DeviceErrorRecord* error_ = nullptr;
  DeviceErrorRecord* error_device_ = nullptr;
  cudaStream_t comm_stream_ = nullptr;
  std::unique_ptr<transport::Transport> transport_;
  int notify_seq_ = 0;
  int num_local_experts_pending_ = 0;
  int notified_channels_ = -1;
  CallInfo notified_call_{};  // of the last notify_dispatch
  bool awaiting_counts_ = false;
  int debug_dispatch_skip_ = env::debug_dispatch_skip();
  int profile_every_ = env::debug_profile();
  int profile_calls_ = 0;
  unsigned long long* profile_ = nullptr;
  bool available_ = false;
  bool destroyed_ = false;
};

// ---- Buffer: the public face -------------------------------------------------------------------
Buffer::Buffer(const BufferOptions& options) : impl_(std::make_unique<BufferImpl>(options)) {}

Buffer::Buffer(const BufferOptions& options, const AllGatherFn& all_gather) : Buffer(options) {
  const std::vector<uint8_t> mine = local_handle();
  std::vector<uint8_t> all(mine.size() * options.num_ranks);
  all_gather(mine.data(), mine.size(), all.data());
  std::vector<std::vector<uint8_t>> per_rank(options.num_ranks);
  for (int r = 0; r < options.num_ranks; ++r)
    per_rank[r].assign(all.begin() + r * mine.size(), all.begin() + (r + 1) * mine.size());
  connect(per_rank);
}

Buffer::~Buffer() = default;

std::vector<uint8_t> Buffer::local_handle() const { return impl_->local_handle(); }
void Buffer::connect(const std::vector<std::vector<uint8_t>>& all_handles) { impl_->connect(all_handles); }
bool Buffer::is_available() const { return impl_->available_; }
void Buffer::destroy() { impl_->destroy(); }
int Buffer::rank() const { return impl_->options_.rank; }
int Buffer::num_ranks() const { return impl_->options_.num_ranks; }
int Buffer::nvl_domain_size() const { return impl_->nvl_domain_size_; }
int Buffer::device() const { return impl_->device_; }
size_t Buffer::num_nvl_bytes() const { return impl_->options_.num_nvl_bytes; }
size_t Buffer::num_rdma_bytes() const { return impl_->options_.num_rdma_bytes; }
double Buffer::timeout_s() const { return impl_->timeout_s_; }
cudaStream_t Buffer::comm_stream() const { return impl_->comm_stream_; }
void* Buffer::local_nvl_buffer() const { return impl_->local_buffer_; }
int Buffer::num_channels(const Config& config) const { return flashep::num_channels(config.num_sms, impl_->nvl_domain_size_); }
void Buffer::get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream) { impl_->get_dispatch_layout(args, stream); }
void Buffer::notify_dispatch(const NotifyDispatchArgs& args, cudaStream_t stream) { impl_->notify_dispatch(args, stream); }
RecvCounts Buffer::wait_recv_counts() { return impl_->wait_recv_counts(); }
void Buffer::dispatch(const DispatchArgs& args, cudaStream_t stream) { impl_->dispatch(args, stream); }
void Buffer::combine(const CombineArgs& args, cudaStream_t stream) { impl_->combine(args, stream); }
void Buffer::check() const { impl_->check(); }

}  // namespace flashep
