// The multi-node rail stage (src/kernels/rail_launch.hpp has the contract; the wire and the region
// are in src/core/internode_compose.hpp). The first multi-node version (docs/design.md) runs it in
// front of the single-node dispatch; tested on 2 GPUs as 2 nodes of 1 (2026-11-30).
//
// Every token crosses the network once per destination node, to the rank with the same local index
// there (its rail peer). The message is the same for every node (row, scales, global top-k ids and
// weights, the token's row of is_token_in_rank as bits), so it is staged once in our symmetric
// region and put once per node. The counts go out first, each message carries its own flag (the
// put's signal), and the receiver waits per message: no sender waits for its last block before
// signalling (the low-latency mode's protocol, docs/design.md).
#include <cuda_bf16.h>

#include <climits>

#include "core/low_latency_layout.hpp"  // the signal encoding: seq << 32 | valid | count
#include "kernels/peer_transport.cuh"
#include "kernels/rail_launch.hpp"

namespace flashep::kernels {
namespace {

__device__ __forceinline__ RailState* rail_state(const DeviceComm& c, const RailRegion& g) {
  return reinterpret_cast<RailState*>(c.sym_base + g.state_offset);
}

/// One thread: `value` into `peer`'s 64-bit word at `offset` of the symmetric region (ours when
/// `peer` is this rank: a release store).
__device__ __forceinline__ void rail_signal(const DeviceComm& c, int peer, int64_t offset, uint64_t value) {
  if (peer == c.rank) {
    device::st_release_sys_u64(reinterpret_cast<uint64_t*>(c.sym_base + offset), value);
    return;
  }
#if FLASHEP_WITH_NVSHMEM
  nvshmemx_signal_op(reinterpret_cast<uint64_t*>(c.sym_base + offset), value, NVSHMEM_SIGNAL_SET, peer);
#endif
}

/// One thread: the 16-byte check block {hash} into `peer`'s symmetric region at `check_offset`,
/// then `value` into its word at `signal_offset`, ordered after the block (a release store for
/// ourselves; one put-with-signal from our staged copy at `stage_offset` otherwise).
__device__ __forceinline__ void rail_check_and_signal(const DeviceComm& c, int peer, int64_t stage_offset,
                                                      int64_t check_offset, int64_t signal_offset, uint32_t hash,
                                                      uint64_t value) {
  if (peer == c.rank) {
    *reinterpret_cast<int4*>(c.sym_base + check_offset) = make_int4(static_cast<int>(hash), 0, 0, 0);
    device::st_release_sys_u64(reinterpret_cast<uint64_t*>(c.sym_base + signal_offset), value);
    return;
  }
  *reinterpret_cast<int4*>(c.sym_base + stage_offset) = make_int4(static_cast<int>(hash), 0, 0, 0);
#if FLASHEP_WITH_NVSHMEM
  nvshmem_putmem_signal_nbi(c.sym_base + check_offset, c.sym_base + stage_offset, 16,
                            reinterpret_cast<uint64_t*>(c.sym_base + signal_offset), value, NVSHMEM_SIGNAL_SET, peer);
#endif
}

/// One thread: spins until our word at `word` holds call `seq`'s signal. Bounded by the timeout,
/// given up on abort; a word written through NVSHMEM then gets one NVSHMEM test (its post-wait
/// consistency step). Returns false when it gave up (the reason is recorded).
__device__ __noinline__ bool rail_wait(const DeviceComm& c, const uint64_t* word, uint32_t seq, int peer, bool nvshmem,
                                       uint64_t* value, Phase phase = Phase::kRailReceive) {
  uint64_t start = 0;
  for (uint32_t spins = 0;; ++spins) {
    const int abort = (spins & 127) == 0 ? device::abort_value(c) : 0;
    const uint64_t v = device::ld_acquire_sys_u64(word);
    if (device::stop_if_aborted(c, abort, phase)) return false;
    if (ll_signal_is(v, seq)) {
      *value = v;
#if FLASHEP_WITH_NVSHMEM
      if (nvshmem) nvshmem_uint64_test(const_cast<uint64_t*>(word), NVSHMEM_CMP_EQ, v);
#else
      (void)nvshmem;
#endif
      return true;
    }
    if (ll_signal_is_ahead(v, seq)) {  // two calls ahead: the halves cannot hold it (a protocol breach)
      device::fail(c, Phase::kLowLatencyOverrun, peer, -1, static_cast<int>(seq), static_cast<int>(v >> 32));
      return false;
    }
    if (spins == 0) start = device::global_timer_ns();
    if ((spins & 127) == 127 && device::global_timer_ns() - start > c.timeout_ns) {
      device::fail(c, phase, peer, -1, static_cast<int>(seq), static_cast<int>(v >> 32));
      return false;
    }
  }
}

/// Plan: block b = destination node b. The token's slot at b's rail peer is the number of earlier
/// tokens that go to node b (a block-wide scan over the tokens, in token order). Block 0 also checks
/// every top-k id: an id outside [-1, E) fails the call (and aborts the buffer) here, so the send
/// kernel, which follows on the stream, finds the abort at its entry and sends nothing.
__global__ void __launch_bounds__(kRailThreads) rail_plan_kernel(const __grid_constant__ RailPlanParams p) {
  if (blockIdx.x == 0 && p.topk_idx != nullptr) {
    __shared__ int s_bad;
    if (threadIdx.x == 0) s_bad = INT_MAX;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < int64_t(p.num_tokens) * p.num_topk; i += blockDim.x) {
      const int64_t e = p.topk_idx[i];
      if (e < -1 || e >= p.num_experts) atomicMin(&s_bad, static_cast<int>(i) + 1);  // the first bad one: deterministic
    }
    __syncthreads();
    if (threadIdx.x == 0 && s_bad != INT_MAX)
      device::fail(p.comm, Phase::kDispatchInvalidExpert, p.num_experts, -1, (s_bad - 1) / p.num_topk,
                   static_cast<int>(p.topk_idx[s_bad - 1]));  // the token, as notify_dispatch names it
  }
  const NodeShape& s = p.shape;
  const int b = blockIdx.x, M = s.nvl_size, N = s.num_nodes(), R = s.num_ranks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  __shared__ int s_warp_count[kRailThreads / 32];
  __shared__ int s_base;
  if (threadIdx.x == 0) s_base = 0;
  __syncthreads();
  for (int t0 = 0; t0 < p.num_tokens; t0 += blockDim.x) {  // block-uniform trip count
    const int t = t0 + static_cast<int>(threadIdx.x);
    bool goes = false;
    if (t < p.num_tokens) {
      const bool* row = p.is_token_in_rank + int64_t(t) * R + int64_t(b) * M;
      for (int j = 0; j < M; ++j) goes |= row[j];
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, goes);
    if (lane == 0) s_warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = s_base;
    for (int w = 0; w < warp; ++w) before += s_warp_count[w];
    if (t < p.num_tokens)
      p.rail_slot[int64_t(t) * N + b] = goes ? before + __popc(ballot & ((1u << lane) - 1u)) : -1;
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 0; w < num_warps; ++w) s_base += s_warp_count[w];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.rail_count[b] = s_base;
}

/// Send: the counts to every node's rail peer, then one warp per token stages its message and puts
/// it to the rail peer of every node it goes to.
__global__ void __launch_bounds__(kRailThreads) rail_send_kernel(const __grid_constant__ RailSendParams p) {
  const DeviceComm& c = p.comm;
  if (device::aborted_at_entry(c)) return;
  const NodeShape& s = p.shape;
  const RailRegion& g = p.region;
  const RailMessage& m = g.msg;
  const int N = s.num_nodes(), R = s.num_ranks, K = p.num_topk, my_node = s.node_of(c.rank);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  RailState* st = rail_state(c, g);
  __shared__ uint32_t s_seq;
  if (threadIdx.x == 0) s_seq = *reinterpret_cast<volatile uint32_t*>(&st->seq);
  __syncthreads();
  const uint32_t seq = s_seq;
  const int half = static_cast<int>(seq & 1u);

  // 1. Counts first (block b % blocks for node b): the check block (the call hash) and the count as
  // its signal.
  if (threadIdx.x == 0)
    for (int b = blockIdx.x; b < N; b += gridDim.x)
      rail_check_and_signal(c, s.rail_peer(c.rank, b), g.check_stage(b), g.check(half, my_node),
                            g.signal(half, my_node), p.call_hash, ll_signal(seq, p.rail_count[b]));

  // 2. Messages, one warp per token (16 in flight per block): the warp stages the token's message
  // once, then puts it to the rail peer of every node it goes to (a copy into our own inbox for
  // our node), each with its flag.
  const int words = static_cast<int>(align_up(int64_t(m.bytes), 16) / 16);
  const int mask_words = rail_mask_words(R);
  const uint64_t flag = ll_signal(seq, 0);
  for (int t = blockIdx.x * num_warps + warp; t < p.num_tokens; t += gridDim.x * num_warps) {
    char* stage = c.sym_base + g.stage(t);
    const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(t) * m.row_bytes);
    device::warp_copy<4, false>(reinterpret_cast<int4*>(stage), row, m.row_bytes / 16, lane);
    if (p.fp8)
      for (int i = lane; i < p.hidden / 128; i += 32)
        reinterpret_cast<float*>(stage + m.scale_offset)[i] =
            p.x_scales[int64_t(t) * p.scale_token_stride + int64_t(i) * p.scale_hidden_stride];
    for (int k = lane; k < K; k += 32) {
      reinterpret_cast<int*>(stage + m.topk_offset)[k] = p.topk_idx != nullptr ? static_cast<int>(p.topk_idx[int64_t(t) * K + k]) : -1;
      reinterpret_cast<float*>(stage + m.weight_offset)[k] = p.topk_weights != nullptr ? p.topk_weights[int64_t(t) * K + k] : 0.0f;
    }
    int* meta = reinterpret_cast<int*>(stage + m.meta_offset);
    if (lane < kRailMetaMask) meta[lane] = lane == kRailMetaSrcToken ? t : 0;
    for (int w = lane; w < mask_words; w += 32) {
      uint32_t bits = 0;
      for (int j = 0; j < 32 && w * 32 + j < R; ++j) bits |= p.is_token_in_rank[int64_t(t) * R + w * 32 + j] ? (1u << j) : 0u;
      meta[kRailMetaMask + w] = static_cast<int>(bits);
    }
    __syncwarp();  // the staged message is written before any lane reads it below
    for (int b = 0; b < N; ++b) {
      const int slot = p.rail_slot[int64_t(t) * N + b];
      if (slot < 0) continue;  // warp-uniform
      const int peer = s.rail_peer(c.rank, b);
      if (peer == c.rank) {  // our own node: a local copy into our inbox, then the flag
        int4* to = reinterpret_cast<int4*>(c.sym_base + g.slot(half, my_node, slot));
        device::warp_copy<4, true>(to, reinterpret_cast<const int4*>(stage), words, lane);
        __syncwarp();
        if (lane == 0) rail_signal(c, peer, g.flag(half, my_node, slot), flag);
        __syncwarp();
      } else {
#if FLASHEP_WITH_NVSHMEM
        nvshmemx_putmem_signal_nbi_warp(c.sym_base + g.slot(half, my_node, slot), stage, static_cast<size_t>(words) * 16,
                                        reinterpret_cast<uint64_t*>(c.sym_base + g.flag(half, my_node, slot)), flag,
                                        NVSHMEM_SIGNAL_SET, peer);
#endif
      }
    }
  }

