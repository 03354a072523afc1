// flashep::Buffer: lifetime and resources (allocation through the memory domains, the bootstrap,
// teardown) and the error state (check, poisoning, the abort that reaches every peer). The
// operations are in intranode_ops.cpp.
#include "flashep/buffer.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "core/buffer_impl.hpp"
#include "core/internode_compose.hpp"
#include "core/cuda_check.hpp"

namespace flashep {

std::string str(int64_t v) { return std::to_string(v); }

namespace {

std::atomic<uint64_t> next_buffer_id{1};

/// What every rank says about its buffer in the first bootstrap round; all but the rank must agree.
struct BufferRecord {
  uint32_t magic;
  int32_t rank;
  int32_t num_ranks;
  int32_t nvl_domain_size;
  uint64_t num_nvl_bytes;
  uint64_t num_rdma_bytes;
  uint32_t initial_counter;
  int32_t symmetric;  // allocates an NVSHMEM region
  int32_t low_latency;  // low_latency_mode | allow_nvlink_for_low_latency << 1 | enable_shrink << 2
};
constexpr uint32_t kBufferMagic = 0x46455042;  // "FEPB"

void append(std::vector<uint8_t>& out, const void* data, size_t bytes) {
  const size_t at = out.size();
  out.resize(at + bytes);
  if (bytes > 0) std::memcpy(out.data() + at, data, bytes);
}

/// The part [offset, offset + bytes) of every rank's message.
std::vector<std::vector<uint8_t>> slice(const std::vector<std::vector<uint8_t>>& all, size_t offset, size_t bytes) {
  std::vector<std::vector<uint8_t>> parts(all.size());
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].size() < offset + bytes)
      throw_error(ErrorKind::kPeerMismatch, "connect: the bootstrap message of rank " + str(r) + " is too short (" +
                                                str(all[r].size()) + " bytes): ranks of different flashep builds?");
    parts[r].assign(all[r].begin() + offset, all[r].begin() + offset + bytes);
  }
  return parts;
}

}  // namespace

