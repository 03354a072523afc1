// Low-latency combine (src/core/low_latency_layout.hpp has the wire format).
//
// Send phase: block r first sends rank r our top-k weights [n, K] (a few KB, with a signal). Then,
// on the expert side, one team (half a block) per message of the dispatch (the plan in the
// handle): once that source's weights are there (a bounded wait), it adds the rows of this rank's
// experts for that token, each times its weight (float32, top-k slots in order), and sends the
// BF16 sum to the source, at the token's row of its inbox, then raises the row's own flag. The
// last block only advances the sequence: no signal waits for it.
// Receive phase: one block per token, or per (token, chunk of its row) when the tokens are fewer
// than the blocks; lanes of warp 0 wait for the flags of the ranks its experts live on (bounded; a
// silent rank is masked in shrink mode and its term left out), then the block's threads add those
// ranks' sums (float32) and write the BF16 result.
//
// Per-slot combine (a hooked call whose peers are all direct, p.slot_mode): the send phase must
// not wait for peers (the hook's promise: no SM held while others catch up), and the reduced sums
// need the source's weights, which come only with the source's own combine call. So the expert
// side sends each expert row as it is (BF16 or LogFMT) to the source's (token, top-k slot) row,
// with that row's own flag, and the receive phase multiplies by its own weights and adds. More
// bytes (one row per (token, expert), as DeepEP sends), no dependency on the peers' calls.
#include <cuda_bf16.h>

#include "core/logfmt.hpp"
#include "kernels/low_latency_common.cuh"
#include "kernels/low_latency_trace.cuh"

namespace flashep::ll {

namespace {

/// Diagnostics builds: the timeline (kernels::kLowLatencyCombineTrace names the points).
__device__ TraceStamps g_combine_trace = {{~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull}, {}};

/// Teams of the expert-side sums: half a block each (a team keeps kMaxLowLatencyHidden / 8 /
/// kSumTeamThreads words of float32 partial sums per thread).
constexpr int kSumTeams = 2;
constexpr int kSumTeamThreads = kThreads / kSumTeams;

/// Adds 8 BF16 values (16 bytes) times `weight` into acc.
__device__ __forceinline__ void fma_bf16x8(float* acc, const int4& v, float weight) {
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = fmaf(weight, __bfloat162float(h[j]), acc[j]);
}
__device__ __forceinline__ void add_bf16x8(float* acc, const int4& v) {
  const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] += __bfloat162float(h[j]);
}
__device__ __forceinline__ int4 to_bf16x8(const float* acc) {
  int4 out;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
  return out;
}

/// LogFMT-10 (src/core/logfmt.hpp): thread w holds channels 8w..8w+7, run w % 16 of group w / 16;
/// the 16 threads of a group are one half warp (uniformly active: H % 128 == 0). Out of line (both
/// functions): the BF16 path, inlined, stays short (the kernels run from a cold instruction cache).
/// Eight float32 values by value: the out-of-line LogFMT functions take and return them in
/// registers (a pointer would put the callers' sums on the stack, BF16 path included).
struct Floats8 {
  float v[8];
};

static __device__ __noinline__ void store_logfmt(char* row, int hidden, int w, Floats8 sums) {
  const float* acc = sums.v;
  float amax = 0.0f, amin = INFINITY;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float a = fabsf(acc[j]);
    if (a != a) a = INFINITY;  // NaN: the group travels as BF16, which keeps it
    amax = fmaxf(amax, a);
    if (a != 0.0f) amin = fminf(amin, a);
  }
  // The half warp of this group: all 16 lanes run this together (a half warp is uniformly inside
  // or outside the row, H being a multiple of 128).
  const unsigned mask = 0xffffu << (threadIdx.x & 16u);
#pragma unroll
  for (int m = 8; m >= 1; m >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(mask, amax, m));
    amin = fminf(amin, __shfl_xor_sync(mask, amin, m));
  }
  const LogfmtParams params = logfmt_params(amax, amin);
  const int group = w / 16, run = w % 16;
  if (params.step >= 0.0f) {
    uint16_t words[5];
    logfmt_encode8(acc, params, words);
    uint16_t* to = reinterpret_cast<uint16_t*>(row + int64_t(group) * kLogfmtGroupBytes + run * kLogfmtRunBytes);
#pragma unroll
    for (int i = 0; i < 5; ++i) to[i] = words[i];
  } else {
    reinterpret_cast<int4*>(row)[w] = to_bf16x8(acc);
  }
  if (run == 0) reinterpret_cast<float2*>(row + int64_t(hidden) * 2)[group] = make_float2(params.log_min, params.step);
}

