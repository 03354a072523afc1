// flashep: the torch-free C++ API of the expert-parallel communication buffer.
//
// One Buffer per rank (one process per GPU). Construction is collective: every rank creates its
// Buffer with the same sizes, then the ranks run the bootstrap (one or more rounds of an all-gather
// that the caller provides: torch.distributed, MPI, a file, a TCP store, anything). NVLink peers
// map each other's memory through CUDA IPC; peers in other NVLink domains are reached through
// NVSHMEM (built in with FLASHEP_WITH_NVSHMEM).
//
// All pointers are device pointers unless stated; every operation is enqueued on the stream given
// and returns without synchronizing, except wait_recv_counts() (a bounded host poll) and
// check_transports().
//
// The high-throughput dispatch of one call is:
//   get_dispatch_layout()              (optional: routing -> per-rank/per-expert counts)
//   notify_dispatch()                  (GPU checks and exchanges counts, fills the handle's prefix
//                                       matrices, writes the receive counts to host-mapped memory)
//   wait_recv_counts()                 (host polls those counts, bounded by the timeout)
//   ... caller allocates outputs of exactly num_recv_tokens rows ...
//   dispatch()
// With num_worst_tokens > 0 the caller skips wait_recv_counts() and allocates num_worst_tokens rows
// (CUDA-graph capturable). A cached dispatch reuses the handle of an earlier dispatch (no notify).
// combine() takes the handle of the dispatch it reverses.
//
// On a buffer that spans several NVLink domains, notify_dispatch / dispatch / combine run inside
// this rank's domain: ranks, experts, is_token_in_rank and the handle are those of the domain (M
// ranks, the domain's experts numbered from 0). They are the NVLink stage of the composed
// multi-node path (docs/design.md, "Multi-node: the first version"), which the Python package
// builds from them, internode_rail_exchange, the reordering and internode_rail_return (tested on 2
// GPUs as 2 nodes of 1).
//
// Errors (flashep/errors.hpp): bad arguments throw kInvalidArgument before anything is enqueued.
// A failure found later (a GPU wait past the timeout, bad input found on the GPU, ranks that
// disagree, a host poll past the timeout) aborts the buffer on every rank: the failing rank writes
// the abort word of every peer, every wait of every rank gives up at once, kernels stop writing to
// peers, and the next host call of each rank throws (kTimeout, kDeviceFault, kPeerMismatch, or
// kPeerFailed on the ranks that only saw the abort). The buffer is then poisoned (kPoisoned) and
// must be destroyed; a new Buffer works.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "flashep/config.hpp"
#include "flashep/errors.hpp"
#include "flashep/low_latency.hpp"