BufferImpl::BufferImpl(const BufferOptions& options) : options_(options), env_(env::read()) {
  id_ = next_buffer_id.fetch_add(1);
  FLASHEP_REQUIRE(options.num_ranks >= 1 && options.num_ranks <= kMaxRanks,
          "num_ranks must be in [1, " + str(kMaxRanks) + "], got " + str(options.num_ranks));
  FLASHEP_REQUIRE(options.rank >= 0 && options.rank < options.num_ranks,
          "rank " + str(options.rank) + " out of [0, " + str(options.num_ranks) + ")");
  nvl_domain_size_ = options.nvl_domain_size > 0 ? options.nvl_domain_size
                    : env_.nvl_domain_size > 0 ? std::min(env_.nvl_domain_size, options.num_ranks)
                                               : std::min(options.num_ranks, 8);
  FLASHEP_REQUIRE(nvl_domain_size_ <= kMaxNvlRanks, "nvl_domain_size " + str(nvl_domain_size_) + " exceeds " + str(kMaxNvlRanks));
  FLASHEP_REQUIRE(nvl_domain_size_ <= options.num_ranks && options.num_ranks % nvl_domain_size_ == 0,
          "nvl_domain_size (" + str(nvl_domain_size_) + ") must divide num_ranks (" + str(options.num_ranks) + ")");
  num_nodes_ = options.num_ranks / nvl_domain_size_;
  node_ = options.rank / nvl_domain_size_;
  nvl_rank_ = options.rank % nvl_domain_size_;
  timeout_s_ = options.timeout_s > 0 ? options.timeout_s : env_.timeout_s;
  if (options.device >= 0) {
    device_ = options.device;
  } else {
    FLASHEP_CUDA_CHECK(cudaGetDevice(&device_));
  }
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  FLASHEP_CUDA_CHECK(cudaDeviceGetAttribute(&num_device_sms_, cudaDevAttrMultiProcessorCount, device_));
#if !FLASHEP_DIAGNOSTICS
  if (options.rank == 0 && (env_.profile_every > 0 || env_.dispatch_skip != 0))
    std::fprintf(stderr, "flashep: FLASHEP_DEBUG_PROFILE / FLASHEP_DEBUG_DISPATCH_SKIP are ignored: this build has "
                         "no diagnostics (configure with -DFLASHEP_ENABLE_DIAGNOSTICS=ON)\n");
#endif

  nvl_layout_ = make_nvl_allocation(nvl_domain_size_, static_cast<int64_t>(options.num_nvl_bytes));
  // Combine receivers address ring rows as 32-bit offsets in 16-byte words.
  FLASHEP_REQUIRE(nvl_layout_.bytes <= kMaxNvlBufferBytes, "num_nvl_bytes " + str(options.num_nvl_bytes) +
                                                       " plus the control block (" + str(nvl_layout_.bytes) +
                                                       " bytes) exceeds the maximum of " + str(kMaxNvlBufferBytes));
  // The NVSHMEM region exists when peers of other NVLink domains must be reached (multi-node).
  wants_symmetric_ = num_nodes_ > 1 && options.num_rdma_bytes > 0;
  rdma_layout_ = make_rdma_layout(static_cast<int64_t>(options.num_rdma_bytes));
  int64_t nvl_alloc_bytes = nvl_layout_.bytes;
  if (options.low_latency_mode && options.num_rdma_bytes > 0) {
    // Low-latency region: in the NVLink allocation when some peer (or only this rank) is reached
    // directly, in the symmetric heap when some peer needs NVSHMEM; the primary copy (state,
    // zero-copy, this rank's own messages) is the NVLink one when it exists.
    ll_bytes_ = align_up(static_cast<int64_t>(options.num_rdma_bytes), 128);
    ll_direct_nvlink_ = options.allow_nvlink_for_low_latency && nvl_domain_size_ > 1;
    ll_needs_nvshmem_ = options.num_ranks > (ll_direct_nvlink_ ? nvl_domain_size_ : 1);
    wants_symmetric_ = ll_needs_nvshmem_;
    if (!ll_needs_nvshmem_ || ll_direct_nvlink_) {
      ll_nvl_offset_ = align_up(nvl_layout_.bytes, 128);
      nvl_alloc_bytes = ll_nvl_offset_ + ll_bytes_;
    }
  }

  const transport::DomainSpec nvl_spec{options.rank, options.num_ranks, nvl_domain_size_, device_,
                                       static_cast<size_t>(nvl_alloc_bytes)};
  nvl_ = transport::make_cuda_ipc_domain(nvl_spec);
  if (wants_symmetric_) {
    const transport::DomainSpec sym_spec{options.rank, options.num_ranks, nvl_domain_size_, device_,
                                         static_cast<size_t>(rdma_layout_.bytes())};
    sym_ = transport::make_nvshmem_domain(sym_spec);
  }
  // Long-lived counters start at initial_counter (tests run calls across the wrap point).
  if (options.initial_counter != 0) {
    std::vector<uint32_t> words((nvl_layout_.control.end() - nvl_layout_.control.barrier_epoch()) / 4, 0);
    words[0] = options.initial_counter;
    for (int p = 0; p < kMaxNvlRanks; ++p)
      words[(nvl_layout_.control.barrier_signal(p) - nvl_layout_.control.barrier_epoch()) / 4] = options.initial_counter;
    FLASHEP_CUDA_CHECK(cudaMemcpy(nvl_->local_base() + nvl_layout_.control.barrier_epoch(), words.data(),
                                  (nvl_layout_.control.barrier_signal(kMaxNvlRanks) - nvl_layout_.control.barrier_epoch()),
                                  cudaMemcpyHostToDevice));
  }
  notify_seq_ = options.initial_counter;

  void* raw = nullptr;
  // Host-mapped: the GPU writes receive counts and error records the host polls without a sync.
  FLASHEP_CUDA_CHECK(cudaHostAlloc(&raw, sizeof(kernels::MappedRecvCounts), cudaHostAllocMapped));
  std::memset(raw, 0, sizeof(kernels::MappedRecvCounts));
  mapped_counts_ = static_cast<kernels::MappedRecvCounts*>(raw);
  FLASHEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped_counts_device_), raw, 0));
  FLASHEP_CUDA_CHECK(cudaHostAlloc(&raw, sizeof(DeviceErrorRecord), cudaHostAllocMapped));
  std::memset(raw, 0, sizeof(DeviceErrorRecord));
  error_ = static_cast<DeviceErrorRecord*>(raw);
  FLASHEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), raw, 0));
  FLASHEP_CUDA_CHECK(cudaHostAlloc(&raw, sizeof(int), cudaHostAllocDefault));
  abort_source_ = static_cast<int*>(raw);
  *abort_source_ = options.rank + 1;
  FLASHEP_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
  FLASHEP_CUDA_CHECK(cudaStreamCreateWithFlags(&abort_stream_, cudaStreamNonBlocking));
  if (ll_bytes_ > 0) FLASHEP_CUDA_CHECK(kernels::load_low_latency_kernels());
  FLASHEP_CUDA_CHECK(cudaDeviceSynchronize());
}