/// The eight values of channels 8w..8w+7 of a LogFMT-10 row.
static __device__ __noinline__ Floats8 load_logfmt(const char* row, int hidden, int w) {
  Floats8 out;
  const int group = w / 16, run = w % 16;
  const float2 meta = __ldcg(reinterpret_cast<const float2*>(row + int64_t(hidden) * 2) + group);
  if (meta.y >= 0.0f) {
    const uint16_t* from = reinterpret_cast<const uint16_t*>(row + int64_t(group) * kLogfmtGroupBytes + run * kLogfmtRunBytes);
    uint16_t words[5];
#pragma unroll
    for (int i = 0; i < 5; ++i) words[i] = __ldcg(reinterpret_cast<const unsigned short*>(from + i));
    logfmt_decode8(words, LogfmtParams{meta.x, meta.y}, out.v);
  } else {
    const int4 v = device::ld_ring(reinterpret_cast<const int4*>(row) + w);
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) out.v[j] = __bfloat162float(h[j]);
  }
  return out;
}

/// Block r sends rank r our weights block (every thread a few words): the call hash, then (with
/// `weights`) the top-k weights [n][K]; then the signal (a release after the block's stores, or
/// one put-with-signal of the staged block). The per-slot combine sends the hash alone, so that a
/// peer in a reduced combine of the same call fails with a named mismatch instead of waiting.
__device__ __forceinline__ void send_weights(const kernels::LowLatencyCombineParams& p, const int* s_masked,
                                             uint32_t seq, int half, bool weights) {
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int R = c.num_ranks, warp = threadIdx.x / 32;
  const int weight_words = weights ? p.num_tokens * p.num_topk : 0;
  for (int r = blockIdx.x; r < R; r += gridDim.x) {
    if (s_masked[r]) continue;  // block-uniform
    char* region = direct_region(c, ll, r);
    // NVSHMEM peers share one staged copy: blocks of several peers store identical bytes.
    int* block = reinterpret_cast<int*>(region != nullptr ? region + L.weights(half, c.rank) : ll.sym + L.weights_stage(half));
    float* to = reinterpret_cast<float*>(block + 4);
#pragma unroll 4
    for (int i = threadIdx.x; i < weight_words; i += blockDim.x) to[i] = __ldg(p.topk_weights + i);
    if (threadIdx.x == 0) block[0] = p.call_hash;
    __syncthreads();
    const uint64_t signal = ll_signal(seq, p.num_tokens);
    if (region != nullptr) {
      if (threadIdx.x == 0)
        device::st_release_sys_u64(reinterpret_cast<uint64_t*>(region + L.combine_weights(half, c.rank)), signal);
    } else if (warp == 0) {
      warp_put_signal(ll, r, L.weights(half, c.rank), L.weights_stage(half), 16 + int64_t(weight_words) * 4,
                      L.combine_weights(half, c.rank), signal, false);
    }
  }
}

/// Block-wide, before a combine's expert side: the dispatch plan's message counts per source as a
/// prefix in `s_prefix` [R + 1] (masked sources count 0). False (every thread) when the plan is
/// not one of a finished dispatch of this shape (block 0 records the failure).
__device__ __forceinline__ bool read_plan(const kernels::LowLatencyCombineParams& p, const int* s_masked, int* s_prefix) {
  const int R = p.comm.num_ranks, T = p.ll.layout.max_tokens;
  __shared__ int s_bad_plan;
  if (threadIdx.x == 0) {
    s_prefix[0] = 0;
    s_bad_plan = -1;
    for (int r = 0; r < R; ++r) {
      const int n = p.plan[r];
      if (n < 0 || n > T) s_bad_plan = r;
      s_prefix[r + 1] = s_prefix[r] + (s_masked[r] || n < 0 || n > T ? 0 : n);
    }
  }
  __syncthreads();
  if (s_bad_plan < 0) return true;
  if (blockIdx.x == 0 && threadIdx.x == 0) ll_fail(p.comm, Phase::kLowLatencyBadMessage, s_bad_plan, -1, T, p.plan[s_bad_plan]);
  return false;
}

