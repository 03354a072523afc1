// Intranode high-throughput combine: the reverse of dispatch.
//
// Same grid and channels as dispatch. Per block, per subchannel:
//   sender (dst, channel): pushes the expert-output rows this rank received from dst in that channel
//          (contiguous rows, in dispatch order) into ring (channel, this rank) of dst;
//   receivers (R workers per channel): token t of the channel is reduced by worker (t - begin) % R,
//          which waits until every ring holding a row of t has it (send_head gives the slot), sums
//          bias0 + bias1 + rows of ranks ascending in float32 and writes the bf16 result once.
// Ring slots are released in token order: worker 0 (the coordinator) publishes, per source ring,
// how many slots precede the oldest token any worker still needs (slots_before(send_head[J])).
#include <cuda_bf16.h>

#include "kernels/comm_utils.cuh"

namespace flashep::kernels {
namespace {

constexpr int kCopyUnroll = 4;  // 16-byte loads in flight per lane (see dispatch.cu)
constexpr int kMaxRolesPerBlock = 16;  // R * subchannels_for(R) <= 16 for every supported R

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

__device__ void combine_send(const CombineParams& p, int dst, int channel, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks, C = p.num_channels;
  const int* channel_prefix = p.recv_channel_prefix_matrix + dst * C;
  const int begin_in_rank = channel > 0 ? channel_prefix[channel - 1] : 0;
  const int count = channel_prefix[channel] - begin_in_rank;
  if (count == 0) return;
  const int64_t first_row = (dst > 0 ? p.rank_prefix_matrix[(dst - 1) * R + comm.rank] : 0) + begin_in_rank;
  const int slot_bytes = p.slot.slot_bytes;
  char* ring = at(comm.peer_buffers[dst], comm.layout.ring(channel, comm.rank, p.ring_depth, slot_bytes));
  int* remote_tail = reinterpret_cast<int*>(at(comm.peer_buffers[dst], comm.layout.tail(channel, comm.rank)));
  const int* local_head = reinterpret_cast<const int*>(at(comm.local_buffer, comm.layout.head(channel, dst)));
  const device::WaitContext ctx = wait_context(comm);
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
    device::warp_copy<kCopyUnroll, false>(
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
  for (int w = 0; w < R; ++w) oldest = min(oldest, positions[w]);
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

  for (int t = range.begin + worker; t < range.end; t += R) {
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

    const int4* rows[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      const int slot_index = __shfl_sync(0xffffffffu, head_slot, r);
      rows[r] = (r < R && slot_index >= 0)
                    ? reinterpret_cast<const int4*>(at(comm.local_buffer,
                                                       comm.layout.ring(channel, r, p.ring_depth, slot_bytes) +
                                                           int64_t(slot_index % p.ring_depth) * slot_bytes))
                    : nullptr;
    }
    const int4* bias0 = p.bias0 ? reinterpret_cast<const int4*>(p.bias0) + int64_t(t) * hidden_int4 : nullptr;
    const int4* bias1 = p.bias1 ? reinterpret_cast<const int4*>(p.bias1) + int64_t(t) * hidden_int4 : nullptr;
    int4* out = reinterpret_cast<int4*>(p.combined_x) + int64_t(t) * hidden_int4;
    for (int i = lane; i < hidden_int4; i += 32) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (bias0) add_bf16x8(acc, device::ld_stream(bias0 + i));
      if (bias1) add_bf16x8(acc, device::ld_stream(bias1 + i));
      // Ranks ascending (the oracle's order); 64 registers per thread leave no room to hold all
      // R loads at once, the other 31 warps of the SM cover the latency.
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        if (rows[r]) add_bf16x8(acc, device::ld_ring(rows[r] + i));
      device::st_na(out + i, to_bf16x8(acc));
    }
    if (p.combined_topk_weights != nullptr && lane < p.num_topk) {
      float weight = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        if (rows[r])
          weight += __ldcg(reinterpret_cast<const float*>(reinterpret_cast<const char*>(rows[r]) +
                                                          p.slot.topk_weights_offset) + lane);
      p.combined_topk_weights[int64_t(t) * p.num_topk + lane] = weight;
    }
    __syncwarp();
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
  }
}

template <int kMaxRanks>
__global__ void __launch_bounds__(1024, 1) combine_kernel(CombineParams p) {
  __shared__ int positions[kMaxRolesPerBlock];
  const int R = p.comm.num_ranks;
  const int G = subchannels_for(R);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int role_warp = warp % (R * G);
  const int channel = blockIdx.x * G + role_warp / R;
  if (threadIdx.x < R * G) {
    const int ch = blockIdx.x * G + threadIdx.x / R;
    positions[threadIdx.x] = channel_token_range(p.num_tokens, p.num_channels, ch).begin;
  }
  __syncthreads();
  if (warp < R * G)
    combine_send(p, role_warp % R, channel, lane);
  else
    combine_recv<kMaxRanks>(p, channel, role_warp % R, positions + (role_warp / R) * R, lane);
}

}  // namespace

cudaError_t launch_combine(const CombineParams& p, int num_sms, cudaStream_t stream) {
  const int R = p.comm.num_ranks;
  const int threads = comm_block_threads(R);
  if (R <= 2)
    combine_kernel<2><<<num_sms, threads, 0, stream>>>(p);
  else if (R <= 4)
    combine_kernel<4><<<num_sms, threads, 0, stream>>>(p);
  else if (R <= 8)
    combine_kernel<8><<<num_sms, threads, 0, stream>>>(p);
  else
    combine_kernel<16><<<num_sms, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