BufferImpl::~BufferImpl() { destroy(false); }

// The bootstrap rounds. Round 0: every rank's BufferRecord, CUDA IPC record and (with an NVSHMEM
// region) NVSHMEM message; the records are checked and the NVLink peers mapped. Round 1 (NVSHMEM
// only): NVSHMEM's initialization and allocation, which are collective and block until every rank
// joins. Between the two the callers (Python, Buffer(options, all_gather)) learn whether every rank
// got through round 0, so that a rank that failed there never leaves the others inside NVSHMEM.
std::vector<uint8_t> BufferImpl::bootstrap_message() const {
  FLASHEP_REQUIRE(!destroyed_ && !available_, "bootstrap: the buffer is destroyed or connected already");
  std::vector<uint8_t> out;
  if (bootstrap_round_ == 1) {  // NVSHMEM's round: nothing to say, everything came in round 0
    const uint32_t marker = kBufferMagic;
    append(out, &marker, sizeof(marker));
    return out;
  }
  BufferRecord record{kBufferMagic,
                      options_.rank,
                      options_.num_ranks,
                      nvl_domain_size_,
                      options_.num_nvl_bytes,
                      options_.num_rdma_bytes,
                      options_.initial_counter,
                      wants_symmetric_ ? 1 : 0,
                      (options_.low_latency_mode ? 1 : 0) | (options_.allow_nvlink_for_low_latency ? 2 : 0) |
                          (options_.enable_shrink ? 4 : 0)};
  append(out, &record, sizeof(record));
  const std::vector<uint8_t> nvl = nvl_->bootstrap_message();
  append(out, nvl.data(), nvl.size());
  if (sym_) {
    const std::vector<uint8_t> sym = sym_->bootstrap_message();
    append(out, sym.data(), sym.size());
  }
  return out;
}

