// Low-latency dispatch (src/core/low_latency_layout.hpp has the wire format).
//
// Send phase: every block first counts all (token, expert) pairs of the call (checking the ids), so
// the counts go out at once: block d sends destination d its counts (messages and rows per
// expert) with the call's signal, before any message. Then one block per token casts the row once
// (FP8 per 128 channels, exactly the contract's rule, or BF16 as is), takes a message slot per
// destination rank and a position per (token, expert) from this rank's counters, stores the
// message into every direct destination's inbox and raises the message's own flag (a system-scope
// release); NVSHMEM destinations get one put-with-signal each from a staged copy, the signal being
// the flag. Nothing waits for the last block: it only advances the sequence (the next call's send
// phase zeroes this call's counters).
// Receive phase: every block waits for every source's counts (bounded; a silent peer is masked in
// shrink mode) and derives the per-expert segments while the messages are still landing; then one
// team (128 threads) per message waits for that message's flag and expands it into the [L, R*T, H] output,
// the scales (column-major), src_info, layout_range and the combine plan.
#include <cuda_fp8.h>

#include "core/fp8_quotient.hpp"
#include "kernels/low_latency_common.cuh"
#include "kernels/low_latency_trace.cuh"

namespace flashep::ll {

namespace {

/// Ids per chunk of the send phase's counting pass (shared memory).
constexpr int kCountChunk = 2048;
/// A top-k id outside [-1, E), as the counting pass keeps it.
constexpr int kBadId = -2;

/// Diagnostics builds: the timeline (kernels::kLowLatencyDispatchTrace names the points).
__device__ TraceStamps g_dispatch_trace = {{~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull}, {}};

/// A token's row and top-k ids as its first loads leave them: each thread its two 16-byte words of
/// the row (256-channel chunks `warp` and `warp + 16`), lanes k < K of warp 0 top-k slot k's id.
struct TokenLoads {
  int4 in[2];
  int64_t expert_id = -1;
};

/// Issues token t's loads (see TokenLoads); nothing waits for them here.
__device__ __forceinline__ void load_token(const kernels::LowLatencyDispatchParams& p, int t, TokenLoads& loads) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, H = p.ll.layout.hidden;
  const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(t) * H * 2);
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int channel = (warp + u * kWarps) * 256 + lane * 8;
    loads.in[u] = channel < H ? device::ld_stream(row + channel / 8) : make_int4(0, 0, 0, 0);
  }
  if (warp == 0 && lane < p.num_topk) loads.expert_id = __ldg(p.topk_idx + int64_t(t) * p.num_topk + lane);
}

/// Warp 0's claim for one token: lane k < K holds top-k slot k's expert and destination (-1: none,
/// or a masked destination), the first lane of each destination takes the message slot there, and
/// every lane with an expert its row's position in that expert's segment. An id outside [0, E)
/// claims nothing (the counting pass fails the call on it, and a failed call aborts the buffer).
struct TokenClaim {
  int expert, dst, slot, pos;
  bool first;
};
__device__ __forceinline__ TokenClaim claim_token(const kernels::LowLatencyDispatchParams& p, const int* s_masked,
                                                  int half, int64_t expert_id) {
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int lane = threadIdx.x % 32;
  TokenClaim claim{-1, -1, 0, 0, false};
  if (expert_id >= 0 && expert_id < L.num_experts) {
    claim.expert = static_cast<int>(expert_id);
    claim.dst = L.div_local.div(claim.expert);
    if (s_masked[claim.dst]) claim.dst = claim.expert = -1;
  }
  claim.first = claim.dst >= 0;
  for (int k = 0; k < p.num_topk; ++k) {
    const int other = __shfl_sync(0xffffffffu, claim.dst, k);
    if (k < lane && other == claim.dst) claim.first = false;
  }
  if (claim.first) claim.slot = atomicAdd(local_int(ll, L.msg_counter(half, claim.dst)), 1);
  if (claim.expert >= 0) claim.pos = atomicAdd(local_int(ll, L.expert_counter(half, claim.expert)), 1);
  return claim;
}

