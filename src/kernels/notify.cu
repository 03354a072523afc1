// notify_dispatch: the count exchange before a dispatch; notify_barrier: the rendezvous before a
// combine or a cached dispatch. Both reset this rank's ring heads for the coming operation (tails
// are reset by their readers at the end of each operation; see layout_math.hpp).
#include "kernels/comm_utils.cuh"

namespace flashep::kernels {
namespace {

constexpr int kNotifyThreads = 1024;

/// Block-wide barrier across the ranks of the domain. Graph-safe: the epoch is device state that
/// every rank advances by one per barrier, so replays keep matching. With `info`, the barrier also
/// checks that every rank makes the same call (CallInfo): each rank's info travels with its signal
/// and every rank compares the peers' with its own. Returns false on timeout or disagreement.
__device__ bool barrier_across_ranks(const CommContext& comm, Phase phase, const CallInfo* info) {
  __shared__ int epoch;
  __shared__ int failed;
  __threadfence_system();  // this block's earlier writes to peers are visible before the signal
  __syncthreads();
  if (threadIdx.x == 0) {
    int* local_epoch = int_at(comm.local_buffer, comm.layout.barrier_epoch_offset);
    epoch = *local_epoch + 1;
    *local_epoch = epoch;
    failed = 0;
  }
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < comm.num_ranks) {
    const int* mine = reinterpret_cast<const int*>(info);
    if (info != nullptr) {  // ordered before the signal by its release
      int* remote_info = int_at(comm.peer_buffers[peer], comm.layout.call_info(epoch, comm.rank));
      for (int i = 0; i < kCallInfoInts; ++i) remote_info[i] = mine[i];
    }
    int* remote_signal = int_at(comm.peer_buffers[peer], comm.layout.barrier_signal_offset + 4 * comm.rank);
    device::st_release_sys(remote_signal, epoch);
    const int* my_signal = int_at(comm.local_buffer, comm.layout.barrier_signal_offset + 4 * peer);
    const device::WaitContext ctx = wait_context(comm);
    if (device::wait_at_least(ctx, my_signal, epoch, phase, peer, -1) < 0) {
      failed = 1;
    } else if (info != nullptr) {
      const int* theirs_at = int_at(comm.local_buffer, comm.layout.call_info(epoch, peer));
      int theirs[kCallInfoInts];
      for (int i = 0; i < kCallInfoInts; ++i) theirs[i] = device::ld_relaxed_sys(theirs_at + i);
      const int field = call_info_mismatch(mine, theirs);
      if (field >= 0) {
        device::record_error(ctx, Phase::kCallMismatch, peer, field, mine[field], theirs[field]);
        failed = 1;
      }
    }
  }
  __syncthreads();
  return failed == 0;
}

__device__ void reset_heads(const CommContext& comm, int num_channels) {
  int* heads = int_at(comm.local_buffer, comm.layout.head_offset);
  for (int i = threadIdx.x; i < num_channels * comm.num_ranks; i += blockDim.x) heads[i] = 0;
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(NotifyDispatchParams p) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks, C = p.num_channels;
  const int num_local_experts = p.num_experts / R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  extern __shared__ int channel_counts[];  // [R][C]

  // 1. All ranks finished the previous operation on this buffer: the notify slots and our heads
  //    are free to reuse.
  if (!barrier_across_ranks(comm, Phase::kNotifyBarrier, &p.call)) return;
  reset_heads(comm, C);

  // 2. Tokens this rank sends to each rank per channel (warp per (rank, channel) pair).
  for (int pair = warp; pair < R * C; pair += num_warps) {
    const int dst = pair / C, channel = pair % C;
    const TokenRange range = channel_token_range(p.num_tokens, C, channel);
    int count = 0;
    for (int t = range.begin + lane; t < range.end; t += 32) count += p.is_token_in_rank[int64_t(t) * R + dst];
    for (int offset = 16; offset > 0; offset /= 2) count += __shfl_xor_sync(0xffffffffu, count, offset);
    if (lane == 0) channel_counts[pair] = count;
  }
  __syncthreads();

  // 3. Inclusive prefix over channels; publish our row of counts, our channel prefix and our
  //    per-expert counts into each destination's notify slot for us.
  for (int dst = warp; dst < R; dst += num_warps) {
    int* slot = int_at(comm.peer_buffers[dst], comm.layout.notify_slot(comm.rank));
    int running = 0;
    for (int base = 0; base < C; base += 32) {
      const int c = base + lane;
      int v = c < C ? channel_counts[dst * C + c] : 0;
      for (int offset = 1; offset < 32; offset *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += other;
      }
      v += running;
      if (c < C) {
        p.channel_prefix_matrix[dst * C + c] = v;
        slot[R + c] = v;
      }
      running = __shfl_sync(0xffffffffu, v, 31);
    }
    for (int r = lane; r < R; r += 32) slot[r] = p.num_tokens_per_rank[r];
    for (int l = lane; l < num_local_experts; l += 32)
      slot[R + kMaxChannels + l] = p.num_tokens_per_expert[dst * num_local_experts + l];
  }

  // 4. Everyone's counts have landed.
  if (!barrier_across_ranks(comm, Phase::kNotifyBarrier, nullptr)) return;

  // 5. rank_prefix_matrix (same on every rank), our receive channel prefix, per-expert counts.
  auto slot_of = [&](int src) { return int_at(comm.local_buffer, comm.layout.notify_slot(src)); };
  for (int dst = threadIdx.x; dst < R; dst += blockDim.x) {
    int running = 0;
    for (int src = 0; src < R; ++src) {
      running += device::ld_relaxed_sys(slot_of(src) + dst);
      p.rank_prefix_matrix[src * R + dst] = running;
    }
  }
  for (int i = threadIdx.x; i < R * C; i += blockDim.x)
    p.recv_channel_prefix_matrix[i] = device::ld_relaxed_sys(slot_of(i / C) + R + i % C);
  if (p.mapped != nullptr) {
    for (int l = threadIdx.x; l < num_local_experts; l += blockDim.x) {
      int count = 0;
      for (int src = 0; src < R; ++src) count += device::ld_relaxed_sys(slot_of(src) + R + kMaxChannels + l);
      p.mapped->num_recv_tokens_per_expert[l] = ceil_div(count, p.expert_alignment) * p.expert_alignment;
    }
    if (threadIdx.x == 0) {
      int total = 0;
      for (int src = 0; src < R; ++src) total += device::ld_relaxed_sys(slot_of(src) + comm.rank);
      p.mapped->num_recv_tokens = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      p.mapped->seq = p.seq;
      __threadfence_system();
    }
  }
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_barrier_kernel(BarrierParams p) {
  if (!barrier_across_ranks(p.comm, Phase::kNotifyCombineBarrier, &p.call)) return;
  reset_heads(p.comm, p.num_channels);
}

}  // namespace

cudaError_t launch_notify_dispatch(const NotifyDispatchParams& p, cudaStream_t stream) {
  const size_t smem = sizeof(int) * p.comm.num_ranks * p.num_channels;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(notify_dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  notify_dispatch_kernel<<<1, kNotifyThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_notify_barrier(const BarrierParams& p, cudaStream_t stream) {
  notify_barrier_kernel<<<1, kNotifyThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