/// Block-wide end of a combine's send phase. A team that failed stops the whole block (the other
/// team's waits end on the abort it raised): no half block may go on to the receive phase with its
/// shared state unset. The last block (nobody waits for it) advances the sequence.
__device__ __forceinline__ bool end_combine_send(const kernels::LowLatencyCombineParams& p, int* s_masked,
                                                 const int& s_send_failed, uint32_t seq, int wire) {
  __syncthreads();
  if (s_send_failed) return false;
  reset_previous_counters(p.ll, static_cast<int>(seq & 1u));  // the previous call may have been a dispatch
  trace_mark(&g_combine_trace, 4);
  if (last_block_done(&state_of(p.ll)->ticket[kTicketCombineSend], p.ll.sym != nullptr)) {
    trace_mark(&g_combine_trace, 5);
    finish_send_phase(p.comm, p.ll, s_masked, p.call_slot, seq, wire);
  }
  return true;
}

/// Block-wide send phase. Returns false when the call failed here.
__device__ __forceinline__ bool combine_send(const kernels::LowLatencyCombineParams& p, int* smem, EntryState& entry) {
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int R = c.num_ranks, K = p.num_topk, T = L.max_tokens, H = L.hidden;
  const int lane = threadIdx.x % 32;
  const uint32_t seq = entry.send_seq;
  const int half = static_cast<int>(seq & 1u);
  int* s_masked = smem;           // [R]
  int* s_prefix = smem + R;       // [R + 1] plan messages per source

  // 1. Our weights: block r to rank r.
  send_weights(p, s_masked, seq, half, true);
  trace_mark(&g_combine_trace, 2);
  // 2. The expert side: one weighted sum per message of the dispatch, one team (half a block) per
  // message. The team's thread 0 waits for the source's weights (once per source and team), its
  // warp 0 gathers the rows and weights, then every thread sums its 16-byte words over the rows,
  // two rows' loads in flight at a time.
  const int team = threadIdx.x / kSumTeamThreads, tt = threadIdx.x % kSumTeamThreads;
  __shared__ int s_rows[kSumTeams][kMaxTopk];
  __shared__ float s_weights[kSumTeams][kMaxTopk];
  __shared__ int s_num_rows[kSumTeams], s_token[kSumTeams], s_status[kSumTeams], s_ready_src[kSumTeams];
  __shared__ int s_weight_tokens[kSumTeams];  // tokens in s_ready_src's weights (its combine's n)
  __shared__ int s_send_failed;               // any team failed: the whole block stops (below)
  if (tt == 0) s_ready_src[team] = -1;
  if (threadIdx.x == 0) s_send_failed = 0;
  if (!read_plan(p, s_masked, s_prefix)) return false;  // its barrier publishes these too
  trace_mark(&g_combine_trace, 3);
  const int total = s_prefix[R];
  const int64_t num_rows_x = int64_t(L.num_local_experts()) * L.rows_per_expert();
  const int num_int4 = H / 8;
  constexpr int kWordsPerThread = kMaxLowLatencyHidden / 8 / kSumTeamThreads;
  // Items spread over the blocks first, so that a few messages still use many SMs.
  for (int item = blockIdx.x + team * gridDim.x; item < total; item += gridDim.x * kSumTeams) {
    int src = 0;
    while (s_prefix[src + 1] <= item) ++src;
    const int slot = item - s_prefix[src];
    char* inbox = inbox_region(c, ll, src);
    if (tt == 0) {
      int status = static_cast<int>(WaitResult::kArrived);
      if (s_masked[src]) {
        status = static_cast<int>(WaitResult::kMasked);  // masked by this block earlier
      } else if (s_ready_src[team] != src) {
        uint64_t value = 0;
        status = static_cast<int>(wait_word(c, ll, reinterpret_cast<const uint64_t*>(inbox + L.combine_weights(half, src)),
                                            seq, Phase::kLowLatencyCombineWeights, src, &value,
                                            direct_region(c, ll, src) == nullptr));
        if (status == static_cast<int>(WaitResult::kArrived)) {
          const int hash = __ldcg(reinterpret_cast<const int*>(inbox + L.weights(half, src)));
          if (hash != p.call_hash) {
            ll_fail(c, Phase::kLowLatencyCallMismatch, src, -1, p.call_hash, hash);
            status = static_cast<int>(WaitResult::kFailed);
          } else {
            s_ready_src[team] = src;
            const int n = ll_signal_count(value);
            s_weight_tokens[team] = n < T ? n : T;
          }
        } else if (status == static_cast<int>(WaitResult::kMasked)) {
          s_masked[src] = 1;
        }
      }
      s_status[team] = status;
    }
    team_sync(team, kSumTeamThreads);
    if (s_status[team] == static_cast<int>(WaitResult::kFailed)) {  // team-uniform
      if (tt == 0) s_send_failed = 1;
      break;
    }
    if (s_status[team] == static_cast<int>(WaitResult::kMasked)) {
      team_sync(team, kSumTeamThreads);  // s_status is rewritten by the next item
      continue;
    }
    if (tt < 32) {
      const int* entry = p.plan + ll_plan_entry(R, T, K, src, slot);
      const int token = entry[0];
      const int row = lane < K ? entry[1 + lane] : -1;
      // The token must be one of the source's combine (its weights' n), not only of the dispatch.
      const int num_tokens = s_weight_tokens[team];
      const bool valid = row >= 0 && row < num_rows_x && token >= 0 && token < num_tokens;
      const unsigned rows = __ballot_sync(0xffffffffu, valid);
      if (valid) {
        const int i = __popc(rows & ((1u << lane) - 1u));
        s_rows[team][i] = row;
        s_weights[team][i] = __ldcg(reinterpret_cast<const float*>(inbox + L.weights(half, src) + 16) + token * K + lane);
      }
      if (lane == 0) {
        s_num_rows[team] = (token >= 0 && token < num_tokens) ? __popc(rows) : -1;
        s_token[team] = token;
      }
    }
    team_sync(team, kSumTeamThreads);
    const int num_rows = s_num_rows[team], token = s_token[team];
    if (num_rows < 0) {  // a plan entry outside the tensors, or a token the source's combine lacks
      if (tt == 0) {
        ll_fail(c, Phase::kLowLatencyBadMessage, src, -1, s_weight_tokens[team], token);
        s_send_failed = 1;
      }
      break;  // team-uniform
    }
    char* region = direct_region(c, ll, src);
    char* dst = region != nullptr ? region + L.combine_in(half, c.rank, token, p.logfmt)
                                  : ll.sym + L.combine_stage(half, src, slot, p.logfmt);
    float acc[kWordsPerThread][8];
#pragma unroll
    for (int u = 0; u < kWordsPerThread; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = 0.0f;
    const int4* x = reinterpret_cast<const int4*>(p.x);
    for (int k = 0; k < num_rows; k += 2) {
      const bool second = k + 1 < num_rows;
      const int4* row0 = x + int64_t(s_rows[team][k]) * num_int4;
      const int4* row1 = x + int64_t(s_rows[team][second ? k + 1 : k]) * num_int4;
      int4 v0[kWordsPerThread], v1[kWordsPerThread];
#pragma unroll
      for (int u = 0; u < kWordsPerThread; ++u) {
        const int w = tt + u * kSumTeamThreads;
        v0[u] = w < num_int4 ? device::ld_stream(row0 + w) : make_int4(0, 0, 0, 0);
        v1[u] = w < num_int4 && second ? device::ld_stream(row1 + w) : make_int4(0, 0, 0, 0);
      }
      const float w0 = s_weights[team][k], w1 = second ? s_weights[team][k + 1] : 0.0f;
#pragma unroll
      for (int u = 0; u < kWordsPerThread; ++u) {
        fma_bf16x8(acc[u], v0[u], w0);
        if (second) fma_bf16x8(acc[u], v1[u], w1);
      }
    }
#pragma unroll
    for (int u = 0; u < kWordsPerThread; ++u) {
      const int w = tt + u * kSumTeamThreads;
      if (w >= num_int4) continue;  // uniform per half warp (H % 128 == 0)
      if (p.logfmt) {
        Floats8 sums;
#pragma unroll
        for (int j = 0; j < 8; ++j) sums.v[j] = acc[u][j];
        store_logfmt(dst, H, w, sums);
      }
      else reinterpret_cast<int4*>(dst)[w] = to_bf16x8(acc[u]);
    }
    team_sync(team, kSumTeamThreads);
    // The row's flag, after every thread's stores (the team barrier orders them before the
    // system-scope release); NVSHMEM sources: the put's signal is the flag.
    const uint64_t flag = ll_signal(seq, 0);
    if (region != nullptr) {
      if (tt == 0) device::st_release_sys_u64(reinterpret_cast<uint64_t*>(region + L.combine_flag(half, c.rank, token)), flag);
    } else if (tt < 32) {
      warp_put_signal(ll, src, L.combine_in(half, c.rank, token, p.logfmt), L.combine_stage(half, src, slot, p.logfmt),
                      p.logfmt ? L.combine_row_bytes() : int64_t(H) * 2, L.combine_flag(half, c.rank, token), flag, false);
    }
  }

  // 3. The end (the last block advances the sequence).
  return end_combine_send(p, s_masked, s_send_failed, seq, kWireCombineReduced);
}

/// Block-wide: words [word_begin, word_end) of token t's output row, the BF16 rounding of the
/// float32 sum of `num_parts` rows (BF16, or LogFMT-10 with p.logfmt), in order, each times its
/// weight when kWeighted. word_begin is a multiple of 16 (LogFMT groups are whole half warps).
template <bool kWeighted>
__device__ __forceinline__ void add_parts(const kernels::LowLatencyCombineParams& p, const char* const* parts,
                                          const float* weights, int num_parts, int t, int word_begin, int word_end) {
  const int H = p.ll.layout.hidden, num_int4 = H / 8;
  for (int w = word_begin + static_cast<int>(threadIdx.x); w < word_end; w += kThreads) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int d0 = 0; d0 < num_parts; d0 += 8) {
      int4 v[8];
#pragma unroll
      for (int d = 0; d < 8; ++d)
        if (d0 + d < num_parts && !p.logfmt) v[d] = device::ld_ring(reinterpret_cast<const int4*>(parts[d0 + d]) + w);
#pragma unroll
      for (int d = 0; d < 8; ++d) {
        if (d0 + d >= num_parts) continue;
        if (p.logfmt) {
          const Floats8 part = load_logfmt(parts[d0 + d], H, w);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] = kWeighted ? fmaf(weights[d0 + d], part.v[j], acc[j]) : acc[j] + part.v[j];
        } else if (kWeighted) {
          fma_bf16x8(acc, v[d], weights[d0 + d]);
        } else {
          add_bf16x8(acc, v[d]);
        }
      }
    }
    reinterpret_cast<int4*>(p.out)[int64_t(t) * num_int4 + w] = to_bf16x8(acc);
  }
}