/// Block-wide send phase. Returns false when the call failed here (bad expert id).
///
/// The block's first token (t = blockIdx.x) was loaded with the kernel entry's loads (`first_loads`), and
/// claims its slots before the counting pass: the atomics' round trip passes under it.
template <bool kFp8>
__device__ __forceinline__ bool dispatch_send(const kernels::LowLatencyDispatchParams& p, int* s_masked,
                                              EntryState& entry, const TokenLoads& first_loads) {
  // Shared memory: s_masked [R], then the counting pass's [E] + [R] (below).
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int R = c.num_ranks, E = L.num_experts, num_local = L.num_local_experts(), K = p.num_topk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  LowLatencyState* st = state_of(ll);
  const uint32_t seq = entry.send_seq;
  const int half = static_cast<int>(seq & 1u);

  // 0. The block's first token claims its slots now (its ids came with the entry's loads): the
  // atomics' round trip passes under the counting pass.
  TokenClaim first_claim{-1, -1, 0, 0, false};
  if (warp == 0 && static_cast<int>(blockIdx.x) < p.num_tokens)
    first_claim = claim_token(p, s_masked, half, first_loads.expert_id);

  // 1. Every block counts every (token, expert) pair: rows per expert and messages per destination
  // (unmasked destinations), checking the ids on the way: in [-1, E), and no expert twice for one
  // token (an expert's R*T rows could not hold more). All blocks take the same decision before
  // anything is sent. The ids come in chunks of whole tokens through shared memory (coalesced
  // loads, all in flight), then one thread per pair compares with its token's earlier ids there.
  int& s_bad = entry.failed;
  int* s_expert_rows = s_masked + R;      // [E]
  int* s_dest_msgs = s_expert_rows + E;   // [R]
  int* s_ids = s_dest_msgs + R;           // [kCountChunk] the chunk's ids (kBadId: out of range)
  int* s_id_dst = s_ids + kCountChunk;    // [kCountChunk] their destination ranks (-1: none)
  for (int i = threadIdx.x; i < E + R; i += blockDim.x) s_expert_rows[i] = 0;
  __syncthreads();
  const int chunk_tokens = p.div_topk.div(kCountChunk);
  for (int t0 = 0; t0 < p.num_tokens; t0 += chunk_tokens) {
    const int n = min(chunk_tokens, p.num_tokens - t0) * K;
    const int64_t* ids = p.topk_idx + int64_t(t0) * K;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t e = __ldg(ids + i);
      const bool valid = e >= 0 && e < E;
      s_ids[i] = (e < -1 || e >= E) ? kBadId : static_cast<int>(e);
      s_id_dst[i] = valid ? L.div_local.div(static_cast<int>(e)) : -1;  // one division per pair, not per comparison
    }
    __syncthreads();
    // Whole warps per round (the counts are added once per warp and value: many pairs of a warp
    // share a destination, and all of them one expert when everything goes there).
    for (int i0 = 0; i0 < n; i0 += blockDim.x) {
      const int i = i0 + static_cast<int>(threadIdx.x);
      int counted_expert = -1, counted_dst = -1;
      if (i < n) {
        const int e = s_ids[i];
        if (e == kBadId) {
          atomicExch(&s_bad, t0 * K + i + 1);
        } else if (e >= 0) {
          const int dst = s_id_dst[i];
          bool first = true, twice = false;
          for (int j = i - p.div_topk.mod(i); j < i; ++j) {
            twice |= s_ids[j] == e;
            first &= s_id_dst[j] != dst;
          }
          if (twice) {
            atomicExch(&s_bad, t0 * K + i + 1);
          } else if (!s_masked[dst]) {
            counted_expert = e;
            counted_dst = first ? dst : -1;
          }
        }
      }
      const unsigned same_expert = __match_any_sync(0xffffffffu, counted_expert);
      if (counted_expert >= 0 && __ffs(same_expert) - 1 == lane) atomicAdd(s_expert_rows + counted_expert, __popc(same_expert));
      const unsigned same_dst = __match_any_sync(0xffffffffu, counted_dst);
      if (counted_dst >= 0 && __ffs(same_dst) - 1 == lane) atomicAdd(s_dest_msgs + counted_dst, __popc(same_dst));
    }
    __syncthreads();
  }
  if (s_bad != 0) {
    if (blockIdx.x == 0 && threadIdx.x == 0)
      ll_fail(c, Phase::kLowLatencyInvalidExpert, E, -1, s_bad - 1, static_cast<int>(p.topk_idx[s_bad - 1]));
    return false;
  }
  trace_mark(&g_dispatch_trace, 2);

  // 2. Block d sends destination d its counts block (the call hash, the message count, rows per
  // local expert: words stamped with the call's number, relaxed system-scope stores so that a
  // receiver reading them before the signal sees whole words), then the message count in the
  // signal (a release after the block's stores; or one put-with-signal of the staged block for an
  // NVSHMEM destination).
  for (int d = blockIdx.x; d < R; d += gridDim.x) {
    if (s_masked[d]) continue;  // block-uniform
    char* region = direct_region(c, ll, d);
    uint64_t* counts =
        reinterpret_cast<uint64_t*>(region != nullptr ? region + L.counts(half, c.rank) : ll.sym + L.counts_stage(half, d));
    for (int j = threadIdx.x; j < kCountWordRows + num_local; j += blockDim.x) {
      const int value = j == kCountWordHash       ? (p.call_hash & 0x7fffffff)
                        : j == kCountWordMessages ? s_dest_msgs[d]
                                                  : s_expert_rows[d * num_local + j - kCountWordRows];
      device::st_relaxed_sys_u64(counts + j, ll_signal(seq, value));
    }
    __syncthreads();
    const uint64_t signal = ll_signal(seq, s_dest_msgs[d]);
    if (region != nullptr) {
      if (threadIdx.x == 0) device::st_release_sys_u64(reinterpret_cast<uint64_t*>(region + L.dispatch_total(half, c.rank)), signal);
    } else if (warp == 0) {
      warp_put_signal(ll, d, L.counts(half, c.rank), L.counts_stage(half, d), int64_t(kCountWordRows + num_local) * 8,
                      L.dispatch_total(half, c.rank), signal, false);
    }
  }
  trace_mark(&g_dispatch_trace, 3);

  // 3. One block per token: warp 0 takes the slots and positions and writes the meta, then every warp
  // casts and stores a share of the row's 256-channel chunks (many loads in flight per token), then
  // warp 0 puts the staged message to the NVSHMEM destinations.
  const LowLatencyMessage m = make_ll_message(L.hidden, kFp8);
  __shared__ char* s_msg[32];   // per destination: its message address (nullptr: NVSHMEM)
  __shared__ int s_dst[32], s_slot[32];
  __shared__ int s_num_dests, s_any_remote;
  const int num_chunks = (L.hidden + 255) / 256;
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    char* stage = ll.sym != nullptr ? ll.sym + L.dispatch_stage(half, t) : nullptr;
    // Each warp's chunks (warp and warp + 16: H <= 8192 has at most 32) load while warp 0 takes
    // the slots; the block's first token's loads and claim were made earlier.
    const bool first_token = t == static_cast<int>(blockIdx.x);
    TokenLoads loads;
    if (first_token) loads = first_loads;
    else load_token(p, t, loads);
    const int4 in[2] = {loads.in[0], loads.in[1]};
    if (warp == 0) {
      const TokenClaim claim = first_token ? first_claim : claim_token(p, s_masked, half, loads.expert_id);
      const int expert = claim.expert, dst = claim.dst, slot = claim.slot, pos = claim.pos;
      const bool first = claim.first;
      const unsigned dests = __ballot_sync(0xffffffffu, first);
      if (first) {
        const int i = __popc(dests & ((1u << lane) - 1u));
        char* region = direct_region(c, ll, dst);
        s_msg[i] = region != nullptr ? region + L.dispatch_in(half, c.rank, slot) : nullptr;
        s_dst[i] = dst;
        s_slot[i] = slot;
      }
      const bool any_remote = __any_sync(0xffffffffu, first && direct_region(c, ll, dst) == nullptr);
      if (lane == 0) {
        s_num_dests = __popc(dests);
        s_any_remote = any_remote ? 1 : 0;
      }
      __syncwarp();
      // Meta: the same for every destination (each keeps the slots of its own experts).
      const int num_dests = __popc(dests);
      for (int i = 0; i < num_dests + (any_remote ? 1 : 0); ++i) {
        char* msg = i < num_dests ? s_msg[i] : stage;
        if (msg == nullptr) continue;
        int* meta = reinterpret_cast<int*>(msg + m.meta_offset);
        if (lane == 0) meta[kMetaSrcToken] = t;
        if (lane < K) {
          meta[kMetaExpert + lane] = expert >= 0 ? static_cast<int>(expert) : -1;
          meta[kMetaPos + lane] = pos;
        }
      }
    }
    __syncthreads();
    const int num_dests = s_num_dests;
    const bool any_remote = s_any_remote != 0;
    {
      const int base = warp;
      // Not unrolled: one copy of the cast's code (the kernels run from a cold instruction cache);
      // the loads of both chunks were issued above.
#pragma unroll 1
      for (int u = 0; u < 2; ++u) {
        const int chunk = base + u * kWarps;
        if (chunk >= num_chunks) break;  // warp-uniform
        const int channel = chunk * 256 + lane * 8;
        const bool active = channel < L.hidden;
        const int4 word = u == 0 ? in[0] : in[1];
        if constexpr (kFp8) {
          const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&word);
          float f[8];
          float amax = 0.0f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            f[j] = __bfloat162float(v[j]);
            amax = fmaxf(amax, fabsf(f[j]));
          }
          // A 128-channel group is 16 lanes (H % 128 == 0: a half warp is all active or all not).
#pragma unroll
          for (int mask = 8; mask >= 1; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
          amax = fmaxf(amax, 1e-4f);
          float scale_inv = __fdiv_rn(amax, 448.0f);
          if (p.round_scale) {
            const uint32_t bits = __float_as_uint(scale_inv);
            if ((bits & 0x7fffffu) != 0) scale_inv = __uint_as_float((bits & 0x7f800000u) + 0x800000u);
          }
          // x / scale_inv without a division per element (src/core/fp8_quotient.hpp: the same e4m3
          // values over the cast's whole domain).
          const float reciprocal = fp8_scale_reciprocal(scale_inv);
          uint32_t packed[2];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const __nv_fp8x4_e4m3 q(make_float4(
                fp8_quotient(f[4 * j], scale_inv, reciprocal), fp8_quotient(f[4 * j + 1], scale_inv, reciprocal),
                fp8_quotient(f[4 * j + 2], scale_inv, reciprocal), fp8_quotient(f[4 * j + 3], scale_inv, reciprocal)));
            packed[j] = q.__x;
          }
          const uint2 out = make_uint2(packed[0], packed[1]);
          const int group = channel / 128;
          if (active) {
            for (int i = 0; i < num_dests; ++i) {
              char* msg = s_msg[i];
              if (msg == nullptr) continue;
              *reinterpret_cast<uint2*>(msg + channel) = out;
              if (lane % 16 == 0) reinterpret_cast<float*>(msg + m.scale_offset)[group] = scale_inv;
            }
            if (any_remote) {
              *reinterpret_cast<uint2*>(stage + channel) = out;
              if (lane % 16 == 0) reinterpret_cast<float*>(stage + m.scale_offset)[group] = scale_inv;
            }
          }
        } else if (active) {
          for (int i = 0; i < num_dests; ++i)
            if (s_msg[i] != nullptr) *reinterpret_cast<int4*>(s_msg[i] + int64_t(channel) * 2) = word;
          if (any_remote) *reinterpret_cast<int4*>(stage + int64_t(channel) * 2) = word;
        }
      }
    }
    __syncthreads();
    // The message's flag, after every thread's stores (the barrier orders them before warp 0's
    // system-scope releases); NVSHMEM destinations: the put's signal is the flag.
    if (warp == 0) {
      const uint64_t flag = ll_signal(seq, 0);
      if (lane < num_dests && s_msg[lane] != nullptr)
        device::st_release_sys_u64(
            reinterpret_cast<uint64_t*>(direct_region(c, ll, s_dst[lane]) + L.dispatch_flag(half, c.rank, s_slot[lane])), flag);
      if (any_remote)
        for (int i = 0; i < num_dests; ++i)
          if (s_msg[i] == nullptr)
            warp_put_signal(ll, s_dst[i], L.dispatch_in(half, c.rank, s_slot[i]), L.dispatch_stage(half, t), m.bytes,
                            L.dispatch_flag(half, c.rank, s_slot[i]), flag, false);
    }
  }

  // 4. The previous call's counters are zeroed for the next call of their half; the last block
  // (nobody waits for it) advances the sequence.
  reset_previous_counters(ll, half);
  trace_mark(&g_dispatch_trace, 4);
  if (last_block_done(&st->ticket[kTicketDispatchSend], ll.sym != nullptr)) {
    trace_mark(&g_dispatch_trace, 5);
    finish_send_phase(c, ll, s_masked, p.call_slot, seq, kWireDispatch);
  }
  return true;
}

