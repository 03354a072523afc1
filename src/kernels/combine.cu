// Intranode high-throughput combine: the reverse of dispatch.
//
// Same grid and channels as dispatch. Per channel:
//   sender (one warp, ring_sender.cuh): pushes the expert-output rows this rank received in that
//          channel back to their source ranks, each row with its top-k weights into ring
//          (channel, this rank) of the source. It takes the sources in turn, starting after its
//          own rank, so that at any moment the ranks write to different peers (no incast);
//   receivers (kCombineWorkers warps): token t of the channel is reduced by worker
//          (t - begin) % kCombineWorkers, which waits until every ring holding a row of t has it
//          (send_head gives the slot), sums bias0 + bias1 + rows of ranks ascending in float32 and
//          writes the bf16 result once.
// Ring slots are released in token order: worker 0 (the coordinator) publishes, per source ring,
// how many slots precede the oldest token any worker still needs (slots_before(send_head[J])).
#include <cuda_bf16.h>

#include "kernels/ring_sender.cuh"

namespace flashep::kernels {
namespace {


__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

__device__ __forceinline__ int4 to_bf16x8(const float (&acc)[8]) {
  int4 out;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return out;
}

/// The handle's matrices say which rows of x go to each rank; a handle of another dispatch (or a
/// modified one) could point past x. Checked before any row is read (lane 0 records the error).
__device__ __forceinline__ bool handle_rows_valid(const CombineParams& p, const device::WaitContext& ctx,
                                                  int64_t first_row, int count, int dst, int channel) {
  if (first_row >= 0 && count >= 0 && first_row + count <= p.num_recv_tokens) return true;
  if ((threadIdx.x % 32) == 0)
    device::record_error(ctx, Phase::kCombineBadHandle, dst, channel, p.num_recv_tokens,
                         static_cast<int>(first_row + count));
  return false;
}

/// Sender policy of run_ring_sender: the rows each source rank sent us in this channel (contiguous
/// in x), taken one per source in turn. Lane r tracks source r.
struct CombineSendPolicy {
  const CombineParams& p;
  int lane;
  int count = 0;      // lane r: rows of source r in this channel
  int64_t first_row = 0;  // lane r: row of x holding its first one
  int next_load_index = 0, next_send_index = 0;  // lane r: rows of source r loaded / sent
  int load_turn, send_turn;                      // source whose turn is next
  int64_t load_row_index = 0;                    // the row next_load moved to