  // 3. The last block completes every put of this PE (the stages are rewritten by the next call).
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&st->send_ticket, 1) == static_cast<int>(gridDim.x) - 1) {
      __threadfence();
#if FLASHEP_WITH_NVSHMEM
      nvshmem_quiet();
#endif
      st->send_ticket = 0;
    }
  }
}

/// Receive: every source node's count, then one warp per forwarded row. Rows sit at a fixed
/// place, source node a's tokens at rows [a * T, a * T + count_a), so the NVLink stage always sees
/// N * T rows (a number the host knows: no wait for the counts, graph capturable); the rows past
/// each count go nowhere (an empty local mask, top-k ids -1, source -1). The last block advances
/// the sequence.
__global__ void __launch_bounds__(kRailThreads) rail_receive_kernel(const __grid_constant__ RailReceiveParams p) {
  const DeviceComm& c = p.comm;
  if (device::aborted_at_entry(c)) return;
  const NodeShape& s = p.shape;
  const RailRegion& g = p.region;
  const RailMessage& m = g.msg;
  const int N = s.num_nodes(), M = s.nvl_size, K = p.num_topk, T = g.max_tokens, my_node = s.node_of(c.rank),
            me = s.local_of(c.rank);
  RailState* st = rail_state(c, g);
  __shared__ uint32_t s_seq;
  __shared__ int s_count[kMaxNodes];
  __shared__ int s_failed, s_rows_failed;  // step 1's, then step 2's (step 1's is read after its barrier)
  if (threadIdx.x == 0) {
    s_seq = *reinterpret_cast<volatile uint32_t*>(&st->seq);
    s_failed = 0;
    s_rows_failed = 0;
  }
  __syncthreads();
  const uint32_t seq = s_seq;
  const int half = static_cast<int>(seq & 1u);

  // 1. Counts (and each source's call hash).
  for (int a = threadIdx.x; a < N; a += blockDim.x) {
    const int src = s.rank_of(a, me);
    uint64_t value = 0;
    int count = 0;
    if (!rail_wait(c, reinterpret_cast<const uint64_t*>(c.sym_base + g.signal(half, a)), seq, src, src != c.rank, &value)) {
      s_failed = 1;
    } else if (const uint32_t hash = static_cast<uint32_t>(__ldcg(reinterpret_cast<const int*>(c.sym_base + g.check(half, a))));
               hash != p.call_hash) {
      device::fail(c, Phase::kCallMismatch, src, -1, static_cast<int>(p.call_hash), static_cast<int>(hash));
      s_failed = 1;
    } else {
      count = ll_signal_count(value);
      if (count > T) {
        device::fail(c, Phase::kRailBadCount, src, -1, T, count);
        s_failed = 1;
        count = 0;
      }
    }
    s_count[a] = count;
  }
  __syncthreads();
  if (s_failed) return;
  if (blockIdx.x == 0)
    for (int a = threadIdx.x; a < N; a += blockDim.x) p.fwd_counts[a] = s_count[a];

  // 2. The forwarded rows, one warp each (a block has 16 rows in flight: a row is latency-bound,
  // one flag then one copy): lane 0 waits for the row's flag, the warp copies it.
  const int row_words = m.row_bytes / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  for (int f = blockIdx.x * num_warps + warp; f < N * T; f += gridDim.x * num_warps) {
    const int a = f / T, index = f - a * T;
    if (index >= s_count[a]) {  // warp-uniform: a row that goes nowhere
      for (int j = lane; j < M; j += 32) p.fwd_in_rank[int64_t(f) * M + j] = false;
      for (int k = lane; k < K; k += 32) p.fwd_topk_idx[int64_t(f) * K + k] = -1;
      if (lane == 0) p.fwd_source[int64_t(f) * 2] = p.fwd_source[int64_t(f) * 2 + 1] = -1;
      continue;
    }
    int arrived = 0;
    if (lane == 0) {
      const int src = s.rank_of(a, me);
      uint64_t value = 0;
      arrived = rail_wait(c, reinterpret_cast<const uint64_t*>(c.sym_base + g.flag(half, a, index)), seq, src,
                          src != c.rank, &value) ? 1 : 0;
    }
    if (!__shfl_sync(0xffffffffu, arrived, 0)) {
      s_rows_failed = 1;  // the reason is recorded; no ticket below
      break;
    }
    __syncwarp();  // lane 0's acquire orders the message before every lane's reads
    const char* msg = c.sym_base + g.slot(half, a, index);
    int4* out_row = reinterpret_cast<int4*>(static_cast<char*>(p.fwd_x) + int64_t(f) * m.row_bytes);
    device::warp_copy<4, true>(out_row, reinterpret_cast<const int4*>(msg), row_words, lane);
    if (p.fp8)
      for (int i = lane; i < p.hidden / 128; i += 32)
        p.fwd_scales[int64_t(f) * (p.hidden / 128) + i] = __ldcg(reinterpret_cast<const float*>(msg + m.scale_offset) + i);
    for (int k = lane; k < K; k += 32) {
      const int expert = __ldcg(reinterpret_cast<const int*>(msg + m.topk_offset) + k);
      p.fwd_topk_idx[int64_t(f) * K + k] = node_local_expert(expert, my_node, M, p.num_local_experts);
      if (p.fwd_topk_weights != nullptr)
        p.fwd_topk_weights[int64_t(f) * K + k] = __ldcg(reinterpret_cast<const float*>(msg + m.weight_offset) + k);
    }
    const int* meta = reinterpret_cast<const int*>(msg + m.meta_offset);
    for (int j = lane; j < M; j += 32) {
      const int bit = my_node * M + j;
      const uint32_t bits = static_cast<uint32_t>(__ldcg(meta + kRailMetaMask + bit / 32));
      p.fwd_in_rank[int64_t(f) * M + j] = (bits >> (bit % 32)) & 1u;
    }
    if (lane == 0) {
      p.fwd_source[int64_t(f) * 2] = a;
      p.fwd_source[int64_t(f) * 2 + 1] = __ldcg(meta + kRailMetaSrcToken);
    }
  }

  // 3. The last block advances the sequence (the next call's send reads it).
  __syncthreads();
  if (s_rows_failed) return;
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&st->receive_ticket, 1) == static_cast<int>(gridDim.x) - 1) {
      st->receive_ticket = 0;
      st->seq = seq + 1;
    }
  }
}