/// Largest R for which a team's first message is expanded before the segment step (its begin is a
/// sum over the sources below its own, one shared-memory load each).
constexpr int kEarlyExpandMaxRanks = 32;

/// 16-byte words of a message row per team thread (the largest H; FP8 rows are half as long).
template <bool kFp8>
inline constexpr int kWordsPerThread = kMaxLowLatencyHidden * (kFp8 ? 1 : 2) / 16 / kTeamThreads;

/// One message as a team holds it in registers: every thread its words of the row and (FP8) its
/// scale word; lanes of the team's warp 0 the meta (token, and their top-k slot's expert and
/// position).
template <bool kFp8>
struct HeldMessage {
  int4 words[kWordsPerThread<kFp8>];
  uint32_t scale_word;
  int token, expert, pos;
};

/// Team-wide: loads the message at `msg` (its flag seen by the team) into registers. All loads are
/// issued before any is used.
template <bool kFp8>
__device__ __forceinline__ void load_message(const char* msg, const LowLatencyMessage& m, int num_scale_words,
                                             bool ue8m0, int num_topk, int tt, HeldMessage<kFp8>& h) {
  const int4* from = reinterpret_cast<const int4*>(msg);
  const int num_int4 = m.row_bytes / 16;
#pragma unroll
  for (int u = 0; u < kWordsPerThread<kFp8>; ++u) {
    const int w = tt + u * kTeamThreads;
    h.words[u] = w < num_int4 ? device::ld_ring(from + w) : make_int4(0, 0, 0, 0);
  }
  h.scale_word = 0;
  if (tt < num_scale_words) {
    const float* scales = reinterpret_cast<const float*>(msg + m.scale_offset);
    if (ue8m0) {
#pragma unroll
      for (int b = 0; b < 4; ++b)
        h.scale_word |= ((__float_as_uint(__ldcg(scales + 4 * tt + b)) >> 23) & 0xffu) << (8 * b);
    } else {
      h.scale_word = __float_as_uint(__ldcg(scales + tt));
    }
  }
  h.token = h.expert = -1;
  h.pos = 0;
  if (tt < 32) {
    const int* meta = reinterpret_cast<const int*>(msg + m.meta_offset);
    h.token = __ldcg(meta + kMetaSrcToken);
    if (tt < num_topk) {
      h.expert = __ldcg(meta + kMetaExpert + tt);
      h.pos = __ldcg(meta + kMetaPos + tt);
    }
  }
}