namespace flashep {

enum class DType : int {
  kBFloat16 = 0,    ///< 2 bytes
  kFloat8E4M3 = 1,  ///< 1 byte, with float32 scales per 128 channels
};

/// Element size in bytes of a DType.
inline int dtype_size(DType dtype) { return dtype == DType::kBFloat16 ? 2 : 1; }

/// Collective all-gather: `mine` (bytes bytes, the same count on every rank) from every rank into
/// `all` (num_ranks * bytes, rank order). Must be called by all ranks in the same order.
using AllGatherFn = std::function<void(const void* mine, size_t bytes, void* all)>;

struct BufferOptions {
  int rank = 0;
  int num_ranks = 1;
  /// Ranks per NVLink domain ("node"); 0 means FLASHEP_NVL_DOMAIN_SIZE, else min(num_ranks, 8). One
  /// host can run as several nodes (e.g. 2 GPUs as 2 nodes of 1). The intranode kernels need num_ranks == nvl_domain_size;
  /// the multi-node kernels are a later milestone.
  int nvl_domain_size = 0;
  /// Bytes of the intranode rings (Config::get_nvl_buffer_size_hint).
  size_t num_nvl_bytes = 0;
  /// Bytes of the NVSHMEM region, allocated when the buffer spans several NVLink domains. In
  /// low-latency mode: the bytes of the low-latency region (low_latency_region_bytes_hint).
  size_t num_rdma_bytes = 0;
  /// Low-latency (decode) mode: a region of num_rdma_bytes for low_latency_dispatch/combine. It
  /// lives in the NVLink allocation when every peer is reached directly, in the NVSHMEM symmetric
  /// heap when some peer is not (and in both when both kinds of peer exist).
  bool low_latency_mode = false;
  /// Low-latency mode: peers of the NVLink domain get direct stores (true) or NVSHMEM puts (false).
  bool allow_nvlink_for_low_latency = true;
  /// Low-latency mode: a peer that does not answer within the timeout is masked (and the call
  /// completes without it) instead of failing the call.
  bool enable_shrink = false;
  /// CUDA device of this rank; -1 means the current device.
  int device = -1;
  /// Bound of every GPU spin-wait and host poll, seconds. <= 0 means FLASHEP_TIMEOUT_S (default 100).
  double timeout_s = 0;
  /// Testing: the value the buffer's long-lived counters (barrier epoch, count sequence) start
  /// from, so tests can run calls across the point where they wrap. Same on every rank.
  uint32_t initial_counter = 0;
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

/// The intranode dispatch handle (DeepEP V1's tuple). The caller allocates the tensors; notify and
/// dispatch fill them; a cached dispatch and combine read them. The sizes and the buffer id are
/// checked at every use, so a handle of another buffer, another config or another shape is
/// rejected before anything is enqueued. (The contents live on the GPU; the kernels check that
/// every row they decode lies inside its tensor before touching it.)
struct DispatchHandle {
  int* rank_prefix_matrix = nullptr;          ///< [R, R]
  int* channel_prefix_matrix = nullptr;       ///< [R, C] (C = Buffer::num_channels(config))
  int* recv_channel_prefix_matrix = nullptr;  ///< [R, C]
  int* recv_src_idx = nullptr;                ///< [num_recv_tokens]
  const bool* is_token_in_rank = nullptr;     ///< [num_tokens, R]
  int* send_head = nullptr;                   ///< [num_tokens, R]
  int num_ranks = 0;
  int num_channels = 0;
  int num_tokens = 0;       ///< n of the dispatch (tokens of this rank)
  int num_recv_tokens = 0;  ///< rows of the dispatch output (num_worst_tokens in worst-case mode)
  uint64_t buffer_id = 0;   ///< Buffer::id() of the buffer that made it (set by notify_dispatch)
};

/// Inputs/outputs of notify_dispatch (the count exchange before a non-cached dispatch).
struct NotifyDispatchArgs {
  const int* num_tokens_per_rank = nullptr;    ///< [R] tokens this rank sends to each rank
  const int* num_tokens_per_expert = nullptr;  ///< [E] (t,k) pairs of this rank per expert
  /// [n, K] when num_topk > 0: the GPU checks num_tokens_per_expert and every id against it.
  const int64_t* topk_idx = nullptr;
  int num_tokens = 0;
  int num_experts = 0;
  int expert_alignment = 1;  ///< in [1, kMaxExpertAlignment]
  /// > 0: worst-case mode, counts are not published to the host (no wait_recv_counts()).
  int num_worst_tokens = 0;
  /// The rows of the dispatch that follows: every rank's call check compares them, and dispatch()
  /// refuses other ones. num_topk 0 = a dispatch without top-k.
  int hidden = 0;
  DType dtype = DType::kBFloat16;
  int num_topk = 0;
  Config config;
  /// in: is_token_in_rank [n, R] and the three prefix matrices allocated; out: the matrices, the
  /// sizes and the buffer id.
  DispatchHandle* handle = nullptr;
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
  /// Rows allocated in the outputs: num_recv_tokens, or num_worst_tokens in worst-case mode (the
  /// GPU checks that the real count fits and reports an error otherwise).
  int num_output_rows = 0;
  bool worst_case_mode = false;
  /// Cached mode: `handle` comes from an earlier dispatch and is only read; no top-k.
  bool cached = false;
  /// Fresh: the handle notify_dispatch filled (recv_src_idx [num_output_rows] and send_head [n, R]
  /// allocated; written here). Cached: an earlier dispatch's handle.
  DispatchHandle* handle = nullptr;
  void* recv_x = nullptr;                ///< out [rows, H]
  float* recv_x_scales = nullptr;        ///< out [rows, H/128] contiguous (fp8 only)
  int64_t* recv_topk_idx = nullptr;      ///< out [rows, K] local expert index or -1
  float* recv_topk_weights = nullptr;    ///< out [rows, K]
  Config config;
};

/// Inputs/outputs of combine (reverse of the dispatch whose handle is given).
struct CombineArgs {
  const void* x = nullptr;  ///< bf16 [handle->num_recv_tokens, H] aligned with the dispatch output rows
  int hidden = 0;
  const float* topk_weights = nullptr;  ///< [num_recv_tokens, K] or nullptr
  int num_topk = 0;
  const void* bias0 = nullptr;  ///< bf16 [n, H] or nullptr
  const void* bias1 = nullptr;  ///< bf16 [n, H] or nullptr
  const DispatchHandle* handle = nullptr;
  void* combined_x = nullptr;              ///< out bf16 [n, H]
  float* combined_topk_weights = nullptr;  ///< out [n, K] or nullptr
  Config config;
};

/// The first stage of the multi-node dispatch (docs/design.md, "Multi-node: the first version"):
/// every token once per destination node to the rank with the same local index there (its rail
/// peer, over NVSHMEM), laid out on arrival as the NVLink stage's input: source node a's tokens at
/// rows [a * T, a * T + count_a) in token order (T = max_tokens), the other rows going nowhere, so
/// the NVLink stage always sees N * T rows. Exposed for its tests until the multi-node dispatch
/// calls it. Needs several NVLink
/// domains and an NVSHMEM region of at least internode_rail_bytes(). Tested on 2 GPUs as 2 nodes of 1.
struct RailExchangeArgs {
  const void* x = nullptr;  ///< [n, H] contiguous rows: bf16, or fp8 e4m3 with x_scales
  DType dtype = DType::kBFloat16;
  int hidden = 0;
  const float* x_scales = nullptr;  ///< fp8: [n, H/128] of any strides
  int64_t scale_token_stride = 0, scale_hidden_stride = 0;
  const int64_t* topk_idx = nullptr;      ///< [n, K], -1 = empty slot (K = 0: none)
  const float* topk_weights = nullptr;    ///< [n, K] or nullptr
  int num_topk = 0;
  int num_experts = 0;                    ///< E (a multiple of the world size)
  const bool* is_token_in_rank = nullptr; ///< [n, R]
  int num_tokens = 0;
  int max_tokens = 0;   ///< the bound of num_tokens on every rank (the same everywhere): sizes the inbox
  int* rail_slot = nullptr;   ///< scratch [n, N]
  int* rail_count = nullptr;  ///< scratch [N]
  /// Outputs of F = N * max_tokens rows (see above; rows that go nowhere get an empty local mask,
  /// top-k ids -1 and source -1, their x rows are not written).
  void* fwd_x = nullptr;                 ///< [F, H]
  float* fwd_scales = nullptr;           ///< fp8: [F, H/128] row-major
  int64_t* fwd_topk_idx = nullptr;       ///< [F, K]: this node's experts numbered from 0, others -1
  float* fwd_topk_weights = nullptr;     ///< [F, K] or nullptr
  bool* fwd_in_rank = nullptr;           ///< [F, M]: the token's ranks on this node
  int* fwd_source = nullptr;             ///< [F, 2]: source node, source token
  int* fwd_counts = nullptr;             ///< [N]: tokens from each source node
  int num_sms = 0;                       ///< blocks of the send and receive kernels (0: the device's SMs)
};

/// The reordering of the composed multi-node dispatch: the NVLink stage delivers a receiver's rows
/// by forwarder, then source node, then token; the contract wants them by global source rank, then
/// token. The plan gives every row its final place and the receive prefix over global source ranks
/// (DeepEP's recv_gbl_rank_prefix_sum); the copy moves rows either way. Tested on 2 GPUs as 2 nodes of 1.
struct InternodeReorderPlanArgs {
  const int* rank_prefix_matrix = nullptr;  ///< [M, M] of the NVLink stage's handle
  const int* recv_src_idx = nullptr;        ///< [rows] of the NVLink stage's handle
  int max_tokens = 0;                       ///< T of the rail stage
  int rows = 0;                             ///< rows of the NVLink stage's output
  int* final_row = nullptr;                 ///< out [rows] (-1 past the real rows)
  int* recv_gbl_rank_prefix_sum = nullptr;  ///< out [R]
};
struct InternodeReorderCopyArgs {
  const int* final_row = nullptr;  ///< [rows] (plan)
  int rows = 0;
  int hidden = 0;
  DType dtype = DType::kBFloat16;
  int num_topk = 0;
  bool forward = true;  ///< NVLink order -> contract order (dispatch), else back (before combine)
  const void* src_x = nullptr;
  void* dst_x = nullptr;
  const float* src_scales = nullptr;  ///< fp8: [rows, H/128] row-major
  float* dst_scales = nullptr;
  const int64_t* src_topk_idx = nullptr;  ///< [rows, K] or nullptr
  int64_t* dst_topk_idx = nullptr;
  const float* src_topk_weights = nullptr;  ///< [rows, K] or nullptr
  float* dst_topk_weights = nullptr;
};

/// The combine's rail stage: each forwarder sends every forwarded token's combined row (and
/// weights) back to its source, and each source adds what its tokens' destination nodes returned
/// (float32, ascending node) with the biases. Collective. Tested on 2 GPUs as 2 nodes of 1.
struct RailReturnArgs {
  // forwarder side
  const void* combined_x = nullptr;         ///< [N * T, H] bf16, the NVLink stage's combine output
  const float* combined_weights = nullptr;  ///< [N * T, K] or nullptr
  const int* fwd_counts = nullptr;          ///< [N] of the dispatch's rail exchange
  // source side
  const int* rail_slot = nullptr;           ///< [n, N] of the dispatch's rail exchange
  int num_tokens = 0;
  const void* bias0 = nullptr;              ///< [n, H] bf16 or nullptr
  const void* bias1 = nullptr;
  void* out_x = nullptr;                    ///< out [n, H] bf16
  float* out_weights = nullptr;             ///< out [n, K] or nullptr
  int hidden = 0;
  int num_topk = 0;
  /// The dispatch's rail exchange (they size the rail region): T, dtype, top-k (num_topk is 0 or this).
  int max_tokens = 0;
  DType dispatch_dtype = DType::kBFloat16;
  int dispatch_num_topk = 0;
  int num_sms = 0;
};

/// How this rank reaches a peer.
enum class PeerTransport : int {
  kSelf = 0,
  kNvlink = 1,   ///< same NVLink domain: loads and stores through CUDA IPC mappings
  kNvshmem = 2,  ///< another NVLink domain: NVSHMEM puts and signals
};

/// One peer's result of Buffer::check_transports().
struct PeerCheck {
  int peer = 0;
  PeerTransport transport = PeerTransport::kSelf;
  /// 32-bit words that arrived wrong: 0 = the exchange worked; -1 = not checked (a peer of another
  /// NVLink domain while the buffer has no NVSHMEM region, num_rdma_bytes 0).
  int64_t mismatched_words = 0;
};

class BufferImpl;

class Buffer {
 public:
  /// Collective: allocates, runs the bootstrap rounds through `all_gather`, maps the peers.
  Buffer(const BufferOptions& options, const AllGatherFn& all_gather);
  /// Bootstrap in steps, for bindings that cannot call back: construct, then repeat
  ///   all = all-gather(bootstrap_message()) ; done = bootstrap_receive(all)
  /// until done (every rank gets the same answer in the same round).
  explicit Buffer(const BufferOptions& options);
  std::vector<uint8_t> bootstrap_message() const;
  bool bootstrap_receive(const std::vector<std::vector<uint8_t>>& all_messages);
  bool is_available() const;

  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  /// Frees everything (idempotent). `collective` (every rank calls it, e.g. after a barrier) also
  /// frees the NVSHMEM region, which needs all ranks; otherwise that region is left to the process'
  /// end. Peers must have stopped using the buffer.
  void destroy(bool collective = false);