/// Combine, forwarder side (RailReturnSendParams): one warp per forwarded row that came (16 rows
/// in flight per block): the warp stages the row and its weights, then copies it into our own
/// inbox (a source on our node) or puts it, with its flag.
__global__ void __launch_bounds__(kRailThreads) rail_return_send_kernel(const __grid_constant__ RailReturnSendParams p) {
  const DeviceComm& c = p.comm;
  if (device::aborted_at_entry(c)) return;
  const NodeShape& s = p.shape;
  const RailRegion& g = p.region;
  const int N = s.num_nodes(), T = g.max_tokens, K = p.num_topk, my_node = s.node_of(c.rank), me = s.local_of(c.rank);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  RailState* st = rail_state(c, g);
  __shared__ uint32_t s_seq;
  __shared__ int s_count[kMaxNodes];
  if (threadIdx.x == 0) s_seq = *reinterpret_cast<volatile uint32_t*>(&st->return_seq);
  for (int a = threadIdx.x; a < N; a += blockDim.x) s_count[a] = p.fwd_counts[a];
  __syncthreads();
  const uint32_t seq = s_seq;
  const int half = static_cast<int>(seq & 1u);
  const int row_words = p.hidden * 2 / 16, words = g.return_stride / 16;
  const uint64_t flag = ll_signal(seq, 0);
  for (int f = blockIdx.x * num_warps + warp; f < N * T; f += gridDim.x * num_warps) {
    const int a = f / T, index = f - a * T;
    if (index >= s_count[a]) continue;  // warp-uniform
    char* stage = c.sym_base + g.return_stage(f);
    const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.combined_x) + int64_t(f) * p.hidden * 2);
    device::warp_copy<4, false>(reinterpret_cast<int4*>(stage), row, row_words, lane);
    for (int k = lane; k < K; k += 32)
      reinterpret_cast<float*>(stage + int64_t(p.hidden) * 2)[k] =
          p.combined_weights != nullptr ? p.combined_weights[int64_t(f) * K + k] : 0.0f;
    __syncwarp();  // the staged row is written before any lane reads it below
    const int peer = s.rank_of(a, me);
    if (peer == c.rank) {
      int4* to = reinterpret_cast<int4*>(c.sym_base + g.return_slot(half, my_node, index));
      device::warp_copy<4, true>(to, reinterpret_cast<const int4*>(stage), words, lane);
      __syncwarp();
      if (lane == 0) rail_signal(c, peer, g.return_flag(half, my_node, index), flag);
      __syncwarp();
    } else {
#if FLASHEP_WITH_NVSHMEM
      nvshmemx_putmem_signal_nbi_warp(c.sym_base + g.return_slot(half, my_node, index), stage,
                                      static_cast<size_t>(words) * 16,
                                      reinterpret_cast<uint64_t*>(c.sym_base + g.return_flag(half, my_node, index)),
                                      flag, NVSHMEM_SIGNAL_SET, peer);
#endif
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&st->return_send_ticket, 1) == static_cast<int>(gridDim.x) - 1) {
      __threadfence();
#if FLASHEP_WITH_NVSHMEM
      nvshmem_quiet();
#endif
      st->return_send_ticket = 0;
    }
  }
}