  /// Source of the next item of a cursor (index per lane, turn shared); -1 when all are taken.
  __device__ int take(int& my_index, int& turn) const {
    const uint32_t left = __ballot_sync(0xffffffffu, lane < p.comm.num_ranks && my_index < count);
    if (left == 0) return -1;
    const uint32_t later = left & ~((1u << turn) - 1u);
    const int src = __ffs(later ? later : left) - 1;
    turn = src + 1 < p.comm.num_ranks ? src + 1 : 0;
    return src;
  }
  __device__ bool next_load() {
    const int src = take(next_load_index, load_turn);
    if (src < 0) return false;
    load_row_index = __shfl_sync(0xffffffffu, first_row + next_load_index, src);
    if (lane == src) ++next_load_index;
    return true;
  }
  __device__ const void* load_row() const {
    return static_cast<const char*>(p.x) + load_row_index * p.slot.row_bytes;
  }
  __device__ void load_metadata(char* stage) const {
    if (p.topk_weights != nullptr && lane < p.num_topk)
      device::async_copy_small<4>(stage + p.slot.topk_weights_offset + lane * 4,
                                  p.topk_weights + load_row_index * p.num_topk + lane);
  }
  __device__ uint32_t next_send(int /*my_tail*/) {
    const int src = take(next_send_index, send_turn);
    if (lane == src) ++next_send_index;
    return 1u << src;
  }
};

__device__ void combine_send(const CombineParams& p, const WarpStages& w, int channel, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks, C = p.num_channels;
  const int first_turn = comm.rank + 1 < R ? comm.rank + 1 : 0;
  CombineSendPolicy policy{p, lane};
  policy.load_turn = policy.send_turn = first_turn;
  if (lane < R) {
    const int* channel_prefix = p.recv_channel_prefix_matrix + lane * C;
    const int begin_in_rank = channel > 0 ? channel_prefix[channel - 1] : 0;
    policy.count = channel_prefix[channel] - begin_in_rank;
    policy.first_row = (lane > 0 ? p.rank_prefix_matrix[(lane - 1) * R + comm.rank] : 0) + begin_in_rank;
  }
  const bool rows_ok = lane >= R || (policy.first_row >= 0 && policy.count >= 0 &&
                                      policy.first_row + policy.count <= p.num_recv_tokens);
  const uint32_t bad = __ballot_sync(0xffffffffu, !rows_ok);
  if (bad != 0) {
    const int dst = __ffs(bad) - 1;
    if (lane == dst)
      device::record_error(wait_context(comm), Phase::kCombineBadHandle, dst, channel, p.num_recv_tokens,
                           static_cast<int>(policy.first_row + policy.count));
    return;
  }
  const RingSendTarget target = ring_send_target(comm, channel, p.ring_depth, p.slot.slot_bytes, lane);
  const RingSendConfig cfg{R, p.ring_depth, p.chunk_tokens, p.slot.row_bytes, /*store_offset=*/0, p.publish_lag,
                           Phase::kCombineSendWaitSpace, channel};
  RingSendLane state;
  device::PhaseClock clock(comm.profile, blockDim.x / 32, lane);
  run_ring_sender(policy, w, target, cfg, wait_context(comm), state, clock, lane);
}

/// The other sender (CombineParams::bulk_sender false): one warp per (channel, destination) copies
/// the rows with plain 16-byte loads and stores, no shared memory. Each row has one destination, so
/// the bulk sender keeps only a stage's worth of bytes in flight per row, while plain stores keep
/// as many in flight as the memory system accepts; which wins is measured (docs/performance.md).
/// 16-byte loads in flight per lane (ptxas caps 640/768/1024-thread blocks at 96/80/64 registers).
/// Measured at R = 4 (4 x H200, DeepEP workload): 8 -> 10 gained 3% at 24 SMs but lost 10% at 12
/// (229 vs 255 GB/s), so 8 (4 rounds per 7168-wide row; 7 at 4).
template <int kMaxRanks>
inline constexpr int kWarpSenderUnroll = kMaxRanks <= 4 ? 8 : 4;

template <int kMaxRanks>
__device__ void combine_send_warp(const CombineParams& p, int dst, int channel, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks, C = p.num_channels;
  const int* channel_prefix = p.recv_channel_prefix_matrix + dst * C;
  const int begin_in_rank = channel > 0 ? channel_prefix[channel - 1] : 0;
  const int count = channel_prefix[channel] - begin_in_rank;
  if (count == 0) return;
  const int64_t first_row = (dst > 0 ? p.rank_prefix_matrix[(dst - 1) * R + comm.rank] : 0) + begin_in_rank;
  const device::WaitContext ctx = wait_context(comm);
  if (!handle_rows_valid(p, ctx, first_row, count, dst, channel)) return;
  const int slot_bytes = p.slot.slot_bytes;
  char* ring = at(comm.peer_buffers[dst], comm.layout.ring(channel, comm.rank, p.ring_depth, slot_bytes));
  int* remote_tail = int_at(comm.peer_buffers[dst], comm.layout.tail(channel, comm.rank));
  const int* local_head = int_at(comm.local_buffer, comm.layout.head(channel, dst));
  const int row_int4 = p.slot.row_bytes / 16;

  int published = 0, head = 0;
  for (int tail = 0; tail < count;) {
    if (tail - head >= p.ring_depth) {
      int seen = 0;
      if (lane == 0)
        seen = device::wait_at_least(ctx, local_head, tail - p.ring_depth + 1, Phase::kCombineSendWaitSpace, dst,
                                     channel);
      head = __shfl_sync(0xffffffffu, seen, 0);
      if (head < 0) return;
    }
    const int64_t row = first_row + tail;
    char* slot = ring + int64_t(tail % p.ring_depth) * slot_bytes;
    device::warp_copy<kWarpSenderUnroll<kMaxRanks>, false>(
        reinterpret_cast<int4*>(slot),
        reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + row * p.slot.row_bytes), row_int4, lane);
    if (p.topk_weights != nullptr && lane < p.num_topk)
      reinterpret_cast<float*>(slot + p.slot.topk_weights_offset)[lane] = p.topk_weights[row * p.num_topk + lane];
    ++tail;
    if (tail - published >= p.chunk_tokens || tail == count || tail - head >= p.ring_depth) {
      __syncwarp();
      if (lane == 0) device::st_release_sys(remote_tail, tail);
      published = tail;
    }
  }
}

/// State of the coordinator lanes: lane r < R owns source ring r of this channel.
struct ReleaseState {
  int released;  // head value last published to rank `lane`
  int total;     // slots ring `lane` carries in this channel
};

/// Publishes ring heads up to the oldest token still in progress. Returns true when every worker of
/// the channel is done. Called by all lanes of the coordinator warp.
__device__ bool release_heads(const CombineParams& p, int channel, const TokenRange& range,
                              const volatile int* positions, ReleaseState& state, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks;
  int oldest = range.end;
  for (int w = 0; w < kCombineWorkers; ++w) oldest = min(oldest, positions[w]);
  if (lane < R) {
    const int head = oldest >= range.end ? state.total : slots_before(p.send_head[int64_t(oldest) * R + lane]);
    if (head > state.released) {
      device::st_release_sys(reinterpret_cast<int*>(at(comm.peer_buffers[lane], comm.layout.head(channel, comm.rank))),
                             head);
      state.released = head;
    }
  }
  return oldest >= range.end;
}

/// Hidden words a combine receiver lane reduces at once: ~8 row loads in flight at R <= 4.
template <int kMaxRanks>
inline constexpr int kCombineRecvUnroll = kMaxRanks <= 4 ? 2 : 1;

template <int kMaxRanks>
__device__ void combine_recv(const CombineParams& p, int channel, int worker, volatile int* positions, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks, C = p.num_channels;
  const TokenRange range = channel_token_range(p.num_tokens, C, channel);
  const int slot_bytes = p.slot.slot_bytes;
  const bool coordinator = worker == 0;
  const device::WaitContext ctx = wait_context(comm);
  const int hidden_int4 = p.hidden / 8;

  ReleaseState state{0, 0};
  const int* my_tail = nullptr;
  if (lane < R) {
    const int* prefix = p.channel_prefix_matrix + lane * C;
    state.total = prefix[channel] - (channel > 0 ? prefix[channel - 1] : 0);
    my_tail = reinterpret_cast<const int*>(at(comm.local_buffer, comm.layout.tail(channel, lane)));
  }

  device::PhaseClock clock(comm.profile, blockDim.x / 32, lane);
  for (int t = range.begin + worker; t < range.end; t += kCombineWorkers) {
    // Our reads of earlier tokens' ring rows are done (their values were used) before the
    // coordinator may see the new position and release those slots.
    __threadfence_block();
    if (lane == 0) positions[worker] = t;
    __syncwarp();
    const int head_slot = lane < R ? p.send_head[int64_t(t) * R + lane] : -1;
    // Wait until every ring holding a row of t has it; the coordinator keeps releasing meanwhile.
    const uint64_t start = device::global_timer_ns();
    for (uint32_t spins = 0;; ++spins) {
      const bool ready = head_slot < 0 || device::ld_acquire_sys(my_tail) > head_slot;
      if (__all_sync(0xffffffffu, ready)) break;
      if (coordinator) release_heads(p, channel, range, positions, state, lane);
      if ((spins & 63) == 63) {
        int failed = 0;
        if (lane == 0) {
          if (device::aborted(ctx)) {
            failed = 1;
          } else if (device::global_timer_ns() - start > ctx.timeout_ns) {
            failed = 1;
          }
        }
        failed = __shfl_sync(0xffffffffu, failed, 0);
        if (failed) {
          const int peer = __ffs(__ballot_sync(0xffffffffu, !ready)) - 1;
          const int awaited = __shfl_sync(0xffffffffu, head_slot, peer) + 1;
          if (lane == 0 && !device::aborted(ctx))
            device::record_error(ctx, Phase::kCombineRecvWaitData, peer, channel, awaited, -1);
          return;
        }
      }
    }
    clock.mark(0);  // waiting for rows (the coordinator releases meanwhile)

    // Rank r's row of t, as a 16-byte-word offset into our buffer (32 bits: registers are short
    // at 1024 threads per block), or kNoRow.
    constexpr uint32_t kNoRow = 0xffffffffu;
    const int4* buffer_words = static_cast<const int4*>(comm.local_buffer);
    uint32_t rows[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      const int slot_index = __shfl_sync(0xffffffffu, head_slot, r);
      rows[r] = (r < R && slot_index >= 0)
                    ? static_cast<uint32_t>((comm.layout.ring(channel, r, p.ring_depth, slot_bytes) +
                                             int64_t(slot_index % p.ring_depth) * slot_bytes) /
                                            16)
                    : kNoRow;
    }
    const int4* bias0 = p.bias0 ? reinterpret_cast<const int4*>(p.bias0) + int64_t(t) * hidden_int4 : nullptr;
    const int4* bias1 = p.bias1 ? reinterpret_cast<const int4*>(p.bias1) + int64_t(t) * hidden_int4 : nullptr;
    int4* out = reinterpret_cast<int4*>(p.combined_x) + int64_t(t) * hidden_int4;
    // Latency-bound, so loads go out together: kUnroll words of every rank at R <= 4, then one
    // word's sum at a time; at R > 4 one word, ranks in groups of four (registers are short). Sums
    // in the oracle's order: bias0, bias1, ranks ascending.
    constexpr int kUnroll = kCombineRecvUnroll<kMaxRanks>;
    constexpr int kRankGroup = kMaxRanks < 4 ? kMaxRanks : 4;
    static_assert(kUnroll == 1 || kRankGroup == kMaxRanks, "unrolled words need all ranks in one group");
    for (int base = lane; base < hidden_int4; base += kUnroll * 32) {
      float acc[8];
#pragma unroll
      for (int r0 = 0; r0 < kMaxRanks; r0 += kRankGroup) {
        int4 loaded[kUnroll][kRankGroup];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
#pragma unroll
          for (int r = 0; r < kRankGroup; ++r)
            if (base + u * 32 < hidden_int4 && rows[r0 + r] != kNoRow)
              loaded[u][r] = device::ld_ring(buffer_words + rows[r0 + r] + base + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32;
          if (i >= hidden_int4) break;
          if (r0 == 0) {
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[k] = 0.f;
            if (bias0) add_bf16x8(acc, device::ld_stream(bias0 + i));
            if (bias1) add_bf16x8(acc, device::ld_stream(bias1 + i));
          }
#pragma unroll
          for (int r = 0; r < kRankGroup; ++r)
            if (rows[r0 + r] != kNoRow) add_bf16x8(acc, loaded[u][r]);
          if (r0 + kRankGroup >= kMaxRanks) device::st_na(out + i, to_bf16x8(acc));
        }
      }
    }
    if (p.combined_topk_weights != nullptr && lane < p.num_topk) {
      float weight = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        if (rows[r] != kNoRow)
          weight += __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(buffer_words + rows[r]) +
                                                          p.slot.topk_weights_offset) + lane);
      p.combined_topk_weights[int64_t(t) * p.num_topk + lane] = weight;
    }
    __syncwarp();
    clock.mark(1);  // reducing
    clock.count_item();
  }
  __threadfence_block();
  if (lane == 0) positions[worker] = range.end;
  __syncwarp();

  if (coordinator) {
    const uint64_t start = device::global_timer_ns();
    for (uint32_t spins = 0; !release_heads(p, channel, range, positions, state, lane); ++spins) {
      if ((spins & 63) == 63 && lane == 0 && device::global_timer_ns() - start > ctx.timeout_ns) {
        device::record_error(ctx, Phase::kCombineReleaseWait, -1, channel, range.end, -1);
      }
      if (__shfl_sync(0xffffffffu, device::aborted(ctx) ? 1 : 0, 0)) return;
    }
    // Every row of every ring was consumed, so every sender's final tail was seen: reset them.
    if (lane < R && state.total > 0) device::st_relaxed_sys(const_cast<int*>(my_tail), 0);
    clock.mark(2);  // final release
  }
}