  int rank() const;
  int num_ranks() const;
  int nvl_domain_size() const;
  int device() const;
  size_t num_nvl_bytes() const;
  size_t num_rdma_bytes() const;
  double timeout_s() const;
  /// A process-unique id of this buffer (handles remember it).
  uint64_t id() const;
  /// A non-blocking stream owned by the buffer, for callers that have none of their own.
  cudaStream_t comm_stream() const;
  /// This rank's NVLink buffer (device pointer, num_nvl_bytes() bytes). Scratch space between calls.
  void* local_nvl_buffer() const;
  /// How this rank reaches `peer`.
  PeerTransport peer_transport(int peer) const;
  /// Whether this build has the NVSHMEM transport (FLASHEP_WITH_NVSHMEM).
  static bool nvshmem_built();

  int num_channels(const Config& config) const;

  void get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);
  void notify_dispatch(const NotifyDispatchArgs& args, cudaStream_t stream);
  /// Bounded host poll for the counts of the last notify_dispatch (not in worst-case mode).
  RecvCounts wait_recv_counts();
  void dispatch(const DispatchArgs& args, cudaStream_t stream);
  void combine(const CombineArgs& args, cudaStream_t stream);

  // ---- low-latency mode (flashep/low_latency.hpp) --------------------------------------------------
  /// Enqueues the phases `args.phases` of a low-latency dispatch; checks everything it can on the
  /// host first (kInvalidArgument). Expert ids are checked on the GPU before anything is sent.
  void low_latency_dispatch(const LowLatencyDispatchArgs& args, cudaStream_t stream);
  void low_latency_combine(const LowLatencyCombineArgs& args, cudaStream_t stream);
  /// bf16 [L, R*T, H] region the next low_latency_combine with zero_copy reads (device pointer).
  void* low_latency_combine_buffer(const LowLatencyHandle& handle) const;
  /// Resets the low-latency signals and sequence numbers (not the mask). Every rank must call it
  /// with no low-latency call in flight anywhere, between two barriers of the caller's.
  void clean_low_latency_buffer(cudaStream_t stream);
  /// Shrink mode: sets (or clears) the mask of `rank` on this rank; copies the mask (int32 [R],
  /// device memory) out; clears every mask.
  void low_latency_update_mask(int rank, bool mask, cudaStream_t stream);
  void low_latency_query_mask(int* mask_out, cudaStream_t stream) const;
  void low_latency_clean_mask(cudaStream_t stream);

