// Intranode high-throughput combine: the reverse of dispatch.
//
// Same grid and channels as dispatch. Per channel:
//   senders (one plain-copy warp per destination): push the expert-output rows this rank received
//          from that destination in that channel (contiguous in x, in dispatch order) back into
//          ring (channel, this rank) of the destination, each row with its top-k weights;
//   receivers (kCombineWorkers warps): token t of the channel is reduced by worker
//          (t - begin) % kCombineWorkers, which waits until every ring holding a row of t has it
//          (send_head gives the slot), sums bias0 + bias1 + rows of ranks ascending in float32 and
//          writes the bf16 result once.
// Ring slots are released in token order: worker 0 (the coordinator) publishes, per source ring,
// how many slots precede the oldest token any worker still needs (slots_before(send_head[J])).
//
// One warp per (channel, destination) rather than one bulk-copy warp per channel: every combine row
// has one destination, so a bulk sender keeps only its stages' bytes in flight, and a single warp
// serving every peer can be blocked behind one full ring while receivers, which free slots in
// token order, wait for a row queued behind it (ranks could then wait on each other in a cycle).
#include <cuda_bf16.h>

#include "core/handle.hpp"
#include "core/launch_policy.hpp"
#include "kernels/comm_utils.cuh"
#include "kernels/profile.cuh"

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

/// 16-byte loads in flight per sender lane (ptxas caps 640/768/1024-thread blocks at 96/80/64
/// registers). Measured at R = 4 (4 x H200, DeepEP workload): 8 -> 10 gained 3% at 24 SMs but lost
/// 10% at 12 (229 vs 255 GB/s), so 8 (4 rounds per 7168-wide row; 7 at 4).
template <int kMaxRanks>
inline constexpr int kWarpSenderUnroll = kMaxRanks <= 4 ? 8 : 4;

/// The failure record inline at its sites (failure.cuh, kInline) in the kernels of 4 and 8 ranks:
/// out of line it makes ptxas spill inside their hot loops (combine_kernel<8>: 48 B, reloaded in
/// the receivers' per-word loop; 768 or 1024 threads leave 80 or 64 registers). At 2 ranks out of
/// line made combine 3% faster (measured, 2026-12-01); at 16 inline spills (20 B) and out of line
/// does not (ptxas -v).
template <int kMaxRanks>
inline constexpr bool kInlineFailure = kMaxRanks == 4 || kMaxRanks == 8;

