// flashep: the torch-free C++ API of the expert-parallel communication buffer.
//
// One Buffer per rank (one process per GPU). Construction is collective: every rank of the group
// creates its Buffer with the same sizes, and the ranks exchange CUDA IPC handles through an
// all-gather that the caller provides (torch.distributed, MPI, a file, a TCP store: anything).
//
// All pointers are device pointers unless stated; every operation is enqueued on the stream given
// and returns without synchronizing, except wait_recv_counts() (a bounded host poll).
//
// The high-throughput dispatch of one call is:
//   get_dispatch_layout()              (optional: routing -> per-rank/per-expert counts)
//   notify_dispatch()                  (GPU exchanges counts, writes them to host-mapped memory)
//   wait_recv_counts()                 (host polls those counts, bounded by the timeout)
//   ... caller allocates outputs of exactly num_recv_tokens rows ...
//   dispatch()
// With num_worst_tokens > 0 the caller skips wait_recv_counts() and allocates num_worst_tokens rows
// (CUDA-graph capturable). A cached dispatch (handle of an earlier dispatch) calls dispatch() with
// `cached = true` and no notify. combine() needs the handle of the dispatch it reverses.
//
// Errors: bad arguments throw flashep::Error before anything is enqueued. A GPU wait that exceeds
// the timeout records (rank, phase, what it waited for) in host-mapped memory and the kernel exits;
// the next host call of this Buffer (or wait_recv_counts(), or check()) throws flashep::Error with
// that record. After such an error the Buffer must be destroyed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "flashep/config.hpp"

namespace flashep {

/// Every error flashep raises: invalid input, timeout, CUDA failure.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType : int {
  kBFloat16 = 0,    ///< 2 bytes
  kFloat8E4M3 = 1,  ///< 1 byte, with float32 scales per 128 channels
};

/// Collective all-gather: `mine` (bytes bytes) from every rank into `all` (num_ranks * bytes, rank
/// order). Must be called by all ranks in the same order.
using AllGatherFn = std::function<void(const void* mine, size_t bytes, void* all)>;

struct BufferOptions {
  int rank = 0;
  int num_ranks = 1;
  /// Ranks per NVLink domain ("node"); 0 means min(num_ranks, 8). The intranode kernels need
  /// num_ranks == nvl_domain_size; multi-node (num_ranks > nvl_domain_size) is a later milestone.
  int nvl_domain_size = 0;
  size_t num_nvl_bytes = 0;
  size_t num_rdma_bytes = 0;
  /// CUDA device of this rank; -1 means the current device.
  int device = -1;
  /// Bound of every GPU spin-wait and host poll, seconds. <= 0 means FLASHEP_TIMEOUT_S (default 100).
  double timeout_s = 0;
};

/// Inputs/outputs of get_dispatch_layout. n = num_tokens, K = num_topk, E = num_experts, R = ranks.
struct LayoutArgs {
  const int64_t* topk_idx = nullptr;  ///< [n, K] contiguous, -1 = empty slot
  int num_tokens = 0;
  int num_topk = 0;
  int num_experts = 0;
  int* num_tokens_per_rank = nullptr;       ///< out [R]
  int* num_tokens_per_rdma_rank = nullptr;  ///< out [R / nvl_domain_size], or nullptr (one node)
  int* num_tokens_per_expert = nullptr;     ///< out [E]
  bool* is_token_in_rank = nullptr;         ///< out [n, R]
};

/// Inputs/outputs of notify_dispatch (the count exchange before a non-cached dispatch).
struct NotifyDispatchArgs {
  const int* num_tokens_per_rank = nullptr;    ///< [R] tokens this rank sends to each rank
  const int* num_tokens_per_expert = nullptr;  ///< [E] (t,k) pairs of this rank per expert
  const bool* is_token_in_rank = nullptr;      ///< [n, R]
  int num_tokens = 0;
  int num_experts = 0;
  int expert_alignment = 1;
  /// > 0: worst-case mode, counts are not published to the host (no wait_recv_counts()).
  int num_worst_tokens = 0;
  int* rank_prefix_matrix = nullptr;          ///< out [R, R]
  int* channel_prefix_matrix = nullptr;       ///< out [R, C] (C = num_channels(config.num_sms, R))
  int* recv_channel_prefix_matrix = nullptr;  ///< out [R, C]
  Config config;
  /// Optional (hidden > 0): the rows of the dispatch that follows. Every call's opening barrier
  /// checks that all ranks make the same call (operation, config, num_experts) and fails with a
  /// clear error otherwise; with these it also checks the row shape (hidden, dtype, top-k).
  int hidden = 0;
  DType dtype = DType::kBFloat16;
  int num_topk = 0;
};

/// What the host learns from notify_dispatch.
struct RecvCounts {
  int num_recv_tokens = 0;
  std::vector<int> num_recv_tokens_per_expert;  ///< L entries, aligned to expert_alignment
};