  /// Collective diagnostic: every rank sends `bytes_per_peer` bytes (a multiple of 16) of a pattern
  /// to every peer through the transport chosen for it, with a signal, waits for the peers' (bounded)
  /// and checks what arrived. Uses the NVLink rings (NVLink peers) and the RDMA region (NVSHMEM
  /// peers) as scratch: no other operation may be in flight, on any rank, until every rank's check
  /// has returned (a barrier of the caller's). Resets the multi-node rail stage's state.
  /// Synchronizes.
  std::vector<PeerCheck> check_transports(size_t bytes_per_peer);
  /// Benchmark diagnostic: puts the last `bytes` (a multiple of 16, at most num_rdma_bytes / 2) of
  /// this rank's NVSHMEM region into the same range of `peer`'s, with `num_blocks` blocks, then
  /// quiets (enqueued on `stream`; time it with events). What NVSHMEM alone carries to `peer`. The
  /// range's content is not kept (the modes' flags and state, at the region's start, are): run it
  /// with no call of this buffer in flight on this rank or `peer`.
  void probe_put_bandwidth(int peer, size_t bytes, int num_blocks, cudaStream_t stream);

  /// The multi-node rail stage (RailExchangeArgs). Collective: every rank calls it.
  void internode_rail_exchange(const RailExchangeArgs& args, cudaStream_t stream);
  void internode_reorder_plan(const InternodeReorderPlanArgs& args, cudaStream_t stream);
  void internode_reorder_copy(const InternodeReorderCopyArgs& args, cudaStream_t stream);
  void internode_rail_return(const RailReturnArgs& args, cudaStream_t stream);
  /// Bytes of the NVSHMEM region the rail stage needs (num_rdma_bytes must be at least this).
  static size_t internode_rail_bytes(int num_ranks, int nvl_domain_size, int max_tokens, int hidden, DType dtype,
                                     int num_topk);

  /// Throws if a kernel of this buffer recorded an error (or the buffer is poisoned).
  void check() const;

 private:
  std::unique_ptr<BufferImpl> impl_;
};

}  // namespace flashep