/// The receive's first loads as a thread holds them: its word of the counts blocks (thread j: word j
/// of all sources' blocks in a row), per half. (Each team's thread 0 also loads the flags of the
/// team's first item, an item numbered slot-major over (source, slot) so that it needs no count to
/// be found; those go to shared memory for the whole team.)
struct FirstLook {
  uint64_t count[2] = {0, 0};  // per half
  long long start = 0;         // clock64 when the loads were issued (the wait statistics count from there)
};

/// Block-uniform: the counts are taken from one look at their stamped words (every source direct,
/// not in shrink mode, one word per thread); otherwise from wait_sources, after the signals.
__device__ __forceinline__ bool counts_by_look(const kernels::LowLatencyDispatchParams& p) {
  const LowLatencyLayout& L = p.ll.layout;
  return p.ll.all_direct && !p.ll.shrink &&
         p.comm.num_ranks * (kCountWordRows + L.num_local_experts()) <= static_cast<int>(blockDim.x);
}

/// Issues the first look's loads. A hook's receive issues them with the kernel entry's loads,
/// before it knows its call's number, so for both halves (`half` < 0): the counts words stamp
/// themselves, and the flags (one 16-byte acquire: the halves' flags are adjacent) are compared with
/// the number after the entry's barrier; the entry, the counts and the first flags then cost one
/// round trip. The fused kernel knows its half. No loop or call (ptxas would first wait for the
/// loads in flight): the loads stay in flight until their values are used. The flags go to
/// `s_flag` (a barrier later, the whole team reads them).
__device__ __forceinline__ void first_look(const kernels::LowLatencyDispatchParams& p, int half, FirstLook& look,
                                           uint64_t (&s_flag)[kTeams][2]) {
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int R = c.num_ranks;
  look.start = clock64();
  const int words_per_source = kCountWordRows + L.num_local_experts();
  if (counts_by_look(p) && static_cast<int>(threadIdx.x) < R * words_per_source) {
    const int r = L.div_source_words.div(threadIdx.x), j = threadIdx.x - r * words_per_source;
    const char* inbox = inbox_region(c, ll, r);
    look.count[0] = device::ld_relaxed_sys_u64(reinterpret_cast<const uint64_t*>(inbox + L.counts(half < 0 ? 0 : half, r)) + j);
    look.count[1] = half < 0 ? device::ld_relaxed_sys_u64(reinterpret_cast<const uint64_t*>(inbox + L.counts(1, r)) + j)
                             : look.count[0];
  }
  const int team = threadIdx.x / kTeamThreads;
  const int first_item = blockIdx.x + team * gridDim.x;
  if (threadIdx.x % kTeamThreads == 0 && first_item < R * L.max_tokens) {
    const int slot = L.div_ranks.div(first_item), src = first_item - slot * R;
    uint64_t flag0 = 0, flag1 = 0;
    // Direct sources only: an NVSHMEM source's flag needs NVSHMEM's wait for consistency.
    if (direct_region(c, ll, src) != nullptr)
      device::ld_acquire_sys_v2_u64(reinterpret_cast<const uint64_t*>(inbox_region(c, ll, src) + L.dispatch_flag(0, src, slot)),
                                    flag0, flag1);
    s_flag[team][0] = flag0;
    s_flag[team][1] = flag1;
  }
}

