// Intranode high-throughput dispatch.
//
// Grid: num_sms blocks; block b serves channels b*G .. b*G+G-1 (G = block_channel_count(R)). Per
// channel:
//   sender   : one warp with a pipeline of shared-memory stages (ring_sender.cuh) walks the
//              channel's tokens once; loads each routed token's row into a stage, adds its
//              scales, top-k (global expert ids) and index, and stores that slot image into the ring
//              (channel, this rank) of every rank the token goes to;
//   receivers: one warp per (channel, source) drains ring (channel, source) straight into the final
//              output rows with plain 16-byte loads and stores (local memory). Top-k ids become
//              local expert ids here; weights of other ranks' experts become 0.
// Output rows are ordered by source rank, then channel, then token (no sort), as the handle says.
#include "core/handle.hpp"
#include "core/launch_policy.hpp"
#include "kernels/profile.cuh"
#include "kernels/ring_sender.cuh"

namespace flashep::kernels {
namespace {

/// The routing of 32 consecutive tokens of a channel, one per lane.
struct TokenBatch {
  int base = 0;          // first token of the batch
  uint32_t pending = 0;  // tokens of the batch not taken yet that go to at least one rank
  uint32_t my_mask = 0;  // lane i: ranks token base+i goes to (bit r)
};

/// Sender policy of run_ring_sender: the tokens of one channel that go anywhere.
struct DispatchSendPolicy {
  const DispatchParams& p;
  TokenRange range;
  int lane;
  TokenBatch load_batch, send_batch;
  int load_token = -1;  // the token next_load moved to

