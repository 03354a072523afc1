// notify_dispatch: the checked count exchange before a dispatch; notify_barrier: the rendezvous
// before a combine or a cached dispatch. Both open with a barrier that checks that every rank makes
// the same call, and reset this rank's ring heads for the coming operation (tails are reset by
// their readers at the end of each operation; see layouts.hpp).
#include "kernels/comm_utils.cuh"

namespace flashep::kernels {
namespace {

constexpr int kNotifyThreads = 1024;

/// Block-wide barrier across the ranks of the NVLink domain. Graph-safe: the epoch is device state
/// that every rank advances by one per barrier, so replays keep matching; compared wrap-safe. With
/// `info`, the barrier also checks that every rank makes the same call (CallInfo): each rank's info
/// travels with its signal and every rank compares the peers' with its own. Returns false (every
/// thread) on timeout, abort or disagreement.
__device__ bool barrier_across_ranks(const DeviceComm& comm, Phase phase, const CallInfo* info) {
  __shared__ uint32_t epoch;
  __shared__ int failed;
  const ControlLayout& control = comm.nvl.control;
  __threadfence_system();  // this block's earlier writes to peers are visible before the signal
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* local_epoch = reinterpret_cast<uint32_t*>(comm.local() + control.barrier_epoch());
    epoch = *local_epoch + 1u;
    *local_epoch = epoch;
    failed = 0;
  }
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < comm.nvl_size) {
    const int* mine = reinterpret_cast<const int*>(info);
    if (info != nullptr) {  // ordered before the signal by its release
      int* remote_info = int_at(comm.nvl_base[peer], control.call_info(epoch, comm.nvl_rank));
      for (int i = 0; i < kCallInfoInts; ++i) remote_info[i] = mine[i];
    }
    device::st_release_sys(int_at(comm.nvl_base[peer], control.barrier_signal(comm.nvl_rank)), static_cast<int>(epoch));
    const int* my_signal = int_at(comm.local(), control.barrier_signal(peer));
    const int peer_rank = comm.node * comm.nvl_size + peer;
    const bool arrived = device::wait_reached(comm, my_signal, static_cast<int>(epoch), phase, peer_rank, -1);
    if (!arrived) failed = 1;
    // A peer that found the disagreement first may have aborted before this rank compared: when the
    // peer's signal (and so its info) is here, compare anyway, so that every rank names the
    // disagreement rather than only the abort.
    if (info != nullptr &&
        (arrived || seq_reached(static_cast<uint32_t>(device::ld_acquire_sys(my_signal)), epoch))) {
      const int* theirs_at = int_at(comm.local(), control.call_info(epoch, peer));
      int theirs[kCallInfoInts];
      for (int i = 0; i < kCallInfoInts; ++i) theirs[i] = device::ld_relaxed_sys(theirs_at + i);
      const int field = call_info_mismatch(mine, theirs);
      if (field >= 0) {
        device::fail(comm, Phase::kCallMismatch, peer_rank, field, mine[field], theirs[field]);
        failed = 1;
      }
    }
  }
  __syncthreads();
  return failed == 0;
}