/// Block-wide receive phase.
///
/// Round trips on the way: the first look (`kLooked`: taken with the entry's loads, in the same
/// round trip; else taken here), then the team's first message when its flag was there (a hook
/// after a GEMM: every message is), its load right away; the counts' values are used only after
/// it is issued. Then each further message's flag and data. The rest of the items source-major.
template <bool kFp8, bool kLooked>
__device__ __forceinline__ void dispatch_receive(const kernels::LowLatencyDispatchParams& p, int* smem,
                                                 EntryState& entry, FirstLook& look, uint64_t (&s_flag)[kTeams][2]) {
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int R = c.num_ranks, num_local = L.num_local_experts(), K = p.num_topk;
  const int lane = threadIdx.x % 32;
  const int64_t rows_per_expert = L.rows_per_expert();
  const uint32_t seq = entry.recv_seq;
  const int half = static_cast<int>(seq & 1u);

  int* s_masked = smem;                // [R]
  int* s_count = smem + R;             // [R] messages from each source
  int* s_begin = s_count + R;          // [R][L] rows per (source, expert)
  int* s_total = s_begin + R * num_local;  // [L] rows per expert
  int* s_prefix = s_total + num_local;     // [R + 1] messages left after the first items, per source
  int* s_hash = s_prefix + R + 1;          // [R] each source's call hash (31 bits)
  int* s_seg = s_hash + R;                 // [R][L] segment begins (step 2; s_begin keeps the counts)
  int& s_failed = entry.failed;  // 0 here: the send phase (if any) returned early otherwise

  const LowLatencyMessage m = make_ll_message(L.hidden, kFp8);
  const int num_groups = L.hidden / 128;
  const int team = threadIdx.x / kTeamThreads, tt = threadIdx.x % kTeamThreads;
  const int num_int4 = m.row_bytes / 16;
  // The scales (FP8): one 32-bit word per thread (a float, or 4 packed UE8M0 bytes).
  const int num_scale_words = kFp8 ? (p.ue8m0 ? num_groups / 4 : num_groups) : 0;
  __shared__ int64_t s_rows[kTeams][32];      // target rows (expert * rows_per_expert + row)
  __shared__ int64_t s_scale_at[kTeams][32];  // their first scale word: expert * words * rows_per_expert + row
  __shared__ int s_num_rows[kTeams], s_bad_msg[kTeams], s_arrival[kTeams];

  // 0. The team's first item, early: its flags came with the first look, and its data is loaded
  // right away when there. Whether the item is a message of this call at all is known only from
  // the counts below; an item past its source's count has no flag of this call and is not loaded.
  const int first_item = blockIdx.x + team * gridDim.x;
  const int num_teams = gridDim.x * kTeams;
  // Slots of source r < R that are first items (slot * R + r < num_teams): ceil((num_teams - r) / R),
  // from one division here rather than one per call (a division is ~20 instructions).
  const int teams_per_source = L.div_ranks.div(num_teams), teams_left = num_teams - teams_per_source * R;
  auto first_slots = [&](int r) { return teams_per_source + (r < teams_left ? 1 : 0); };
  if constexpr (!kLooked) {
    first_look(p, half, look, s_flag);
    team_sync(team);  // the team's flags (and the look's loads are not waited for)
  }
  HeldMessage<kFp8> held;
  bool first_held = false;
  if (first_item < R * L.max_tokens) {
    const int slot = L.div_ranks.div(first_item), src = first_item - slot * R;
    first_held = !s_masked[src] && direct_region(c, ll, src) != nullptr && ll_signal_is(s_flag[team][half], seq);
    if (first_held) load_message<kFp8>(inbox_region(c, ll, src) + L.dispatch_in(half, src, slot), m, num_scale_words,
                                       p.ue8m0, K, tt, held);
  }

  // 1. Every source's counts block. From the first look when every word is of this call (a hook's
  // receive: the blocks landed long ago): no signal waited for. Otherwise, or when a word is not
  // there yet: the signals, then the blocks. Each source's call hash is checked with the segment
  // begins (step 2).
  const int words_per_source = kCountWordRows + num_local;
  const int num_words = R * words_per_source;
  int counted = 0;
  if (counts_by_look(p)) {  // block-uniform
    int ok = 1;
    if (static_cast<int>(threadIdx.x) < num_words) {
      const int r = L.div_source_words.div(threadIdx.x), j = threadIdx.x - r * words_per_source;
      if (s_masked[r]) {
        ok = 0;
      } else {
        const uint64_t word = half != 0 ? look.count[1] : look.count[0];
        if (!ll_signal_is(word, seq)) ok = 0;
        const int value = ll_signal_count(word);
        if (j == kCountWordHash) {
          s_hash[r] = value;
        } else if (j == kCountWordMessages) {
          s_count[r] = value;
          if (ok && value > L.max_tokens) {  // not from a correct peer: nothing may be read past its inbox
            ll_fail(c, Phase::kLowLatencyBadMessage, r, -1, L.max_tokens, value);
            s_failed = 1;
            ok = 0;  // the other path returns at its barrier: s_failed is 0 wherever the look succeeded
          }
          // The wait statistics get the look's cycles (what wait_sources would add for a count
          // that is there); a look that fails is followed by wait_sources, which adds its own.
          if (ok && blockIdx.x == 0 && p.wait_stats != nullptr)
            atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + r),
                      static_cast<unsigned long long>(clock64() - look.start));
        } else {
          s_begin[r * num_local + j - kCountWordRows] = value;
        }
      }
    }
    counted = __syncthreads_and(ok);
  }
  if (!counted) {
    if (!wait_sources(c, ll, seq, kSignalDispatchTotal, Phase::kLowLatencyDispatchRecv, p.wait_stats, s_masked, s_count,
                      s_failed))
      return;
    // Rows per (source, expert) and each source's call hash, every thread a few words (the signal
    // came after them).
    for (int j = threadIdx.x; j < num_words; j += blockDim.x) {
      const int r = L.div_source_words.div(j), w = j - r * words_per_source;
      if (w == kCountWordMessages) continue;  // the signal's count (s_count)
      int value = 0;
      if (!s_masked[r]) {
        const uint64_t word =
            __ldcg(reinterpret_cast<const unsigned long long*>(inbox_region(c, ll, r) + L.counts(half, r)) + w);
        value = ll_signal_count(word);
        // After the signal every word is of this call: the source is two calls ahead already, or it
        // wrote fewer words (another E: its hash differs too).
        if (!ll_signal_is(word, seq)) {
          if (ll_signal_is_ahead(word, seq))
            ll_fail(c, Phase::kLowLatencyOverrun, r, -1, static_cast<int>(seq), static_cast<int>(word >> 32));
          else
            ll_fail(c, Phase::kLowLatencyCallMismatch, r, -1, p.call_hash & 0x7fffffff, -1);
          s_failed = 1;
        }
      }
      if (w == kCountWordHash) s_hash[r] = s_masked[r] ? (p.call_hash & 0x7fffffff) : value;
      else s_begin[r * num_local + w - kCountWordRows] = value;
    }
    __syncthreads();
    if (s_failed) return;
  }
  trace_mark(&g_dispatch_trace, 6);
  // 2. Each source's call hash (a mismatch is reported here: s_failed gets bit 1, which also marks
  // a failed early expand, reported by expand), and the segment begins (sources in rank order
  // inside each expert; values no correct peer sends: bit 0), under one barrier. Block 0 writes
  // layout_range, recv_count, recv_stats and the plan's header only when every hash matched
  // (recv_stats is the caller's running sum: a call that fails must not add to it); rows of early
  // first messages from sources that made this call may be written before another source's
  // mismatch shows (in bounds; the call fails). Block-wide (every thread calls it
  // once, below); false when the call failed (every thread).
  auto segments = [&]() -> bool {
    const int call_hash = p.call_hash & 0x7fffffff;
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
      if (!s_masked[r] && s_hash[r] != call_hash) {
        ll_fail(c, Phase::kLowLatencyCallMismatch, r, -1, call_hash, s_hash[r]);
        atomicOr(&s_failed, 2);
      }
    }
    bool write_outputs = blockIdx.x == 0;
    if (write_outputs)
      for (int r = 0; r < R; ++r) write_outputs &= s_masked[r] || s_hash[r] == call_hash;
    for (int i = threadIdx.x; i < num_local; i += blockDim.x) {
      int64_t total = 0;
      for (int r = 0; r < R; ++r) {
        const int n = s_begin[r * num_local + i];
        if (n < 0 || n > L.max_tokens) atomicOr(&s_failed, 1);  // not from a correct peer
        if (write_outputs) p.layout_range[int64_t(i) * R + r] = (total << 32) | static_cast<uint32_t>(n);
        s_seg[r * num_local + i] = static_cast<int>(total);
        total += n;
      }
      s_total[i] = static_cast<int>(total);
      if (total > rows_per_expert) atomicOr(&s_failed, 1);  // cannot come from a correct peer
      if (write_outputs) {
        p.recv_count[i] = static_cast<int>(total);
        if (p.recv_stats != nullptr) atomicAdd(p.recv_stats + i, static_cast<int>(total));
      }
    }
    if (threadIdx.x == 0) {
      s_prefix[0] = 0;
      for (int r = 0; r < R; ++r) s_prefix[r + 1] = s_prefix[r] + max(0, s_count[r] - first_slots(r));
    }
    if (write_outputs)
      for (int r = threadIdx.x; r < R; r += blockDim.x) p.plan[r] = s_count[r];
    block_sync_unaligned();  // teams come here from different iterations of the item loop below
    if (s_failed) {
      if (blockIdx.x == 0 && threadIdx.x == 0 && (s_failed & 2) == 0)
        ll_fail(c, Phase::kLowLatencyBadMessage, -1, -1, static_cast<int>(rows_per_expert), -1);
      return false;
    }
    trace_mark(&g_dispatch_trace, 7);
    return true;
  };

  // 3. Expand the messages: one team per item (kTeams per block). The team's thread 0 waits for the
  // message's flag (bounded; in shrink mode a source that stops mid-call is masked and its
  // remaining messages skipped: their rows stay unwritten), unless step 0 saw it; the team's warp 0
  // decodes the meta (target rows, plan, src_info); then every thread stores its words to every
  // target row. Returns false when the call failed here (team-uniform).
  // `from_counts` (the team's first message, expanded before step 2): its segment's begin summed
  // from the sources' counts, bounded so that the row lies in its expert's rows whatever the counts
  // (step 2 then fails a call whose counts no correct peer sends).
  auto expand = [&](int src, int slot, bool is_held, bool is_first, bool from_counts) -> bool {
    const char* msg = inbox_region(c, ll, src) + L.dispatch_in(half, src, slot);
    if (!is_held) {
      if (tt == 0) {
        WaitResult res = WaitResult::kMasked;
        if (!s_masked[src])
          res = wait_flag(c, ll, src, L.dispatch_flag(half, src, slot), seq, Phase::kLowLatencyDispatchRecv,
                          p.wait_stats, s_masked);
        s_arrival[team] = static_cast<int>(res);
      }
      team_sync(team);
      const WaitResult arrival = static_cast<WaitResult>(s_arrival[team]);
      if (arrival == WaitResult::kFailed) return false;
      if (arrival == WaitResult::kMasked) {
        team_sync(team);  // s_arrival is rewritten by the next item
        return true;
      }
      load_message<kFp8>(msg, m, num_scale_words, p.ue8m0, K, tt, held);
    }
    if (is_first) trace_mark(&g_dispatch_trace, 10);  // thread 0: its block's first message is there
    if (tt < 32) {
      const int token = held.token, expert = held.expert, pos = held.pos;
      const int local = (expert >= 0 && L.div_local.div(expert) == c.rank) ? expert - c.rank * num_local : -1;
      int64_t out_row = -1;  // expert * (R*T) + row
      bool bad = token < 0 || token >= L.max_tokens;
      if (local >= 0) {
        int64_t begin = 0, count = 0;
        if (from_counts) {
          for (int r = 0; r < src; ++r) begin += s_begin[r * num_local + local];
          count = s_begin[src * num_local + local];
        } else {
          begin = s_seg[src * num_local + local];
          count = (src + 1 < R ? s_seg[(src + 1) * num_local + local] : s_total[local]) - begin;
        }
        if (pos < 0 || pos >= count || begin < 0 || begin + count > rows_per_expert) bad = true;
        else out_row = int64_t(local) * rows_per_expert + begin + pos;
      }
      bad = __any_sync(0xffffffffu, bad);
      const unsigned targets = __ballot_sync(0xffffffffu, out_row >= 0);
      if (!bad) {
        int* plan = p.plan + ll_plan_entry(R, L.max_tokens, K, src, slot);
        if (lane == 0) plan[0] = token;
        if (lane < K) plan[1 + lane] = static_cast<int>(out_row);
        if (out_row >= 0) {
          p.src_info[out_row] = token;
          const int target = __popc(targets & ((1u << lane) - 1u));
          s_rows[team][target] = out_row;
          // From the parts of out_row, not by dividing it (a 64-bit division is a ~100-instruction
          // call, and each of the team's threads did two per target row).
          s_scale_at[team][target] = int64_t(local) * num_scale_words * rows_per_expert + (out_row - int64_t(local) * rows_per_expert);
        }
      } else if (lane == 0) {
        ll_fail(c, Phase::kLowLatencyBadMessage, src, -1, static_cast<int>(rows_per_expert), pos);
      }
      if (lane == 0) {
        s_num_rows[team] = __popc(targets);
        s_bad_msg[team] = bad ? 1 : 0;
      }
    }
    team_sync(team);
    if (s_bad_msg[team]) return false;
    const int num_rows = s_num_rows[team];
    for (int i = 0; i < num_rows; ++i) {
      int4* to = reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + s_rows[team][i] * m.row_bytes);
#pragma unroll
      for (int u = 0; u < kWordsPerThread<kFp8>; ++u)
        if (tt + u * kTeamThreads < num_int4) to[tt + u * kTeamThreads] = held.words[u];
    }
    if (tt < num_scale_words) {
      for (int i = 0; i < num_rows; ++i) {
        reinterpret_cast<uint32_t*>(p.recv_scales)[s_scale_at[team][i] + int64_t(tt) * rows_per_expert] = held.scale_word;
      }
    }
    if (is_first) trace_mark(&g_dispatch_trace, 11);  // thread 0: that message's rows are stored
    team_sync(team);
    return true;
  };

  // The team's first item (step 0's), if it is a message of this call, then the rest, numbered
  // source-major over what the first items left (s_prefix) and spread over every team: a source
  // that sent many more messages than the others still reaches all teams. A first message that was
  // there at step 0 (a hook's: all of them) is expanded before step 2, whose barrier then no
  // longer sits between the counts and the first rows; every thread runs step 2 once, before its
  // first other item. One call site of expand: its code is large, and code that runs once costs
  // its fetch (scripts/icache_probe.cu).
  const int first_slot = L.div_ranks.div(first_item), first_src = first_item - first_slot * R;
  bool first = first_item < R * L.max_tokens && first_slot < s_count[first_src];  // team-uniform
  // Early only when the message's source made this call (its hash; a mismatch is step 2's to
  // report, by name) and R is small (the begin is a sum over the sources below). Step 1 left
  // s_failed 0 (it returned otherwise); s_failed is not read here, other teams' step 2 may be
  // setting it, and the decision must be the same for the whole team.
  bool early = first && first_held && R <= kEarlyExpandMaxRanks && s_hash[first_src] == (p.call_hash & 0x7fffffff);
  bool segmented = false, failed_early = false;
  int item = blockIdx.x + team * gridDim.x;