  __device__ uint32_t routing_of(int t) const {
    uint32_t mask = 0;
    if (t < range.end) {
      const bool* row = p.is_token_in_rank + int64_t(t) * p.comm.nvl_size;
      for (int r = 0; r < p.comm.nvl_size; ++r) mask |= row[r] ? (1u << r) : 0u;
    }
    return mask;
  }
  /// Moves `batch` to the next batch with a routed token; false past the channel's end.
  __device__ bool refill(TokenBatch& batch) const {
    while (batch.pending == 0) {
      batch.base += 32;
      if (batch.base >= range.end) return false;
      batch.my_mask = routing_of(batch.base + lane);
      batch.pending = __ballot_sync(0xffffffffu, batch.my_mask != 0);
    }
    return true;
  }
  __device__ bool next_load() {
    if (!refill(load_batch)) return false;
    load_token = load_batch.base + __ffs(load_batch.pending) - 1;
    load_batch.pending &= load_batch.pending - 1;
    return true;
  }
  __device__ const void* load_row() const {
    return static_cast<const char*>(p.x) + int64_t(load_token) * p.slot.row_bytes;
  }
  __device__ void load_metadata(char* stage) const {
    const int64_t t = load_token;
    // Scales of any strides, one 4-byte cp.async per scale. Column-major scales (token-contiguous,
    // what DeepGEMM wants) gather from a different line per scale; measured on 2 x H200 this costs
    // nothing against row-major (the loads run ahead with the row's bulk load), while staging a
    // 32-token batch's scales with coalesced loads was 3% slower (docs/performance.md).
    float* scales = reinterpret_cast<float*>(stage + p.slot.scale_offset);
    for (int j = lane; j < p.slot.num_scales; j += 32)
      device::async_copy_small<4>(scales + j, p.x_scales + t * p.scale_token_stride + j * p.scale_hidden_stride);
    if (lane < p.num_topk) {
      device::async_copy_small<8>(stage + p.slot.topk_idx_offset + lane * 8, p.topk_idx + t * p.num_topk + lane);
      device::async_copy_small<4>(stage + p.slot.topk_weights_offset + lane * 4, p.topk_weights + t * p.num_topk + lane);
    }
    if (lane == 0) *reinterpret_cast<int*>(stage + p.slot.src_idx_offset) = static_cast<int>(t);
  }
  __device__ uint32_t next_send(int my_tail) {
    // Entering a batch records where each of its tokens lands (the handle's send_head), unrouted
    // ones included: combine needs, per token, the slots sent before it. my_tail is exact here:
    // every earlier token went out, and a batch with no routed token moves no tail. Bounded by the
    // channel's end: should the routing read here differ from what next_load read (the caller
    // changed is_token_in_rank during the call), the item goes nowhere instead of looping on.
    while (send_batch.pending == 0) {
      if (send_batch.base + 32 >= range.end) return 0u;
      enter_next_send_batch(my_tail);
    }
    const int j = __ffs(send_batch.pending) - 1;
    send_batch.pending &= send_batch.pending - 1;
    return __shfl_sync(0xffffffffu, send_batch.my_mask, j);
  }
  __device__ void enter_next_send_batch(int my_tail) {
    send_batch.base += 32;
    send_batch.my_mask = routing_of(send_batch.base + lane);
    send_batch.pending = __ballot_sync(0xffffffffu, send_batch.my_mask != 0);
    if (!p.cached) write_send_heads(my_tail);
  }
  /// After the last send: send_head of the batches past the last routed token.
  __device__ void finish(int my_tail) {
    while (send_batch.base + 32 < range.end) enter_next_send_batch(my_tail);
  }
  __device__ void write_send_heads(int my_tail) const {
    const int R = p.comm.nvl_size;
    const int t = send_batch.base + lane;
    for (int r = 0; r < R; ++r) {
      const bool routed = (send_batch.my_mask >> r) & 1u;
      const uint32_t to_r = __ballot_sync(0xffffffffu, routed);
      const int before = __shfl_sync(0xffffffffu, my_tail, r) + __popc(to_r & ((1u << lane) - 1u));
      if (t < range.end) p.send_head[int64_t(t) * R + r] = encode_send_head(routed, before);
    }
  }
};

__device__ void dispatch_send(const DispatchParams& p, const WarpStages& w, int channel, int lane) {
  const DeviceComm& comm = p.comm;
  const int R = comm.nvl_size;
  DispatchSendPolicy policy{p, channel_token_range(p.num_tokens, p.num_channels, channel), lane};
  policy.load_batch.base = policy.send_batch.base = policy.range.begin - 32;
  // Diagnostics: debug_skip & 4 aims every slot at our own buffer, & 2 stores only the metadata.
  const int skip = device::kDiagnostics ? p.debug_skip : 0;
  const RingSendTarget target = ring_send_target(comm, channel, p.ring_depth, p.slot.slot_bytes, lane, (skip & 4) != 0);
  const int store_offset = (skip & 2) ? p.slot.scale_offset : 0;
  const RingSendConfig cfg{R, p.ring_depth, p.chunk_tokens, p.slot.row_bytes, store_offset, p.publish_lag,
                           Phase::kDispatchSendWaitSpace, channel, comm.node * comm.nvl_size};
  RingSendLane state;
  device::PhaseClock clock(comm.profile, blockDim.x / 32, lane);
  if (run_ring_sender(policy, w, target, cfg, comm, state, clock, lane)) policy.finish(state.tail);
}

/// Threads of a dispatch block for domains of up to kMaxRanks ranks (its launch bound).
template <int kMaxRanks>
inline constexpr int kDispatchBlockThreads = dispatch_launch_bound(kMaxRanks);
/// 16-byte loads in flight per lane while a receiver copies a row (ring -> output, local memory).
/// A receiver is latency-bound (one warp per source ring), so it takes as much of a row per round
/// as the registers allow without spilling: 192 threads (R <= 2) leave 244 registers, 320 (R <= 4)
/// 168, 576 (R <= 8) 96; a 7168-wide BF16 row (28 words per lane) then takes 1, 2 or 3 rounds
/// (20 at R <= 4: 24 spilled).
template <int kMaxRanks>
inline constexpr int kRecvCopyUnroll = kMaxRanks <= 2 ? 32 : kMaxRanks <= 4 ? 20 : 10;

/// Receiver of ring (channel, src): copies every slot straight into its output row with plain
/// loads and stores (local memory, no shared memory needed, so there is one such warp per source),
/// releasing the slots after each batch.
template <int kMaxRanks>
__device__ void dispatch_recv(const DispatchParams& p, int src, int channel, int lane) {
  const DeviceComm& comm = p.comm;
  const IntranodeLayout& layout = comm.nvl.intranode;
  const int R = comm.nvl_size, C = p.num_channels;
  const RowRange rows =
      received_rows(p.rank_prefix_matrix, p.recv_channel_prefix_matrix, R, C, comm.nvl_rank, src, channel);
  const int src_rank = comm.node * R + src;
  // Every row written below lies inside the output: a handle with negative or decreasing prefix
  // entries, or more tokens than num_worst_tokens, is an error before anything is written.
  if (!rows_inside(rows, p.num_output_rows)) {
    if (lane == 0) {
      const bool too_many = !p.cached && rows.begin >= 0 && rows.count >= 0;
      if (too_many)
        device::fail(comm, Phase::kDispatchTooManyTokens, src_rank, channel, p.num_output_rows,
                     static_cast<int>(rows.begin + rows.count));
      else
        device::fail(comm, Phase::kDispatchBadHandle, src_rank, channel, p.num_output_rows,
                     static_cast<int>(rows.begin), static_cast<int>(rows.count));
    }
    return;
  }
  const int count = static_cast<int>(rows.count);
  if (count == 0) return;
  const int64_t out_begin = rows.begin;
  const int slot_bytes = p.slot.slot_bytes;
  const char* ring = at(comm.local(), layout.ring(channel, src, p.ring_depth, slot_bytes));
  int* local_tail = int_at(comm.local(), layout.tail(channel, src));
  int* remote_head = int_at(comm.nvl_base[src], layout.head(channel, comm.nvl_rank));
  const int row_int4 = p.slot.row_bytes / 16;
  const int num_local_experts = p.num_topk > 0 ? p.num_experts / R : 0;
  const bool copy_rows = !device::kDiagnostics || !(p.debug_skip & 1);
  device::PhaseClock clock(comm.profile, blockDim.x / 32, lane);

  for (int consumed = 0; consumed < count;) {
    int available = 0;
    int ok = 1;
    if (lane == 0)
      ok = device::wait_reached(comm, local_tail, consumed + 1, Phase::kDispatchRecvWaitData, src_rank, channel,
                                &available);
    if (!__shfl_sync(0xffffffffu, ok, 0)) return;
    available = __shfl_sync(0xffffffffu, available, 0);
    if (available > count) {
      // The sender sends more rows than this rank's handle expects: the ranks run a cached dispatch
      // with handles of different dispatches. Copying on would leave the ring's tail stale for the
      // next operation; stop with an error instead.
      if (lane == 0)
        device::fail(comm, Phase::kDispatchBadHandle, src_rank, channel, static_cast<int>(rows.begin + count),
                     static_cast<int>(rows.begin), available);
      return;
    }
    // Lane 0's acquire orders the slots' contents before its later reads; __syncwarp extends that
    // order to the other lanes (a shuffle alone carries no memory ordering).
    __syncwarp();
    clock.mark(0);  // waiting for the tail
    for (int i = consumed; i < available; ++i) {
      const char* slot = ring + int64_t(i % p.ring_depth) * slot_bytes;
      const int64_t row = out_begin + i;
      // Metadata loads first: their latency hides behind the row copy; stores after it.
      const float* slot_scales = reinterpret_cast<const float*>(slot + p.slot.scale_offset);
      float scale0 = 0.f, scale1 = 0.f;
      if (lane < p.slot.num_scales) scale0 = __ldcg(slot_scales + lane);
      if (lane + 32 < p.slot.num_scales) scale1 = __ldcg(slot_scales + lane + 32);
      int64_t expert = -1;
      float weight = 0.f;
      if (lane < p.num_topk) {
        expert = __ldcg(reinterpret_cast<const long long*>(slot + p.slot.topk_idx_offset) + lane);
        weight = __ldcg(reinterpret_cast<const float*>(slot + p.slot.topk_weights_offset) + lane);
      }
      const int src_idx = (!p.cached && lane == 0) ? __ldcg(reinterpret_cast<const int*>(slot + p.slot.src_idx_offset)) : 0;
      if (copy_rows)
        device::warp_copy<kRecvCopyUnroll<kMaxRanks>, true>(
            reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + row * p.slot.row_bytes),
            reinterpret_cast<const int4*>(slot), row_int4, lane);
      float* out_scales = p.recv_x_scales + row * p.slot.num_scales;
      if (lane < p.slot.num_scales) out_scales[lane] = scale0;
      if (lane + 32 < p.slot.num_scales) out_scales[lane + 32] = scale1;
      for (int j = lane + 64; j < p.slot.num_scales; j += 32) out_scales[j] = __ldcg(slot_scales + j);
      if (lane < p.num_topk) {
        // Senders ship global expert ids (checked in [-1, E) by notify_dispatch); experts of other
        // ranks read -1 here, with weight 0.
        const int local = local_expert_index(expert, comm.nvl_rank, num_local_experts);
        p.recv_topk_idx[row * p.num_topk + lane] = local;
        p.recv_topk_weights[row * p.num_topk + lane] = local >= 0 ? weight : 0.0f;
      }
      if (!p.cached && lane == 0) p.recv_src_idx[row] = src_idx;
      clock.count_item();
    }
    clock.mark(1);  // copying
    consumed = available;
    // Our loads of the released slots completed (their values were stored); release them.
    __syncwarp();
    if (lane == 0) device::st_release_sys(remote_head, consumed);
    clock.mark(2);  // releasing
  }
  // The sender published its final tail (== count) and writes no more: reset for the next operation.
  if (lane == 0) device::st_relaxed_sys(local_tail, 0);
}

template <int kMaxRanks>
__global__ void __launch_bounds__(kDispatchBlockThreads<kMaxRanks>, 1) dispatch_kernel(const __grid_constant__ DispatchParams p) {
  extern __shared__ __align__(128) char smem[];
  if (device::aborted_at_entry(p.comm)) return;
  const int G = p.channels_per_block, S = p.stages, R = p.comm.nvl_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp < G) {  // senders 0..G-1, then G * R receivers
    const int slot_bytes = p.slot.slot_bytes;
    uint64_t* barriers = reinterpret_cast<uint64_t*>(smem + int64_t(G) * S * slot_bytes);
    int* history = reinterpret_cast<int*>(barriers + G * S);
    WarpStages w{smem + int64_t(warp) * S * slot_bytes, barriers + warp * S, history + warp * kTailHistory * 32, S,
                 slot_bytes};
    if (lane < S) device::mbarrier_init(w.barriers + lane, kStageArrivals);
    device::fence_mbarrier_init();
    __syncwarp();
    dispatch_send(p, w, blockIdx.x * G + warp, lane);
  } else {
    const int role = warp - G;
    dispatch_recv<kMaxRanks>(p, role % R, blockIdx.x * G + role / R, lane);
  }
}

}  // namespace

cudaError_t launch_dispatch(const DispatchParams& p, int num_sms, cudaStream_t stream) {
  const int R = p.comm.nvl_size;
  const int smem = dispatch_smem_bytes(p.channels_per_block, p.stages, p.slot.slot_bytes);
  auto launch = [&](auto kernel) {
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (status != cudaSuccess) return status;
    kernel<<<num_sms, dispatch_block_threads(p.channels_per_block, R), smem, stream>>>(p);
    return cudaGetLastError();
  };
  // The instantiation for the domain size (a test knob may pick a larger one).
  const int kernel_ranks = kernel_instance(R, p.kernel_ranks, dispatch_block_threads(p.channels_per_block, R),
                                           [](int k) { return dispatch_launch_bound(k); });
  if (kernel_ranks <= 2) return launch(dispatch_kernel<2>);
  if (kernel_ranks <= 4) return launch(dispatch_kernel<4>);
  if (kernel_ranks <= 8) return launch(dispatch_kernel<8>);
  return launch(dispatch_kernel<16>);
}

}  // namespace flashep::kernels