bool BufferImpl::bootstrap_receive(const std::vector<std::vector<uint8_t>>& all) {
  FLASHEP_REQUIRE(!destroyed_ && !available_, "bootstrap: the buffer is destroyed or connected already");
  FLASHEP_REQUIRE(static_cast<int>(all.size()) == options_.num_ranks,
          "bootstrap: expected " + str(options_.num_ranks) + " messages, got " + str(all.size()));
  if (bootstrap_round_ == 1) {
    available_ = sym_->bootstrap_receive(pending_symmetric_);
    pending_symmetric_.clear();
    return available_;
  }
  // Every rank must describe the same buffer: checked before any collective step, on messages
  // every rank sees alike, so a disagreement fails on every rank alike.
  const auto records = slice(all, 0, sizeof(BufferRecord));
  const BufferRecord* mine = nullptr;
  for (int r = 0; r < options_.num_ranks; ++r) {
    const auto* record = reinterpret_cast<const BufferRecord*>(records[r].data());
    if (record->magic != kBufferMagic || record->rank != r)
      throw_error(ErrorKind::kPeerMismatch, "bootstrap: message " + str(r) + " is not rank " + str(r) +
                                                "'s (messages out of order, or of another flashep version)");
    if (r == options_.rank) mine = record;
  }
  for (int r = 0; r < options_.num_ranks; ++r) {
    const auto* theirs = reinterpret_cast<const BufferRecord*>(records[r].data());
    auto agree = [&](const char* field, int64_t here, int64_t there) {
      if (here != there)
        throw_error(ErrorKind::kPeerMismatch, "bootstrap: " + std::string(field) + " is " + str(here) + " on rank " +
                                                  str(options_.rank) + " and " + str(there) + " on rank " + str(r) +
                                                  "; every rank must create the buffer with the same arguments");
    };
    agree("num_ranks", mine->num_ranks, theirs->num_ranks);
    agree("nvl_domain_size", mine->nvl_domain_size, theirs->nvl_domain_size);
    agree("num_nvl_bytes", static_cast<int64_t>(mine->num_nvl_bytes), static_cast<int64_t>(theirs->num_nvl_bytes));
    agree("num_rdma_bytes", static_cast<int64_t>(mine->num_rdma_bytes), static_cast<int64_t>(theirs->num_rdma_bytes));
    agree("initial_counter", mine->initial_counter, theirs->initial_counter);
    agree("low-latency options (low_latency_mode | allow_nvlink_for_low_latency_mode << 1 | enable_shrink << 2)",
          mine->low_latency, theirs->low_latency);
  }
  size_t offset = sizeof(BufferRecord);
  const size_t nvl_bytes = nvl_->bootstrap_message().size();
  nvl_->bootstrap_receive(slice(all, offset, nvl_bytes));
  offset += nvl_bytes;
  if (!sym_) {
    available_ = true;
    return true;
  }
  pending_symmetric_ = slice(all, offset, sym_->bootstrap_message().size());
  bootstrap_round_ = 1;
  return false;
}

void BufferImpl::destroy(bool collective) {
  if (destroyed_) return;
  destroyed_ = true;
  available_ = false;
  // Best effort: the device may be in an error state already (a failed kernel); free anyway.
  cudaSetDevice(device_);
  cudaDeviceSynchronize();
  if (sym_) sym_->close(collective);
  sym_.reset();
  if (nvl_) nvl_->close(collective);
  nvl_.reset();
  cudaFree(profile_);
  profile_ = nullptr;
  cudaFreeHost(const_cast<kernels::MappedRecvCounts*>(mapped_counts_));
  mapped_counts_ = nullptr;
  cudaFreeHost(const_cast<DeviceErrorRecord*>(error_));
  error_ = nullptr;
  cudaFreeHost(abort_source_);
  abort_source_ = nullptr;
  cudaStreamDestroy(comm_stream_);
  cudaStreamDestroy(abort_stream_);
}

// ---- the error state -------------------------------------------------------------------------------

void BufferImpl::check() const {
  if (poisoned_)
    throw_error(ErrorKind::kPoisoned, "rank " + str(options_.rank) + ": this buffer is unusable after an earlier "
                                          "error; destroy it and create a new one. The first error: " + first_error_);
  if (error_ == nullptr || destroyed_ || error_->seq == 0) return;
  DeviceErrorRecord copy = read_error_record();
  // This rank's own failure may still replace a record of a peer's abort (a disagreement found on
  // both sides): give the kernel a moment to do so, so the error names the real cause.
  if (static_cast<Cause>(copy.cause) == Cause::kPeerAbort) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
    while (error_->seq == copy.seq && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    copy = read_error_record();
  }
  poisoned_ = true;
  first_error_kind_ = kind_of(copy);
  first_error_ = describe(copy, timeout_s_);
  // The kernel aborted our NVLink domain itself; peers of other domains learn it from here.
  if (static_cast<Cause>(copy.cause) == Cause::kOwn) propagate_abort(false);
  throw Error(first_error_kind_, first_error_);
}

DeviceErrorRecord BufferImpl::read_error_record() const {
  // A sequence lock: retry while the GPU writes (odd) or wrote again during the copy.
  DeviceErrorRecord copy{};
  for (int attempt = 0; attempt < 1 << 20; ++attempt) {
    const int before = error_->seq;
    if (before & 1) continue;
    std::atomic_thread_fence(std::memory_order_acquire);
    std::memcpy(&copy, const_cast<const DeviceErrorRecord*>(error_), sizeof(copy));
    std::atomic_thread_fence(std::memory_order_acquire);
    if (error_->seq == before) break;
  }
  return copy;
}