/// Combine, source side (RailReturnReceiveParams): one warp per token (16 tokens in flight per
/// block); lanes wait for the flags of the nodes the token went to (lane b: nodes b, b + 32, ...),
/// then the warp adds the returned rows (ascending node) and the bias, 4 words per lane at a time.
__global__ void __launch_bounds__(kRailThreads) rail_return_receive_kernel(const __grid_constant__ RailReturnReceiveParams p) {
  const DeviceComm& c = p.comm;
  if (device::aborted_at_entry(c)) return;
  const NodeShape& s = p.shape;
  const RailRegion& g = p.region;
  const int N = s.num_nodes(), K = p.num_topk, me = s.local_of(c.rank);
  RailState* st = rail_state(c, g);
  __shared__ uint32_t s_seq;
  __shared__ int s_failed;
  if (threadIdx.x == 0) {
    s_seq = *reinterpret_cast<volatile uint32_t*>(&st->return_seq);
    s_failed = 0;
  }
  __syncthreads();
  const uint32_t seq = s_seq;
  const int half = static_cast<int>(seq & 1u);
  const int words = p.hidden / 8;  // 16-byte words of a BF16 row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  constexpr int kUnroll = 4;
  for (int t = blockIdx.x * num_warps + warp; t < p.num_tokens; t += gridDim.x * num_warps) {
    const int* slots = p.rail_slot + int64_t(t) * N;
    int ok = 1;
    for (int b = lane; b < N && ok; b += 32) {
      const int slot = slots[b];
      if (slot < 0) continue;
      const int peer = s.rank_of(b, me);
      uint64_t value = 0;
      ok = rail_wait(c, reinterpret_cast<const uint64_t*>(c.sym_base + g.return_flag(half, b, slot)), seq, peer,
                     peer != c.rank, &value, Phase::kRailReturn) ? 1 : 0;
    }
    if (!__all_sync(0xffffffffu, ok)) {
      s_failed = 1;  // the reason is recorded; no ticket below
      break;
    }
    __syncwarp();  // every lane's acquires order the returned rows before every lane's reads
    int4* out = reinterpret_cast<int4*>(static_cast<char*>(p.combined_x) + int64_t(t) * p.hidden * 2);
    for (int base = lane; base < words; base += kUnroll * 32) {
      float acc[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[u][j] = 0.0f;
      auto add = [&](const int4* row, bool ring) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (base + u * 32 < words) v[u] = ring ? device::ld_ring(row + base + u * 32) : device::ld_stream(row + base + u * 32);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (base + u * 32 >= words) break;
          const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v[u]);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[u][j] += __bfloat162float(h[j]);
        }
      };
      for (int b = 0; b < N; ++b) {
        const int slot = slots[b];
        if (slot >= 0) add(reinterpret_cast<const int4*>(c.sym_base + g.return_slot(half, b, slot)), true);
      }
      for (const void* bias : {p.bias0, p.bias1})
        if (bias != nullptr)
          add(reinterpret_cast<const int4*>(static_cast<const char*>(bias) + int64_t(t) * p.hidden * 2), false);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * 32 >= words) break;
        int4 packed;
        __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
        for (int j = 0; j < 4; ++j) o[j] = __floats2bfloat162_rn(acc[u][2 * j], acc[u][2 * j + 1]);
        out[base + u * 32] = packed;
      }
    }
    if (p.combined_weights != nullptr)
      for (int k = lane; k < K; k += 32) {
        float sum = 0.0f;
        for (int b = 0; b < N; ++b)
          if (slots[b] >= 0)
            sum += __ldcg(reinterpret_cast<const float*>(c.sym_base + g.return_slot(half, b, slots[b]) + int64_t(p.hidden) * 2) + k);
        p.combined_weights[int64_t(t) * K + k] = sum;
      }
  }
  __syncthreads();
  if (s_failed) return;
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&st->return_receive_ticket, 1) == static_cast<int>(gridDim.x) - 1) {
      st->return_receive_ticket = 0;
      st->return_seq = seq + 1;
    }
  }
}

}  // namespace

cudaError_t launch_rail_plan(const RailPlanParams& p, cudaStream_t stream) {
  rail_plan_kernel<<<p.shape.num_nodes(), kRailThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
cudaError_t launch_rail_send(const RailSendParams& p, int num_blocks, cudaStream_t stream) {
  rail_send_kernel<<<num_blocks, kRailThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
cudaError_t launch_rail_receive(const RailReceiveParams& p, int num_blocks, cudaStream_t stream) {
  rail_receive_kernel<<<num_blocks, kRailThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_rail_return_send(const RailReturnSendParams& p, int num_blocks, cudaStream_t stream) {
  rail_return_send_kernel<<<num_blocks, kRailThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
cudaError_t launch_rail_return_receive(const RailReturnReceiveParams& p, int num_blocks, cudaStream_t stream) {
  rail_return_receive_kernel<<<num_blocks, kRailThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