/// Inputs/outputs of dispatch. Row i of the outputs is the token recv_src_idx[i] of source rank s,
/// where rows of s are [rank_prefix_matrix[s-1][rank], rank_prefix_matrix[s][rank]).
struct DispatchArgs {
  const void* x = nullptr;  ///< [n, H] bf16 or fp8 e4m3, contiguous rows
  DType dtype = DType::kBFloat16;
  int num_tokens = 0;
  int hidden = 0;
  const float* x_scales = nullptr;  ///< fp8 only: [n, H/128] with any strides (in elements)
  int64_t scale_token_stride = 0;
  int64_t scale_hidden_stride = 0;
  const int64_t* topk_idx = nullptr;    ///< [n, K] or nullptr (no top-k / cached)
  const float* topk_weights = nullptr;  ///< [n, K] or nullptr
  int num_topk = 0;
  int num_experts = 0;
  const bool* is_token_in_rank = nullptr;  ///< [n, R]
  const int* rank_prefix_matrix = nullptr;
  const int* channel_prefix_matrix = nullptr;
  const int* recv_channel_prefix_matrix = nullptr;
  /// Rows allocated in the outputs: num_recv_tokens, or num_worst_tokens in worst-case mode (the
  /// GPU checks that the real count fits and reports an error otherwise).
  int num_output_rows = 0;
  bool worst_case_mode = false;
  /// Cached mode: the layout comes from an earlier dispatch; recv_src_idx and send_head are not
  /// written, topk must be null.
  bool cached = false;
  void* recv_x = nullptr;                ///< out [rows, H]
  float* recv_x_scales = nullptr;        ///< out [rows, H/128] contiguous (fp8 only)
  int64_t* recv_topk_idx = nullptr;      ///< out [rows, K] local expert index or -1
  float* recv_topk_weights = nullptr;    ///< out [rows, K]
  int* recv_src_idx = nullptr;           ///< out [rows]
  int* send_head = nullptr;              ///< out [n, R] (ring slot of each sent token; see docs)
  Config config;
};

/// Inputs/outputs of combine (reverse of the dispatch whose handle fields are given).
struct CombineArgs {
  const void* x = nullptr;  ///< bf16 [num_recv_tokens, H] aligned with the dispatch output rows
  int num_recv_tokens = 0;
  int hidden = 0;
  const float* topk_weights = nullptr;  ///< [num_recv_tokens, K] or nullptr
  int num_topk = 0;
  const void* bias0 = nullptr;  ///< bf16 [n, H] or nullptr
  const void* bias1 = nullptr;  ///< bf16 [n, H] or nullptr
  const int* rank_prefix_matrix = nullptr;          ///< from the dispatch handle
  const int* channel_prefix_matrix = nullptr;       ///< from the dispatch handle
  const int* recv_channel_prefix_matrix = nullptr;  ///< from the dispatch handle
  const bool* is_token_in_rank = nullptr;           ///< [n, R] from the dispatch handle
  const int* send_head = nullptr;                   ///< [n, R] from the dispatch handle
  int num_tokens = 0;                               ///< n (tokens of this rank)
  void* combined_x = nullptr;                       ///< out bf16 [n, H]
  float* combined_topk_weights = nullptr;           ///< out [n, K] or nullptr
  Config config;
};

class BufferImpl;

class Buffer {
 public:
  /// Collective: allocates, exchanges IPC handles through `all_gather`, maps the peers.
  Buffer(const BufferOptions& options, const AllGatherFn& all_gather);
  /// Two-phase construction for bindings that cannot call back: construct, gather every rank's
  /// local_handle(), then connect() with all of them in rank order.
  explicit Buffer(const BufferOptions& options);
  std::vector<uint8_t> local_handle() const;
  void connect(const std::vector<std::vector<uint8_t>>& all_handles);
  bool is_available() const;

  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  /// Frees everything (idempotent). Not collective, but peers must have stopped using the buffer.
  void destroy();

  int rank() const;
  int num_ranks() const;
  int nvl_domain_size() const;
  int device() const;
  size_t num_nvl_bytes() const;
  size_t num_rdma_bytes() const;
  double timeout_s() const;
  /// A non-blocking stream owned by the buffer, for callers that have none of their own.
  cudaStream_t comm_stream() const;
  /// This rank's NVLink buffer (device pointer, num_nvl_bytes() bytes). Scratch space between calls.
  void* local_nvl_buffer() const;

  int num_channels(const Config& config) const;

  void get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);
  void notify_dispatch(const NotifyDispatchArgs& args, cudaStream_t stream);
  /// Bounded host poll for the counts of the last notify_dispatch (not in worst-case mode).
  RecvCounts wait_recv_counts();
  void dispatch(const DispatchArgs& args, cudaStream_t stream);
  void combine(const CombineArgs& args, cudaStream_t stream);

  /// Throws flashep::Error if a kernel of this buffer recorded a timeout or a device-side error.
  void check() const;

 private:
  std::unique_ptr<BufferImpl> impl_;
};

/// Element size in bytes of a DType.
inline int dtype_size(DType dtype) { return dtype == DType::kBFloat16 ? 2 : 1; }

}  // namespace flashep