/// Block-wide send phase of the per-slot combine. Returns false when the call failed here.
__device__ __forceinline__ bool combine_send_slots(const kernels::LowLatencyCombineParams& p, int* smem,
                                                   EntryState& entry) {
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int R = c.num_ranks, K = p.num_topk, T = L.max_tokens, H = L.hidden;
  const int lane = threadIdx.x % 32;
  const uint32_t seq = entry.send_seq;
  const int half = static_cast<int>(seq & 1u);
  int* s_masked = smem;      // [R]
  int* s_prefix = smem + R;  // [R + 1] plan messages per source

  // The call hash alone (no weights: this wire does not need them) to every rank.
  send_weights(p, s_masked, seq, half, false);
  trace_mark(&g_combine_trace, 2);
  const int team = threadIdx.x / kSumTeamThreads, tt = threadIdx.x % kSumTeamThreads;
  __shared__ int s_rows[kSumTeams][kMaxTopk], s_slots[kSumTeams][kMaxTopk];
  __shared__ int s_num_rows[kSumTeams], s_token[kSumTeams];
  __shared__ int s_send_failed;
  if (threadIdx.x == 0) s_send_failed = 0;
  if (!read_plan(p, s_masked, s_prefix)) return false;  // its barrier publishes s_send_failed too
  trace_mark(&g_combine_trace, 3);
  const int total = s_prefix[R];
  const int64_t num_rows_x = int64_t(L.num_local_experts()) * L.rows_per_expert();
  const int num_int4 = H / 8;
  // One team per message, up to kRowsInFlight rows' loads in flight at once (each row is its own
  // item at the destination: copied, then flagged). Two rows at a time cost a message of 4 rows
  // two round trips; a whole block per message would halve the messages in flight when there are
  // more messages than teams (R = 8: ~1.5 rows per message).
  constexpr int kWordsPerThread = kMaxLowLatencyHidden / 8 / kSumTeamThreads;
  constexpr int kRowsInFlight = 3;
  const int4* x = reinterpret_cast<const int4*>(p.x);
  // The call hash rides in each flag's count bits: a rank that made another call fails by name.
  const uint64_t flag = ll_signal(seq, p.call_hash);
  // One team per message of the dispatch, items spread over the blocks first.
  for (int item = blockIdx.x + team * gridDim.x; item < total; item += gridDim.x * kSumTeams) {
    int src = 0;
    while (s_prefix[src + 1] <= item) ++src;
    const int slot = item - s_prefix[src];
    if (tt < 32) {
      const int* entry_ints = p.plan + ll_plan_entry(R, T, K, src, slot);
      const int token = entry_ints[0];
      const int row = lane < K ? entry_ints[1 + lane] : -1;
      const bool token_ok = token >= 0 && token < T;
      const bool valid = token_ok && row >= 0 && row < num_rows_x;
      const unsigned rows = __ballot_sync(0xffffffffu, valid);
      if (valid) {
        const int i = __popc(rows & ((1u << lane) - 1u));
        s_rows[team][i] = row;
        s_slots[team][i] = lane;
      }
      if (lane == 0) {
        s_num_rows[team] = token_ok ? __popc(rows) : -1;
        s_token[team] = token;
      }
    }
    team_sync(team, kSumTeamThreads);
    const int num_rows = s_num_rows[team], token = s_token[team];
    if (num_rows < 0) {  // a plan entry outside the tensors: not from a finished dispatch
      if (tt == 0) {
        ll_fail(c, Phase::kLowLatencyBadMessage, src, -1, T, token);
        s_send_failed = 1;
      }
      break;  // team-uniform
    }
    char* region = direct_region(c, ll, src);  // every peer is direct in this mode
    for (int i0 = 0; i0 < num_rows; i0 += kRowsInFlight) {
      int4 v[kRowsInFlight][kWordsPerThread];
#pragma unroll
      for (int r = 0; r < kRowsInFlight; ++r) {
        const int4* row = x + int64_t(s_rows[team][i0 + r < num_rows ? i0 + r : i0]) * num_int4;
#pragma unroll
        for (int u = 0; u < kWordsPerThread; ++u) {
          const int w = tt + u * kSumTeamThreads;
          v[r][u] = i0 + r < num_rows && w < num_int4 ? device::ld_stream(row + w) : make_int4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsInFlight; ++r) {
        if (i0 + r >= num_rows) break;  // team-uniform
        char* dst = region + L.combine_slot_in(half, token, s_slots[team][i0 + r], p.logfmt);
#pragma unroll
        for (int u = 0; u < kWordsPerThread; ++u) {
          const int w = tt + u * kSumTeamThreads;
          if (w >= num_int4) continue;  // uniform per half warp (H % 128 == 0)
          if (p.logfmt) {
            Floats8 values;
#pragma unroll
            for (int q = 0; q < 8; ++q) values.v[q] = 0.0f;
            add_bf16x8(values.v, v[r][u]);
            store_logfmt(dst, H, w, values);
          } else {
            reinterpret_cast<int4*>(dst)[w] = v[r][u];
          }
        }
      }
    }
    team_sync(team, kSumTeamThreads);
    // Each row's flag, after every thread's stores (the team barrier orders them before the
    // system-scope releases).
    if (tt < num_rows)
      device::st_release_sys_u64(reinterpret_cast<uint64_t*>(region + L.combine_slot_flag(half, token, s_slots[team][tt])),
                                 flag);
    team_sync(team, kSumTeamThreads);  // s_rows / s_slots are rewritten by the next item
  }

  return end_combine_send(p, s_masked, s_send_failed, seq, kWireCombineSlots);
}

/// Lane k of warp 0's view of top-k slot k of a token: its expert id (-1 past K) and, for the
/// per-slot combine, its weight (the weight is loaded with the id, not after the slot's flag: one
/// round trip less on the receive's chain).
struct TokenSlots {
  int token = -1;  // the token these are of (-1: none loaded)
  int64_t expert = -1;
  float weight = 0.0f;
};

template <bool kSlots>
__device__ __forceinline__ void load_token_slots(const kernels::LowLatencyCombineParams& p, int t, TokenSlots& slots) {
  const int lane = static_cast<int>(threadIdx.x);  // warp 0
  const int K = p.num_topk;
  slots.token = t;
  slots.expert = lane < K ? __ldg(p.topk_idx + int64_t(t) * K + lane) : -1;
  if constexpr (kSlots) slots.weight = lane < K ? __ldg(p.topk_weights + int64_t(t) * K + lane) : 0.0f;
}

/// Block-wide receive phase: one block per (token, chunk) item (p.div_chunks, p.chunk_words: whole
/// rows unless the tokens are fewer than the blocks); lane k of warp 0 takes top-k slot k.
/// - Reduced combine: the first lane of each rank its experts live on waits for that rank's partial
///   sum; the sums that came are added.
/// - Per-slot combine (kSlots): each lane whose expert is not masked waits for its slot's row and
///   checks the call hash in the row's flag; weight x row is added over the slots that came, in slot
///   order.
/// The waits are bounded; in shrink mode a silent rank is masked and its terms left out. Sums in
/// float32, the result rounded to BF16 once.
template <bool kSlots>
__device__ __forceinline__ void combine_receive(const kernels::LowLatencyCombineParams& p, int* smem, EntryState& entry,
                                                const TokenSlots& entry_slots) {
  const DeviceComm& c = p.comm;
  const LowLatencyComm& ll = p.ll;
  const LowLatencyLayout& L = ll.layout;
  const int K = p.num_topk, num_local = L.num_local_experts();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t seq = entry.recv_seq;
  const int half = static_cast<int>(seq & 1u);
  int* s_masked = smem;  // [R]
  __shared__ const char* s_parts[32];
  __shared__ float s_part_weights[32];
  __shared__ int s_num_parts, s_part_failed;
  // Items (token, chunk of its row): p.div_chunks divides by the chunks per token.
  const int num_chunks = static_cast<int>(p.div_chunks.divisor), num_words = L.hidden / 8;
  const int num_items = p.num_tokens * num_chunks;
  for (int item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int t = p.div_chunks.div(item);
    const int chunk = item - t * num_chunks;
    if (warp == 0) {
      // The block's first token's slots came with the kernel entry's loads (a hook's receive).
      TokenSlots slots = entry_slots;
      if (t != entry_slots.token) load_token_slots<kSlots>(p, t, slots);
      const int64_t expert = slots.expert;
      // 32-bit division once the id is known to be in range (a 64-bit one is a call).
      int dst = (expert >= 0 && expert < L.num_experts) ? L.div_local.div(static_cast<int>(expert)) : -1;
      if (dst >= 0 && s_masked[dst]) dst = -1;
      // The first lane of each rank (the wait statistics count a (token, rank) once either way).
      bool first = dst >= 0;
      for (int k = 0; k < K; ++k) {
        const int other = __shfl_sync(0xffffffffu, dst, k);
        if (k < lane && other == dst) first = false;
      }
      WaitResult res = WaitResult::kMasked;
      if (kSlots ? dst >= 0 : first) {
        uint64_t value = 0;
        res = wait_flag(c, ll, dst, kSlots ? L.combine_slot_flag(half, t, lane) : L.combine_flag(half, dst, t), seq,
                        Phase::kLowLatencyCombineRecv, first && chunk == 0 ? p.wait_stats : nullptr, s_masked,
                        &value);
        if constexpr (kSlots) {
          const int hash = p.call_hash & 0x7fffffff;
          if (res == WaitResult::kArrived && ll_signal_count(value) != hash) {
            ll_fail(c, Phase::kLowLatencyCallMismatch, dst, -1, hash, ll_signal_count(value));
            res = WaitResult::kFailed;
          }
        }
      }
      const unsigned came = __ballot_sync(0xffffffffu, res == WaitResult::kArrived);
      const bool failed = __any_sync(0xffffffffu, res == WaitResult::kFailed);
      if (res == WaitResult::kArrived) {
        const int i = __popc(came & ((1u << lane) - 1u));
        s_parts[i] = inbox_region(c, ll, dst) +
                     (kSlots ? L.combine_slot_in(half, t, lane, p.logfmt) : L.combine_in(half, dst, t, p.logfmt));
        if (kSlots) s_part_weights[i] = slots.weight;
      }
      if (lane == 0) {
        s_num_parts = __popc(came);
        s_part_failed = failed ? 1 : 0;
      }
    }
    __syncthreads();
    if (item == static_cast<int>(blockIdx.x)) trace_mark(&g_combine_trace, 8);  // the block's first item's parts are there
    if (s_part_failed) return;
    const int word_begin = chunk * p.chunk_words;
    add_parts<kSlots>(p, s_parts, s_part_weights, s_num_parts, t, word_begin, min(word_begin + p.chunk_words, num_words));
    __syncthreads();
    if (item == static_cast<int>(blockIdx.x)) trace_mark(&g_combine_trace, 9);  // the block's first item is added
  }
  record_receive_done(ll, kSlots ? kWireCombineSlots : kWireCombineReduced, seq);
  trace_mark(&g_combine_trace, 6);
}

}  // namespace