void BufferImpl::require_usable(const char* op) const {
  FLASHEP_REQUIRE(!destroyed_, std::string(op) + ": the buffer was destroyed");
  FLASHEP_REQUIRE(available_, std::string(op) + ": the buffer is not connected (run the bootstrap first)");
  check();
}

void BufferImpl::fail_on_host(ErrorKind kind, const std::string& message) {
  if (!poisoned_) {
    poisoned_ = true;
    first_error_kind_ = kind;
    first_error_ = message;
    propagate_abort(true);
  }
  throw Error(kind, message);
}

void BufferImpl::propagate_abort(bool nvlink_peers) const {
  if (!available_ || abort_source_ == nullptr) return;
  cudaSetDevice(device_);
  if (nvlink_peers) {
    for (int p = 0; p < nvl_domain_size_; ++p) {
      char* word = nvl_->peer_base(node_ * nvl_domain_size_ + p) + nvl_layout_.control.abort_word();
      cudaMemcpyAsync(word, abort_source_, sizeof(int), cudaMemcpyHostToDevice, abort_stream_);
    }
  }
  if (sym_) {
    for (int peer = 0; peer < options_.num_ranks; ++peer)
      if (peer / nvl_domain_size_ != node_)
        sym_->post_signal(peer, static_cast<size_t>(rdma_layout_.abort_word()), uint64_t(options_.rank + 1),
                          abort_stream_);
  }
  // Not waited for: a wedged device must not hang the host here.
}

void BufferImpl::launch_check(cudaError_t status, const char* what) {
  // A call may fail here after its first collective kernel is enqueued: poison and abort, so the
  // peers stop at once instead of waiting for this rank until the timeout.
  if (status != cudaSuccess)
    fail_on_host(ErrorKind::kDeviceFault, "flashep: rank " + str(options_.rank) + ": launching " + what + ": " +
                                              cudaGetErrorString(status));
}

DeviceComm BufferImpl::device_comm() const {
  DeviceComm c;
  c.rank = options_.rank;
  c.num_ranks = options_.num_ranks;
  c.nvl_rank = nvl_rank_;
  c.nvl_size = nvl_domain_size_;
  c.node = node_;
  c.num_nodes = num_nodes_;
  for (int p = 0; p < nvl_domain_size_; ++p) c.nvl_base[p] = nvl_->peer_base(node_ * nvl_domain_size_ + p);
  c.nvl = nvl_layout_;
  c.sym_base = sym_ ? sym_->local_base() : nullptr;
  c.rdma = rdma_layout_;
  c.error = error_device_;
  c.timeout_ns = static_cast<uint64_t>(timeout_s_ * 1e9);
  return c;
}

PeerTransport BufferImpl::peer_transport(int peer) const {
  FLASHEP_REQUIRE(peer >= 0 && peer < options_.num_ranks, "peer_transport: peer " + str(peer) + " out of range");
  if (peer == options_.rank) return PeerTransport::kSelf;
  return peer / nvl_domain_size_ == node_ ? PeerTransport::kNvlink : PeerTransport::kNvshmem;
}