template <int kMaxRanks, bool kBulkSender>
__global__ void __launch_bounds__(combine_launch_bound(kMaxRanks, kBulkSender), 1)
    combine_kernel(CombineParams p) {
  extern __shared__ __align__(128) char smem[];
  __shared__ int positions[kMaxChannelsPerBlock * kCombineWorkers];
  const int G = p.channels_per_block, S = p.stages, R = p.comm.num_ranks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < G * kCombineWorkers) {
    const int ch = blockIdx.x * G + threadIdx.x / kCombineWorkers;
    positions[threadIdx.x] = channel_token_range(p.num_tokens, p.num_channels, ch).begin;
  }
  __syncthreads();
  const int num_senders = combine_sender_warps(G, R, kBulkSender);
  if (warp < num_senders) {  // senders first, then G * kCombineWorkers receivers
    if constexpr (kBulkSender) {
      const int slot_bytes = p.slot.slot_bytes;
      uint64_t* barriers = reinterpret_cast<uint64_t*>(smem + int64_t(G) * S * slot_bytes);
      int* history = reinterpret_cast<int*>(barriers + G * S);
      WarpStages w{smem + int64_t(warp) * S * slot_bytes, barriers + warp * S,
                   history + warp * kBulkTailHistory * 32, S, slot_bytes};
      if (lane < S) device::mbarrier_init(w.barriers + lane, kStageArrivals);
      device::fence_mbarrier_init();
      __syncwarp();
      combine_send(p, w, blockIdx.x * G + warp, lane);
    } else {
      combine_send_warp<kMaxRanks>(p, warp % R, blockIdx.x * G + warp / R, lane);
    }
  } else {
    const int role = warp - num_senders;
    const int sub = role / kCombineWorkers;
    combine_recv<kMaxRanks>(p, blockIdx.x * G + sub, role % kCombineWorkers, positions + sub * kCombineWorkers, lane);
  }
}

}  // namespace