#pragma unroll 1
  while (true) {
    if (!early && !segmented) {
      if (failed_early && tt == 0) atomicOr(&s_failed, 2);  // its expand reported the message
      if (!segments()) return;  // every thread
      segmented = true;
    }
    if (!first && item >= s_prefix[R]) break;
    int src = 0, slot = 0;
    if (first) {
      src = first_src;
      slot = first_slot;
    } else {
      while (s_prefix[src + 1] <= item) ++src;
      slot = first_slots(src) + item - s_prefix[src];
      item += num_teams;
    }
    if (!expand(src, slot, first && first_held, first, early)) {  // team-uniform
      if (!early) return;
      failed_early = true;  // step 2's barrier first: the other teams are on their way to it
    }
    first = early = false;
  }

  record_receive_done(ll, kWireDispatch, seq);
  trace_mark(&g_dispatch_trace, 8);
}

}  // namespace

/// One kernel per phase set: a hook's receive runs code with no send path in it (less code to
/// fetch). Its steps cost about the same with and without a GEMM before it (2026-12-01): the
/// receive's time is the instructions on its chain and its round trips (docs/performance.md).
template <bool kFp8, int kPhases>
__global__ void __launch_bounds__(kThreads, 1) dispatch(const __grid_constant__ kernels::LowLatencyDispatchParams p) {
  extern __shared__ int smem[];
  __shared__ EntryState entry;
  __shared__ uint64_t s_first_flag[kTeams][2];
  trace_mark(&g_dispatch_trace, 0);
  // Loads that share the entry's round trip: a send phase's first token, a hook receive's first look.
  constexpr bool kLookAtEntry = kPhases == kLowLatencyReceive;
  FirstLook look;
  TokenLoads first_token;
  auto early_loads = [&] {
    if constexpr ((kPhases & kLowLatencySend) != 0) {
      if (static_cast<int>(blockIdx.x) < p.num_tokens) load_token(p, blockIdx.x, first_token);
    }
    if constexpr (kLookAtEntry) first_look(p, -1, look, s_first_flag);
  };
  if (!kernel_entry(p.comm, p.ll, kPhases, kWireDispatch, p.call_slot, smem, entry, early_loads)) return;
  trace_mark(&g_dispatch_trace, 1);
  if constexpr ((kPhases & kLowLatencySend) != 0) {
    if (!dispatch_send<kFp8>(p, smem, entry, first_token)) return;
  }
  if constexpr ((kPhases & kLowLatencyReceive) != 0)
    dispatch_receive<kFp8, kLookAtEntry>(p, smem, entry, look, s_first_flag);
  trace_mark(&g_dispatch_trace, 9);
}