std::vector<PeerCheck> BufferImpl::check_transports(size_t bytes_per_peer) {
  require_usable("check_transports");
  const int R = options_.num_ranks;
  FLASHEP_REQUIRE(bytes_per_peer > 0 && bytes_per_peer % 16 == 0,
          "check_transports: bytes_per_peer must be a positive multiple of 16, got " + str(bytes_per_peer));
  const int64_t needed = 2 * int64_t(R) * static_cast<int64_t>(bytes_per_peer);
  FLASHEP_REQUIRE(nvl_domain_size_ == 1 || needed <= nvl_layout_.intranode.ring_capacity,
          "check_transports: needs num_nvl_bytes >= 2 * num_ranks * bytes_per_peer = " +
              str(needed));
  if (sym_)
    FLASHEP_REQUIRE(needed <= rdma_layout_.data_bytes,
            "check_transports: needs num_rdma_bytes >= 2 * num_ranks * bytes_per_peer = " + str(needed));
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  long long* mismatches = nullptr;
  FLASHEP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&mismatches), sizeof(long long) * R));
  std::vector<long long> host(R, 0);
  cudaError_t status = cudaMemsetAsync(mismatches, 0, sizeof(long long) * R, comm_stream_);
  kernels::TransportCheckParams p{};
  p.comm = device_comm();
  p.words = static_cast<int64_t>(bytes_per_peer / 4);
  p.seq = ++transport_check_seq_;
  p.nvshmem_peers = sym_ ? 1 : 0;
  p.mismatches = mismatches;
  if (status == cudaSuccess) status = kernels::launch_transport_check(p, comm_stream_);
  if (status == cudaSuccess) status = cudaStreamSynchronize(comm_stream_);
  if (status == cudaSuccess)
    status = cudaMemcpy(host.data(), mismatches, sizeof(long long) * R, cudaMemcpyDeviceToHost);
  cudaFree(mismatches);
  // The check used the start of the symmetric region as scratch: reset the multi-node rail stage's
  // fixed part (state, signals, flags) on every rank (the call is collective), so their sequence
  // numbers start again in step. The low-latency region (also at the start) is the user's to clean.
  if (status == cudaSuccess && sym_ && num_nodes_ > 1 && !options_.low_latency_mode)
    status = cudaMemset(sym_->local_base(), 0, static_cast<size_t>(rail_fixed_bytes(num_nodes_)));
  if (status != cudaSuccess) launch_check(status, "check_transports");
  check();
  std::vector<PeerCheck> result(R);
  for (int peer = 0; peer < R; ++peer) {
    result[peer].peer = peer;
    result[peer].transport = peer_transport(peer);
    // A peer of another NVLink domain without an NVSHMEM region (num_rdma_bytes 0) was not checked.
    const bool checked = peer / nvl_domain_size_ == node_ || sym_ != nullptr;
    result[peer].mismatched_words = checked ? host[peer] : -1;
  }
  return result;
}

void BufferImpl::probe_put_bandwidth(int peer, size_t bytes, int num_blocks, cudaStream_t stream) {
  require_usable("probe_put_bandwidth");
  const std::string o = "probe_put_bandwidth";
  if (!sym_) throw_error(ErrorKind::kUnsupported, o + ": needs an NVSHMEM region (num_rdma_bytes > 0)");
  FLASHEP_REQUIRE(peer >= 0 && peer < options_.num_ranks && peer != options_.rank,
          o + ": peer must be another rank, got " + str(peer));
  FLASHEP_REQUIRE(num_blocks >= 1 && num_blocks <= 1024, o + ": num_blocks must be in [1, 1024], got " + str(num_blocks));
  // The end of the region: the modes' flags and state sit at its start (fixed parts far below half).
  FLASHEP_REQUIRE(bytes > 0 && bytes % 16 == 0 && static_cast<int64_t>(bytes) <= rdma_layout_.data_bytes / 2,
          o + ": bytes must be a positive multiple of 16 of at most num_rdma_bytes / 2 = " +
              str(rdma_layout_.data_bytes / 2) + ", got " + str(bytes));
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  kernels::PutProbeParams p{};
  p.comm = device_comm();
  p.peer = peer;
  p.bytes = static_cast<int64_t>(bytes);
  p.offset = (rdma_layout_.data_bytes - p.bytes) / 128 * 128;
  p.chunk = 1 << 20;
  launch_check(kernels::launch_put_probe(p, num_blocks, stream), "probe_put_bandwidth");
}

// ---- Buffer: the public face -----------------------------------------------------------------------

Buffer::Buffer(const BufferOptions& options) : impl_(std::make_unique<BufferImpl>(options)) {}