/// One kernel per phase set and wire: a hook's receive runs code with no send path in it, and a
/// launched kernel carries one wire (kSlots: the per-slot combine, hooked calls only).
template <int kPhases, bool kSlots>
__global__ void __launch_bounds__(kThreads, 1) combine(const __grid_constant__ kernels::LowLatencyCombineParams p) {
  static_assert(!kSlots || kPhases != kLowLatencyBoth, "the per-slot wire is for hooked calls");
  extern __shared__ int smem[];
  __shared__ EntryState entry;
  trace_mark(&g_combine_trace, 0);
  // A hook's receive loads its first token's slots with the entry's loads (they share its round
  // trip); a fused kernel's receive comes after the send, which would hold them in registers.
  TokenSlots entry_slots;
  auto early_loads = [&] {
    if constexpr (kPhases == kLowLatencyReceive) {
      const int item = static_cast<int>(blockIdx.x);
      if (threadIdx.x < 32 && item < p.num_tokens * static_cast<int>(p.div_chunks.divisor))
        load_token_slots<kSlots>(p, p.div_chunks.div(item), entry_slots);
    }
  };
  if (!kernel_entry(p.comm, p.ll, kPhases, kSlots ? kWireCombineSlots : kWireCombineReduced, p.call_slot, smem, entry,
                    early_loads))
    return;
  trace_mark(&g_combine_trace, 1);
  if constexpr ((kPhases & kLowLatencySend) != 0) {
    bool ok;
    if constexpr (kSlots) ok = combine_send_slots(p, smem, entry);
    else ok = combine_send(p, smem, entry);
    if (!ok) return;
  }
  if constexpr ((kPhases & kLowLatencyReceive) != 0) combine_receive<kSlots>(p, smem, entry, entry_slots);
  trace_mark(&g_combine_trace, 7);
}

