// Intranode high-throughput dispatch.
//
// Grid: num_sms blocks (one per SM); block b serves channels b*G .. b*G+G-1 (G subchannels). Every
// block has one sender warp and one receiver warp per (peer, subchannel):
//   sender   (dst, channel): scans the channel's tokens, pushes those routed to dst into the ring
//            (channel, this rank) in dst's buffer over NVLink, publishing the ring tail every chunk;
//   receiver (src, channel): drains the ring (channel, src) in this rank's buffer straight into the
//            final output rows, then releases the slots by writing the head into src's buffer.
// Every warp works alone: no block-level synchronization, no shared memory.
#include "kernels/comm_utils.cuh"

namespace flashep::kernels {
namespace {

// 16-byte loads in flight per lane while copying a row (32 warps per SM: 64 registers per thread).
constexpr int kCopyUnroll = 4;

__device__ void dispatch_send(const DispatchParams& p, int dst, int channel, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks;
  const TokenRange range = channel_token_range(p.num_tokens, p.num_channels, channel);
  const int slot_bytes = p.slot.slot_bytes;
  // Diagnostics (debug_skip & 4): write rows into our own buffer instead of the peer's.
  char* ring = at((p.debug_skip & 4) ? comm.local_buffer : comm.peer_buffers[dst],
                  comm.layout.ring(channel, comm.rank, p.ring_depth, slot_bytes));
  int* remote_tail = reinterpret_cast<int*>(at(comm.peer_buffers[dst], comm.layout.tail(channel, comm.rank)));
  const int* local_head = reinterpret_cast<const int*>(at(comm.local_buffer, comm.layout.head(channel, dst)));
  const device::WaitContext ctx = wait_context(comm);
  const int num_local_experts = p.num_topk > 0 ? p.num_experts / R : 0;
  const int row_int4 = p.slot.row_bytes / 16;

  int tail = 0, published = 0, head = 0;
  auto publish = [&]() {
    __syncwarp();
    if (lane == 0) device::st_release_sys(remote_tail, tail);
    published = tail;
  };

  for (int base = range.begin; base < range.end; base += 32) {
    const int token = base + lane;
    const bool routed = token < range.end && p.is_token_in_rank[int64_t(token) * R + dst];
    uint32_t pending = __ballot_sync(0xffffffffu, routed);
    if (!p.cached && token < range.end) {
      const int before = tail + __popc(pending & ((1u << lane) - 1u));
      p.send_head[int64_t(token) * R + dst] = encode_send_head(routed, before);
    }
    while (pending != 0) {
      const int t = base + __ffs(pending) - 1;
      pending &= pending - 1;
      if (tail - head >= p.ring_depth) {
        // Ring full: publish what we wrote (the receiver may be waiting for it), then wait for space.
        if (published != tail) publish();
        int seen = 0;
        if (lane == 0)
          seen = device::wait_at_least(ctx, local_head, tail - p.ring_depth + 1, Phase::kDispatchSendWaitSpace, dst,
                                       channel);
        head = __shfl_sync(0xffffffffu, seen, 0);
        if (head < 0) return;
      }
      char* slot = ring + int64_t(tail % p.ring_depth) * slot_bytes;
      // Issue the metadata loads first: their latency then hides behind the row copy.
      float scale0 = 0.f, scale1 = 0.f;
      if (lane < p.slot.num_scales) scale0 = p.x_scales[t * p.scale_token_stride + lane * p.scale_hidden_stride];
      if (lane + 32 < p.slot.num_scales)
        scale1 = p.x_scales[t * p.scale_token_stride + (lane + 32) * p.scale_hidden_stride];
      int64_t expert = -1;
      float weight = 0.f;
      if (lane < p.num_topk) {
        expert = __ldg(p.topk_idx + int64_t(t) * p.num_topk + lane);
        weight = __ldg(p.topk_weights + int64_t(t) * p.num_topk + lane);
      }
      if (!(p.debug_skip & 2))
        device::warp_copy<kCopyUnroll, false>(reinterpret_cast<int4*>(slot),
                                              reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(t) * p.slot.row_bytes),
                                              row_int4, lane);
      float* slot_scales = reinterpret_cast<float*>(slot + p.slot.scale_offset);
      if (lane < p.slot.num_scales) slot_scales[lane] = scale0;
      if (lane + 32 < p.slot.num_scales) slot_scales[lane + 32] = scale1;
      for (int j = lane + 64; j < p.slot.num_scales; j += 32)  // hidden > 8192: rare, plain loop
        slot_scales[j] = p.x_scales[t * p.scale_token_stride + j * p.scale_hidden_stride];
      if (lane < p.num_topk) {
        const int local = local_expert_index(expert, dst, num_local_experts);
        reinterpret_cast<int*>(slot + p.slot.topk_idx_offset)[lane] = local;
        reinterpret_cast<float*>(slot + p.slot.topk_weights_offset)[lane] = local >= 0 ? weight : 0.0f;
      }
      if (lane == 0) *reinterpret_cast<int*>(slot + p.slot.src_idx_offset) = t;
      ++tail;
      if (tail - published >= p.chunk_tokens) publish();
    }
  }
  if (published != tail) publish();
}

__device__ void dispatch_recv(const DispatchParams& p, int src, int channel, int lane) {
  const CommContext& comm = p.comm;
  const int R = comm.num_ranks, C = p.num_channels;
  const int* channel_prefix = p.recv_channel_prefix_matrix + src * C;
  const int channel_begin = channel > 0 ? channel_prefix[channel - 1] : 0;
  const int count = channel_prefix[channel] - channel_begin;
  if (count == 0) return;
  const int out_begin = (src > 0 ? p.rank_prefix_matrix[(src - 1) * R + comm.rank] : 0) + channel_begin;
  const device::WaitContext ctx = wait_context(comm);
  if (out_begin + count > p.num_output_rows) {
    if (lane == 0)
      device::record_error(ctx, Phase::kDispatchTooManyTokens, src, channel, p.num_output_rows, out_begin + count);
    return;
  }
  const int slot_bytes = p.slot.slot_bytes;
  const char* ring = at(comm.local_buffer, comm.layout.ring(channel, src, p.ring_depth, slot_bytes));
  int* local_tail = reinterpret_cast<int*>(at(comm.local_buffer, comm.layout.tail(channel, src)));
  int* remote_head = reinterpret_cast<int*>(at(comm.peer_buffers[src], comm.layout.head(channel, comm.rank)));
  const int row_int4 = p.slot.row_bytes / 16;

  for (int consumed = 0; consumed < count;) {
    int available = 0;
    if (lane == 0)
      available = device::wait_at_least(ctx, local_tail, consumed + 1, Phase::kDispatchRecvWaitData, src, channel);
    available = __shfl_sync(0xffffffffu, available, 0);
    if (available < 0) return;
    available = min(available, count);
    for (int i = consumed; i < available; ++i) {
      const char* slot = ring + int64_t(i % p.ring_depth) * slot_bytes;
      const int64_t row = out_begin + i;
      // Metadata loads first (see dispatch_send), stores after the row copy.
      const float* slot_scales = reinterpret_cast<const float*>(slot + p.slot.scale_offset);
      float scale0 = 0.f, scale1 = 0.f;
      if (lane < p.slot.num_scales) scale0 = __ldcg(slot_scales + lane);
      if (lane + 32 < p.slot.num_scales) scale1 = __ldcg(slot_scales + lane + 32);
      int local = -1;
      float weight = 0.f;
      if (lane < p.num_topk) {
        local = __ldcg(reinterpret_cast<const int*>(slot + p.slot.topk_idx_offset) + lane);
        weight = __ldcg(reinterpret_cast<const float*>(slot + p.slot.topk_weights_offset) + lane);
      }
      const int src_idx = (!p.cached && lane == 0) ? __ldcg(reinterpret_cast<const int*>(slot + p.slot.src_idx_offset)) : 0;
      if (!(p.debug_skip & 1))
        device::warp_copy<kCopyUnroll, true>(reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + row * p.slot.row_bytes),
                                             reinterpret_cast<const int4*>(slot), row_int4, lane);
      float* out_scales = p.recv_x_scales + row * p.slot.num_scales;
      if (lane < p.slot.num_scales) out_scales[lane] = scale0;
      if (lane + 32 < p.slot.num_scales) out_scales[lane + 32] = scale1;
      for (int j = lane + 64; j < p.slot.num_scales; j += 32) out_scales[j] = __ldcg(slot_scales + j);
      if (lane < p.num_topk) {
        p.recv_topk_idx[row * p.num_topk + lane] = local;
        p.recv_topk_weights[row * p.num_topk + lane] = weight;
      }
      if (!p.cached && lane == 0) p.recv_src_idx[row] = src_idx;
    }
    consumed = available;
    // Our loads of the released slots completed (their values were stored); release them.
    __syncwarp();
    if (lane == 0) device::st_release_sys(remote_head, consumed);
  }
  // The sender published its final tail (== count) and writes no more: reset for the next operation.
  if (lane == 0) device::st_relaxed_sys(local_tail, 0);
}

__global__ void __launch_bounds__(1024, 1) dispatch_kernel(DispatchParams p) {
  const int R = p.comm.num_ranks;
  const int G = subchannels_for(R);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int role_warp = warp % (R * G);
  const int peer = role_warp % R;
  const int channel = blockIdx.x * G + role_warp / R;
  if (warp < R * G)
    dispatch_send(p, peer, channel, lane);
  else
    dispatch_recv(p, peer, channel, lane);
}

}  // namespace

cudaError_t launch_dispatch(const DispatchParams& p, int num_sms, cudaStream_t stream) {
  dispatch_kernel<<<num_sms, comm_block_threads(p.comm.num_ranks), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