template <int kMaxRanks>
__device__ void combine_send(const CombineParams& p, int dst, int channel, int lane) {
  const DeviceComm& comm = p.comm;
  const IntranodeLayout& layout = comm.nvl.intranode;
  const int R = comm.nvl_size, C = p.num_channels;
  const RowRange rows =
      received_rows(p.rank_prefix_matrix, p.recv_channel_prefix_matrix, R, C, comm.nvl_rank, dst, channel);
  const int dst_rank = comm.node * R + dst;
  // The handle's matrices say which rows of x go to `dst`; a handle of another dispatch (or a
  // modified one) could point outside x. Checked before any row is read.
  if (!rows_inside(rows, p.num_recv_tokens)) {
    if (lane == 0)
      device::fail<kInlineFailure<kMaxRanks>>(comm, Phase::kCombineBadHandle, dst_rank, channel, p.num_recv_tokens,
                   static_cast<int>(rows.begin + rows.count));
    return;
  }
  const int count = static_cast<int>(rows.count);
  if (count == 0) return;
  const int slot_bytes = p.slot.slot_bytes;
  char* ring = at(comm.nvl_base[dst], layout.ring(channel, comm.nvl_rank, p.ring_depth, slot_bytes));
  int* remote_tail = int_at(comm.nvl_base[dst], layout.tail(channel, comm.nvl_rank));
  const int* local_head = int_at(comm.local(), layout.head(channel, dst));
  const int row_int4 = p.slot.row_bytes / 16;

  // No look at the abort word per chunk (it cost 1% of combine): after an abort this sender writes
  // at most one ring depth more, then its wait for space sees the abort.
  int published = 0, head = 0;
  for (int tail = 0; tail < count;) {
    if (tail - head >= p.ring_depth) {
      int ok = 1;
      if (lane == 0)
        ok = device::wait_reached<kInlineFailure<kMaxRanks>>(comm, local_head, tail - p.ring_depth + 1, Phase::kCombineSendWaitSpace, dst_rank,
                                  channel, &head);
      if (!__shfl_sync(0xffffffffu, ok, 0)) return;
      head = __shfl_sync(0xffffffffu, head, 0);
      // The receiver's reads of the freed slots, acquired by lane 0, come before every lane's
      // stores into them (__syncwarp carries the order; a shuffle does not).
      __syncwarp();
    }
    const int64_t row = rows.begin + tail;
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
  const DeviceComm& comm = p.comm;
  const int R = comm.nvl_size;
  int oldest = range.end;
  for (int w = 0; w < kCombineWorkers; ++w) oldest = min(oldest, positions[w]);
  if (lane < R) {
    const int head = oldest >= range.end ? state.total : slots_before(p.send_head[int64_t(oldest) * R + lane]);
    if (head > state.released) {
      device::st_release_sys(int_at(comm.nvl_base[lane], comm.nvl.intranode.head(channel, comm.nvl_rank)), head);
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
  const DeviceComm& comm = p.comm;
  const IntranodeLayout& layout = comm.nvl.intranode;
  const int R = comm.nvl_size, C = p.num_channels;
  const TokenRange range = channel_token_range(p.num_tokens, C, channel);
  const int slot_bytes = p.slot.slot_bytes;
  const bool coordinator = worker == 0;
  const int hidden_int4 = p.hidden / 8;

  ReleaseState state{0, 0};
  const int* my_tail = nullptr;
  if (lane < R) {
    state.total = static_cast<int>(sent_count(p.channel_prefix_matrix, C, lane, channel));
    my_tail = int_at(comm.local(), layout.tail(channel, lane));
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
    // The abort word is read every 64 spins, not before the first: a receiver reads only local
    // memory and writes only its outputs and the ring heads, and once any rank aborts, the senders
    // stop and the next wait here spins (reading it per token cost 1% of combine).
    const uint64_t start = device::global_timer_ns();
    for (uint32_t spins = 0;; ++spins) {
      const bool ready = !was_sent(head_slot) || device::ld_acquire_sys(my_tail) > head_slot;
      if (__all_sync(0xffffffffu, ready)) break;
      if (coordinator) release_heads(p, channel, range, positions, state, lane);
      if ((spins & 63) == 63) {
        int abort = 0, late = 0;
        if (lane == 0) {
          abort = device::abort_value(comm);
          late = device::global_timer_ns() - start > comm.timeout_ns;
        }
        abort = __shfl_sync(0xffffffffu, abort, 0);
        late = __shfl_sync(0xffffffffu, late, 0);
        if (abort != 0 || late) {
          const int peer = __ffs(__ballot_sync(0xffffffffu, !ready)) - 1;
          const int awaited = __shfl_sync(0xffffffffu, head_slot, peer) + 1;
          if (lane == 0 && !device::stop_if_aborted<kInlineFailure<kMaxRanks>>(comm, abort, Phase::kCombineRecvWaitData))
            device::fail<kInlineFailure<kMaxRanks>>(comm, Phase::kCombineRecvWaitData, comm.node * R + peer, channel, awaited, -1);
          return;
        }
      }
    }
    // Each lane acquired its own rank's tail; every lane reads every rank's row below.
    __syncwarp();
    clock.mark(0);  // waiting for rows (the coordinator releases meanwhile)

    // Rank r's row of t, as a 16-byte-word offset into our buffer (32 bits: registers are short
    // at 1024 threads per block), or kNoRow.
    constexpr uint32_t kNoRow = 0xffffffffu;
    const int4* buffer_words = reinterpret_cast<const int4*>(comm.local());
    uint32_t rows[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      const int slot_index = __shfl_sync(0xffffffffu, head_slot, r);
      rows[r] = (r < R && was_sent(slot_index))
                    ? static_cast<uint32_t>((layout.ring(channel, r, p.ring_depth, slot_bytes) +
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
      int abort = 0;
      if (lane == 0) {
        abort = device::abort_value(comm);
        if (abort == 0 && (spins & 63) == 63 && device::global_timer_ns() - start > comm.timeout_ns) {
          device::fail<kInlineFailure<kMaxRanks>>(comm, Phase::kCombineReleaseWait, -1, channel, range.end, -1);
          abort = comm.rank + 1;
        }
        device::stop_if_aborted<kInlineFailure<kMaxRanks>>(comm, abort, Phase::kCombineReleaseWait);
      }
      if (__shfl_sync(0xffffffffu, abort, 0) != 0) return;
    }
    // Every row of every ring was consumed, so every sender's final tail was seen: reset them.
    if (lane < R && state.total > 0) device::st_relaxed_sys(const_cast<int*>(my_tail), 0);
    clock.mark(2);  // final release
  }
}

template <int kMaxRanks>
__global__ void __launch_bounds__(combine_launch_bound(kMaxRanks), 1) combine_kernel(const __grid_constant__ CombineParams p) {
  __shared__ int positions[kMaxChannelsPerBlock * kCombineWorkers];
  if (device::aborted_at_entry<kInlineFailure<kMaxRanks>>(p.comm)) return;
  const int G = p.channels_per_block, R = p.comm.nvl_size;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < G * kCombineWorkers) {
    const int ch = blockIdx.x * G + threadIdx.x / kCombineWorkers;
    positions[threadIdx.x] = channel_token_range(p.num_tokens, p.num_channels, ch).begin;
  }
  __syncthreads();
  const int num_senders = combine_sender_warps(G, R);
  if (warp < num_senders) {  // senders first, then G * kCombineWorkers receivers
    combine_send<kMaxRanks>(p, warp % R, blockIdx.x * G + warp / R, lane);
  } else {
    const int role = warp - num_senders;
    const int sub = role / kCombineWorkers;
    combine_recv<kMaxRanks>(p, blockIdx.x * G + sub, role % kCombineWorkers, positions + sub * kCombineWorkers, lane);
  }
}

}  // namespace

cudaError_t launch_combine(const CombineParams& p, int num_sms, cudaStream_t stream) {
  const int R = p.comm.nvl_size;
  const int threads = combine_block_threads(p.channels_per_block, R);
  auto launch = [&](auto kernel) {
    kernel<<<num_sms, threads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  // The instantiation for the domain size (a test knob may pick a larger one).
  const int kernel_ranks = kernel_instance(R, p.kernel_ranks, threads, [](int k) { return combine_launch_bound(k); });
  if (kernel_ranks <= 2) return launch(combine_kernel<2>);
  if (kernel_ranks <= 4) return launch(combine_kernel<4>);
  if (kernel_ranks <= 8) return launch(combine_kernel<8>);
  return launch(combine_kernel<16>);
}

}  // namespace flashep::kernels