cudaError_t launch_combine(const CombineParams& p, int num_sms, cudaStream_t stream) {
  const int R = p.comm.num_ranks;
  const int threads = combine_block_threads(p.channels_per_block, R, p.bulk_sender);
  const int smem = p.bulk_sender ? combine_smem_bytes(p.channels_per_block, p.stages, p.slot.slot_bytes) : 0;
  auto launch = [&](auto kernel) {
    cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (status != cudaSuccess) return status;
    kernel<<<num_sms, threads, smem, stream>>>(p);
    return cudaGetLastError();
  };
  // The instantiation for the domain size (a debug knob may pick a larger one).
  const bool bulk = p.bulk_sender;
  const int kernel_ranks =
      kernel_instance(R, p.kernel_ranks, threads, [bulk](int k) { return combine_launch_bound(k, bulk); });
  if (p.bulk_sender) {
    if (kernel_ranks <= 2) return launch(combine_kernel<2, true>);
    if (kernel_ranks <= 4) return launch(combine_kernel<4, true>);
    if (kernel_ranks <= 8) return launch(combine_kernel<8, true>);
    return launch(combine_kernel<16, true>);
  }
  if (kernel_ranks <= 2) return launch(combine_kernel<2, false>);
  if (kernel_ranks <= 4) return launch(combine_kernel<4, false>);
  if (kernel_ranks <= 8) return launch(combine_kernel<8, false>);
  return launch(combine_kernel<16, false>);
}

}  // namespace flashep::kernels