using DispatchKernel = void (*)(const kernels::LowLatencyDispatchParams);

/// The kernel of (dtype, phases), or nullptr for phases that are not a non-empty set.
inline DispatchKernel dispatch_kernel_for(bool fp8, int phases) {
  switch (phases) {
    case kLowLatencySend: return fp8 ? dispatch<true, kLowLatencySend> : dispatch<false, kLowLatencySend>;
    case kLowLatencyReceive: return fp8 ? dispatch<true, kLowLatencyReceive> : dispatch<false, kLowLatencyReceive>;
    case kLowLatencyBoth: return fp8 ? dispatch<true, kLowLatencyBoth> : dispatch<false, kLowLatencyBoth>;
    default: return nullptr;
  }
}

}  // namespace flashep::ll

namespace flashep::kernels {

/// Shared memory: the receive phase's mask, counts, (source, expert) counts and begins, prefix and hashes, or the send
/// phase's mask, counts per expert and destination, and id chunk, whichever is larger.
inline size_t ll_dispatch_smem(int num_ranks, int num_experts) {
  const size_t receive = size_t(num_ranks) * 4 + 1 + 2 * size_t(num_experts) + size_t(num_experts / num_ranks);
  const size_t send = size_t(num_ranks) * 2 + size_t(num_experts) + 2 * size_t(ll::kCountChunk);
  return (receive > send ? receive : send) * sizeof(int);
}

cudaError_t launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, cudaStream_t stream) {
  const size_t smem = ll_dispatch_smem(p.comm.num_ranks, p.ll.layout.num_experts);
  void (*kernel)(const LowLatencyDispatchParams) = ll::dispatch_kernel_for(p.fp8, p.phases);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  // At most (4 * kMaxRanks + 1 + kMaxLowLatencyExperts * 3) or (2 * kMaxRanks + kMaxLowLatencyExperts +
  // 2 * kCountChunk) ints: below the default 48 KB.
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(num_blocks);
  config.blockDim = dim3(ll::kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  // The divisor of the top-k count, made here so that no caller can leave it unset.
  LowLatencyDispatchParams params = p;
  params.div_topk = FastDivmod::of(p.num_topk);
  return cudaLaunchKernelEx(&config, kernel, params);
}

cudaError_t load_low_latency_dispatch_kernels() {
  cudaFuncAttributes attributes{};
  for (const bool fp8 : {false, true})
    for (const int phases : {int(kLowLatencySend), int(kLowLatencyReceive), int(kLowLatencyBoth)})
      if (const cudaError_t status = cudaFuncGetAttributes(&attributes, ll::dispatch_kernel_for(fp8, phases));
          status != cudaSuccess)
        return status;
  return cudaSuccess;
}

cudaError_t load_low_latency_kernels() {
  const cudaError_t status = load_low_latency_dispatch_kernels();
  return status != cudaSuccess ? status : load_low_latency_combine_kernels();
}

std::vector<uint64_t> take_low_latency_trace(bool combine) {
  return combine ? take_low_latency_combine_trace() : ll::take_trace_stamps(&ll::g_dispatch_trace);
}

}  // namespace flashep::kernels