Buffer::Buffer(const BufferOptions& options, const AllGatherFn& all_gather) : Buffer(options) {
  // Every round: the messages, then every rank's outcome, so that a rank that failed (its own
  // error is rethrown) never leaves the others waiting in a later round or inside NVSHMEM.
  const int R = options.num_ranks;
  auto agree = [&](std::exception_ptr failure) {
    const uint8_t mine = failure ? 0 : 1;
    std::vector<uint8_t> everyone(R);
    all_gather(&mine, 1, everyone.data());
    if (failure) std::rethrow_exception(failure);
    for (int r = 0; r < R; ++r)
      if (everyone[r] == 0)
        throw_error(ErrorKind::kPeerFailed, "rank " + str(options.rank) + ": the bootstrap failed on rank " + str(r) +
                                                " (its own error says why)");
  };
  for (bool done = false; !done;) {
    std::exception_ptr failure;
    std::vector<uint8_t> mine;
    try {
      mine = bootstrap_message();
    } catch (...) {
      failure = std::current_exception();
    }
    // Messages are the same size on every rank of a round when the ranks agree on the buffer (the
    // records say so); the sizes are gathered first so that a disagreement cannot overrun `all`.
    const uint64_t size = mine.size();
    std::vector<uint64_t> sizes(R);
    all_gather(&size, sizeof(size), sizes.data());
    for (int r = 0; r < R && !failure; ++r)
      if (sizes[r] != size)
        failure = std::make_exception_ptr(Error(ErrorKind::kPeerMismatch,
                                                "flashep: bootstrap: rank " + str(r) + "'s message has " +
                                                    str(sizes[r]) + " bytes, this rank's " + str(size) +
                                                    " (different arguments or flashep builds)"));
    agree(failure);
    std::vector<uint8_t> all(mine.size() * R);
    all_gather(mine.data(), mine.size(), all.data());
    std::vector<std::vector<uint8_t>> per_rank(R);
    for (int r = 0; r < R; ++r) per_rank[r].assign(all.begin() + r * mine.size(), all.begin() + (r + 1) * mine.size());
    try {
      done = bootstrap_receive(per_rank);
    } catch (...) {
      failure = std::current_exception();
    }
    agree(failure);
  }
}

Buffer::~Buffer() = default;

std::vector<uint8_t> Buffer::bootstrap_message() const { return impl_->bootstrap_message(); }
bool Buffer::bootstrap_receive(const std::vector<std::vector<uint8_t>>& all) { return impl_->bootstrap_receive(all); }
bool Buffer::is_available() const { return impl_->available_; }
void Buffer::destroy(bool collective) { impl_->destroy(collective); }
int Buffer::rank() const { return impl_->options_.rank; }
int Buffer::num_ranks() const { return impl_->options_.num_ranks; }
int Buffer::nvl_domain_size() const { return impl_->nvl_domain_size_; }
int Buffer::device() const { return impl_->device_; }
size_t Buffer::num_nvl_bytes() const { return impl_->options_.num_nvl_bytes; }
size_t Buffer::num_rdma_bytes() const { return impl_->options_.num_rdma_bytes; }
double Buffer::timeout_s() const { return impl_->timeout_s_; }
uint64_t Buffer::id() const { return impl_->id_; }
cudaStream_t Buffer::comm_stream() const { return impl_->comm_stream_; }
void* Buffer::local_nvl_buffer() const { return impl_->nvl_ ? impl_->nvl_->local_base() : nullptr; }
PeerTransport Buffer::peer_transport(int peer) const { return impl_->peer_transport(peer); }
bool Buffer::nvshmem_built() { return transport::nvshmem_built(); }
int Buffer::num_channels(const Config& config) const {
  return flashep::num_channels(config.num_sms, impl_->nvl_domain_size_);
}
void Buffer::get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream) { impl_->get_dispatch_layout(args, stream); }
void Buffer::notify_dispatch(const NotifyDispatchArgs& args, cudaStream_t stream) { impl_->notify_dispatch(args, stream); }
RecvCounts Buffer::wait_recv_counts() { return impl_->wait_recv_counts(); }
void Buffer::dispatch(const DispatchArgs& args, cudaStream_t stream) { impl_->dispatch(args, stream); }
void Buffer::combine(const CombineArgs& args, cudaStream_t stream) { impl_->combine(args, stream); }
std::vector<PeerCheck> Buffer::check_transports(size_t bytes_per_peer) {
  return impl_->check_transports(bytes_per_peer);
}
void Buffer::probe_put_bandwidth(int peer, size_t bytes, int num_blocks, cudaStream_t stream) {
  impl_->probe_put_bandwidth(peer, bytes, num_blocks, stream);
}
void Buffer::check() const { impl_->check(); }

}  // namespace flashep