using CombineKernel = void (*)(const kernels::LowLatencyCombineParams);

/// The kernel of (phases, wire), or nullptr for phases that are not a non-empty set (or the
/// per-slot wire with both phases).
inline CombineKernel combine_kernel_for(int phases, bool slots) {
  switch (phases) {
    case kLowLatencySend: return slots ? combine<kLowLatencySend, true> : combine<kLowLatencySend, false>;
    case kLowLatencyReceive: return slots ? combine<kLowLatencyReceive, true> : combine<kLowLatencyReceive, false>;
    case kLowLatencyBoth: return slots ? nullptr : combine<kLowLatencyBoth, false>;
    default: return nullptr;
  }
}

}  // namespace flashep::ll

namespace flashep::kernels {

cudaError_t launch_low_latency_combine(const LowLatencyCombineParams& params, int num_blocks, cudaStream_t stream) {
  LowLatencyCombineParams p = params;
  // Shrink mode keeps one block per token: blocks decide alone which ranks' terms came, and the
  // chunks of one row must not disagree about a rank masked while they waited.
  const LowLatencyReceiveSplit split =
      p.ll.shrink ? LowLatencyReceiveSplit{1, p.ll.layout.hidden / 8}
                  : ll_combine_receive_split(p.num_tokens, num_blocks, p.ll.layout.hidden / 8);
  p.chunk_words = split.chunk_words;
  p.div_chunks = FastDivmod::of(split.chunks);
  const size_t smem = (size_t(p.comm.num_ranks) * 2 + 1) * sizeof(int);  // mask, plan prefix
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
  const ll::CombineKernel kernel = ll::combine_kernel_for(p.phases, p.slot_mode != 0);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  return cudaLaunchKernelEx(&config, kernel, p);
}

cudaError_t load_low_latency_combine_kernels() {
  cudaFuncAttributes attributes{};
  for (const int phases : {int(kLowLatencySend), int(kLowLatencyReceive), int(kLowLatencyBoth)})
    for (const bool slots : {false, true})
      if (const ll::CombineKernel kernel = ll::combine_kernel_for(phases, slots); kernel != nullptr)
        if (const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel); status != cudaSuccess) return status;
  return cudaSuccess;
}

std::vector<uint64_t> take_low_latency_combine_trace() { return ll::take_trace_stamps(&ll::g_combine_trace); }

}  // namespace flashep::kernels
