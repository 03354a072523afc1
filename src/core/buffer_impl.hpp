// flashep::Buffer's implementation object, shared by the files that implement it:
//   buffer.cpp          lifetime, resources, bootstrap, the error state (check, poison, abort)
//   intranode_ops.cpp   the intranode operations: validate -> params -> launch
//   internode_ops.cpp   the multi-node stages (the rail stage so far)
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/call_check.hpp"
#include "core/device_comm.hpp"
#include "core/env.hpp"
#include "core/layouts.hpp"
#include "core/profile.hpp"
#include "flashep/buffer.hpp"
#include "kernels/launch.hpp"
#include "kernels/low_latency_launch.hpp"
#include "transport/memory_domain.hpp"

namespace flashep {

std::string str(int64_t v);

class BufferImpl {
 public:
  explicit BufferImpl(const BufferOptions& options);
  ~BufferImpl();

  // ---- lifetime (buffer.cpp) ---------------------------------------------------------------------
  std::vector<uint8_t> bootstrap_message() const;
  bool bootstrap_receive(const std::vector<std::vector<uint8_t>>& all);
  void destroy(bool collective);

  // ---- the error state (buffer.cpp) ----------------------------------------------------------------
  /// Throws the first recorded error (device record or host failure), then kPoisoned on every
  /// later call.
  void check() const;
  DeviceErrorRecord read_error_record() const;
  /// Destroyed, not connected, or poisoned: throws. Then check().
  void require_usable(const char* op) const;
  /// A failure found on the host (a poll past the timeout): poisons the buffer and aborts it on
  /// every peer, then throws.
  [[noreturn]] void fail_on_host(ErrorKind kind, const std::string& message);
  /// Writes the abort word of every peer (and ours) from the host: NVLink peers by copies into
  /// their mapped allocation, peers of other NVLink domains through NVSHMEM. Best effort, async.
  void propagate_abort(bool nvlink_peers) const;
  void launch_check(cudaError_t status, const char* what);

  DeviceComm device_comm() const;
  PeerTransport peer_transport(int peer) const;
  std::vector<PeerCheck> check_transports(size_t bytes_per_peer);
  void probe_put_bandwidth(int peer, size_t bytes, int num_blocks, cudaStream_t stream);
  // ---- the multi-node rail stage (internode_ops.cpp) -------------------------------------------------
  void internode_rail_exchange(const RailExchangeArgs& a, cudaStream_t stream);
  void internode_reorder_plan(const InternodeReorderPlanArgs& a, cudaStream_t stream);
  void internode_reorder_copy(const InternodeReorderCopyArgs& a, cudaStream_t stream);
  void internode_rail_return(const RailReturnArgs& a, cudaStream_t stream);

  // ---- intranode operations (intranode_ops.cpp) ----------------------------------------------------
  void get_dispatch_layout(const LayoutArgs& a, cudaStream_t stream);
  void notify_dispatch(const NotifyDispatchArgs& a, cudaStream_t stream);
  RecvCounts wait_recv_counts();
  void dispatch(const DispatchArgs& a, cudaStream_t stream);
  void checked_dispatch(const DispatchArgs& a, cudaStream_t stream);
  void combine(const CombineArgs& a, cudaStream_t stream);
  void require_intranode(const char* op) const;
  void validate_config(const Config& config, const char* op) const;
  void require_ring_space(const Config& config, int slot_bytes, const char* op) const;
  void check_handle(const DispatchHandle& h, const Config& config, const char* op, bool needs_send_head) const;

  // ---- low-latency operations (low_latency_ops.cpp) -------------------------------------------------
  void low_latency_dispatch(const LowLatencyDispatchArgs& a, cudaStream_t stream);
  void low_latency_combine(const LowLatencyCombineArgs& a, cudaStream_t stream);
  void* low_latency_combine_buffer(const LowLatencyHandle& h) const;
  void clean_low_latency_buffer(cudaStream_t stream);
  void low_latency_update_mask(int rank, bool mask, cudaStream_t stream);
  void low_latency_query_mask(int* mask_out, cudaStream_t stream) const;
  void low_latency_clean_mask(cudaStream_t stream);
  void require_low_latency(const char* op) const;
  int low_latency_blocks(int max_tokens) const;
  kernels::LowLatencyComm low_latency_comm(int max_tokens, int hidden, int num_experts, const char* op) const;
  void check_low_latency_handle(const LowLatencyHandle& h, const char* op) const;

  // ---- diagnostics builds: FLASHEP_DEBUG_PROFILE ----------------------------------------------------
  unsigned long long* profile_begin(int num_blocks, cudaStream_t stream);
  void profile_end(const char* op, int num_blocks, int warps_per_block, const std::vector<profile::WarpRole>& roles,
                   cudaStream_t stream);

  BufferOptions options_;
  env::EnvSettings env_;
  uint64_t id_ = 0;
  int nvl_domain_size_ = 1;
  int num_nodes_ = 1;
  int node_ = 0;
  int nvl_rank_ = 0;
  int device_ = 0;
  int num_device_sms_ = 0;
  double timeout_s_ = 100;
  NvlAllocationLayout nvl_layout_{};
  // Low-latency region (options_.low_latency_mode): its bytes, whether NVLink-domain peers write it
  // directly, whether some peer needs NVSHMEM, and where it lives in the NVLink allocation (-1: not
  // there; then the primary copy is the symmetric one, at the start of the RDMA data).
  int64_t ll_bytes_ = 0;
  bool ll_direct_nvlink_ = false;
  bool ll_needs_nvshmem_ = false;
  int64_t ll_nvl_offset_ = -1;
  uint64_t ll_combine_calls_ = 0;  // host count of combines: the zero-copy half the next one reads
  RdmaLayout rdma_layout_{};
  bool wants_symmetric_ = false;
  int bootstrap_round_ = 0;
  std::vector<std::vector<uint8_t>> pending_symmetric_;  // round 0's NVSHMEM messages, for round 1
  std::unique_ptr<transport::NvlinkDomain> nvl_;
  std::unique_ptr<transport::SymmetricDomain> sym_;
  volatile kernels::MappedRecvCounts* mapped_counts_ = nullptr;
  kernels::MappedRecvCounts* mapped_counts_device_ = nullptr;
  volatile DeviceErrorRecord* error_ = nullptr;
  DeviceErrorRecord* error_device_ = nullptr;
  int* abort_source_ = nullptr;  // pinned host int: the value the host posts into abort words
  cudaStream_t comm_stream_ = nullptr;
  cudaStream_t abort_stream_ = nullptr;
  bool available_ = false;
  bool destroyed_ = false;
  // The error state: the first error's kind and message; later calls see kPoisoned.
  mutable bool poisoned_ = false;
  mutable ErrorKind first_error_kind_ = ErrorKind::kDeviceFault;
  mutable std::string first_error_;

  // What the last notify_dispatch announced, so that dispatch() runs the call its peers checked.
  struct Notified {
    bool pending = false;
    int num_channels = 0;
    CallInfo call{};
    int num_tokens = 0;
    const bool* is_token_in_rank = nullptr;
    const int64_t* topk_idx = nullptr;
    const int* rank_prefix_matrix = nullptr;
    const int* channel_prefix_matrix = nullptr;
    const int* recv_channel_prefix_matrix = nullptr;
  } notified_;
  uint32_t notify_seq_ = 0;
  int num_local_experts_pending_ = 0;
  bool awaiting_counts_ = false;
  uint64_t transport_check_seq_ = 0;
  int profile_calls_ = 0;
  unsigned long long* profile_ = nullptr;
};

}  // namespace flashep