__device__ void reset_heads(const DeviceComm& comm, int num_channels) {
  int* heads = int_at(comm.local(), comm.nvl.intranode.head_offset);
  for (int i = threadIdx.x; i < num_channels * comm.nvl_size; i += blockDim.x) heads[i] = 0;
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_dispatch_kernel(const __grid_constant__ NotifyDispatchParams p) {
  const DeviceComm& comm = p.comm;
  if (device::aborted_at_entry(comm)) return;
  const IntranodeLayout& layout = comm.nvl.intranode;
  const int R = comm.nvl_size, C = p.num_channels;
  const int num_local_experts = p.num_experts / R;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  extern __shared__ int shared_ints[];
  int* channel_counts = shared_ints;         // [R][C]
  int* expert_counts = shared_ints + R * C;  // [E] (with top-k)
  __shared__ int bad_input;

  // 1. All ranks finished the previous operation on this buffer: the notify slots and our heads
  //    are free to reuse.
  if (!barrier_across_ranks(comm, Phase::kNotifyBarrier, &p.call)) return;
  reset_heads(comm, C);
  if (threadIdx.x == 0) bad_input = 0;
  if (p.topk_idx != nullptr)
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) expert_counts[e] = 0;
  __syncthreads();

  // 2. Tokens this rank sends to each rank per channel (warp per (rank, channel) pair), and the
  //    (token, expert) pairs per expert, from the routing itself: the counts the caller passed are
  //    checked against them before anything reaches a peer (wrong counts would leave output rows
  //    unwritten, or make wrong per-expert counts, silently).
  for (int pair = warp; pair < R * C; pair += num_warps) {
    const int dst = pair / C, channel = pair % C;
    const TokenRange range = channel_token_range(p.num_tokens, C, channel);
    int count = 0;
    for (int t = range.begin + lane; t < range.end; t += 32) count += p.is_token_in_rank[int64_t(t) * R + dst];
    for (int offset = 16; offset > 0; offset /= 2) count += __shfl_xor_sync(0xffffffffu, count, offset);
    if (lane == 0) channel_counts[pair] = count;
  }
  if (p.topk_idx != nullptr) {
    const int64_t pairs = int64_t(p.num_tokens) * p.num_topk;
    for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
      const int64_t expert = p.topk_idx[i];
      if (expert < -1 || expert >= p.num_experts) {
        if (!bad_input)  // one record and one abort are enough (racy, but only the count of them varies)
          device::fail(comm, Phase::kDispatchInvalidExpert, p.num_experts, -1, static_cast<int>(i / p.num_topk),
                       static_cast<int>(expert));
        bad_input = 1;
      } else if (expert >= 0) {
        atomicAdd(&expert_counts[expert], 1);
      }
    }
  }
  __syncthreads();
  for (int dst = warp; dst < R; dst += num_warps) {
    int total = 0;
    for (int c = lane; c < C; c += 32) total += channel_counts[dst * C + c];
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (lane == 0 && total != p.num_tokens_per_rank[dst]) {
      device::fail(comm, Phase::kNotifyBadRankCount, dst, -1, total, p.num_tokens_per_rank[dst]);
      bad_input = 1;
    }
  }
  if (p.topk_idx != nullptr) {
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {
      if (expert_counts[e] != p.num_tokens_per_expert[e]) {
        device::fail(comm, Phase::kNotifyBadExpertCount, -1, e, expert_counts[e], p.num_tokens_per_expert[e]);
        bad_input = 1;
      }
    }
  }
  __syncthreads();
  if (bad_input) return;  // the abort stops the peers' second barrier

  // 3. Inclusive prefix over channels; publish our row of counts, our channel prefix and our
  //    per-expert counts into each destination's notify slot for us.
  for (int dst = warp; dst < R; dst += num_warps) {
    int* slot = int_at(comm.nvl_base[dst], layout.notify_slot(comm.nvl_rank));
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
  auto slot_of = [&](int src) { return int_at(comm.local(), layout.notify_slot(src)); };
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
      int64_t count = 0;
      for (int src = 0; src < R; ++src) count += device::ld_relaxed_sys(slot_of(src) + R + kMaxChannels + l);
      const int64_t aligned = aligned_count(count, p.expert_alignment);
      p.mapped->num_recv_tokens_per_expert[l] = aligned > INT32_MAX ? INT32_MAX : static_cast<int>(aligned);
    }
    if (threadIdx.x == 0) {
      int total = 0;
      for (int src = 0; src < R; ++src) total += device::ld_relaxed_sys(slot_of(src) + comm.nvl_rank);
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

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_barrier_kernel(const __grid_constant__ BarrierParams p) {
  if (device::aborted_at_entry(p.comm)) return;
  if (!barrier_across_ranks(p.comm, Phase::kNotifyCombineBarrier, &p.call)) return;
  reset_heads(p.comm, p.num_channels);
}

}  // namespace

/// Dynamic shared memory of notify_dispatch: channel counts [R][C] and, with top-k, expert counts [E].
static size_t notify_smem_bytes(const NotifyDispatchParams& p) {
  return sizeof(int) * (size_t(p.comm.nvl_size) * p.num_channels + (p.topk_idx != nullptr ? p.num_experts : 0));
}

cudaError_t launch_notify_dispatch(const NotifyDispatchParams& p, cudaStream_t stream) {
  const size_t smem = notify_smem_bytes(p);
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
