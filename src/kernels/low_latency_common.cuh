// Device helpers of the low-latency kernels: where a peer's region is, how data and signals reach
// it (direct stores, or NVSHMEM puts), and the bounded waits that mask a silent peer in shrink mode.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/low_latency_launch.hpp"
#include "kernels/peer_transport.cuh"  // failure.cuh, and the NVSHMEM headers in builds with it

namespace flashep::ll {

using kernels::LowLatencyComm;

// Cold paths out of line. The low-latency kernels run once per call from a cold instruction cache
// (a GEMM runs in between), so every byte of code between the hot instructions costs fetch time;
// the failure paths (error record, abort of the peers, the shrink-mode warning) are called, not
// inlined at each of their sites. The kernels take their parameters as __grid_constant__, so the
// references passed here point into the parameter space (no copy).

/// This rank's own failure (device::fail, out of line).
static __device__ __noinline__ void ll_fail(const DeviceComm& c, Phase phase, int peer, int channel, int expected, int observed) {
  device::fail(c, phase, peer, channel, expected, observed);
}
/// Records (once) that this rank stopped in `phase` because a peer aborted (out of line).
static __device__ __noinline__ void ll_record_abort(const DeviceComm& c, int abort, Phase phase) {
  device::stop_if_aborted(c, abort, phase);
}
/// device::stop_if_aborted with the record out of line.
__device__ __forceinline__ bool ll_stop_if_aborted(const DeviceComm& c, int abort, Phase phase) {
  if (abort == 0) return false;
  ll_record_abort(c, abort, phase);
  return true;
}

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
/// Teams: kTeamThreads consecutive threads (whole warps) of a block that work on one item on their
/// own, so a block has kTeams items in flight (a message's few kilobytes cannot keep 512 threads'
/// loads in flight, and items one after another cost a round trip each).
constexpr int kTeams = 4;
constexpr int kTeamThreads = kThreads / kTeams;
/// Barrier of team `team`'s `threads` threads only (named barriers 1..; 0 is __syncthreads).
__device__ __forceinline__ void team_sync(int team, int threads = kTeamThreads) {
  asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(threads) : "memory");
}

/// Barrier 0 of the whole block that warps may reach from different places or loop iterations
/// (barrier.sync without .aligned; __syncthreads is the aligned form, which requires every thread
/// of the block to take the same path to it). Same memory ordering as __syncthreads.
__device__ __forceinline__ void block_sync_unaligned() { asm volatile("barrier.sync 0;" ::: "memory"); }

/// This rank's region for `peer`'s writes when `peer` is reached directly (this rank's or an
/// NVLink-domain peer's mapped region), else nullptr (an NVSHMEM peer).
__device__ __forceinline__ char* direct_region(const DeviceComm& c, const LowLatencyComm& ll, int peer) {
  if (peer == c.rank) return ll.local;
  if (!c.is_nvl_peer(peer)) return nullptr;
  return ll.nvl_peer[c.nvl_index(peer)];
}
/// Where messages from `src` land in our memory: the primary region for direct peers, the
/// symmetric region for NVSHMEM peers.
__device__ __forceinline__ char* inbox_region(const DeviceComm& c, const LowLatencyComm& ll, int src) {
  return direct_region(c, ll, src) != nullptr ? ll.local : ll.sym;
}

__device__ __forceinline__ LowLatencyState* state_of(const LowLatencyComm& ll) {
  return reinterpret_cast<LowLatencyState*>(ll.local + ll.layout.state());
}
__device__ __forceinline__ int* local_int(const LowLatencyComm& ll, int64_t offset) {
  return reinterpret_cast<int*>(ll.local + offset);
}
__device__ __forceinline__ uint32_t ld_volatile_u32(const uint32_t* ptr) {
  return *reinterpret_cast<const volatile uint32_t*>(ptr);
}
/// Two adjacent 64-bit words (16-byte aligned) of this rank's state, written by earlier kernels.
__device__ __forceinline__ void ld_volatile_v2_u64(const uint64_t* ptr, uint64_t& first, uint64_t& second) {
  asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(first), "=l"(second) : "l"(ptr));
}

/// Warp-wide: `bytes` (multiple of 4) of our staged copy at `stage_offset` of the symmetric region
/// into `peer`'s symmetric region at `dst_offset`, then `value` applied (`add`: added, else set) to
/// its 64-bit word at `signal_offset`, after the data.
__device__ __forceinline__ void warp_put_signal(const LowLatencyComm& ll, int peer, int64_t dst_offset,
                                                int64_t stage_offset, int64_t bytes, int64_t signal_offset,
                                                uint64_t value, bool add) {
#if FLASHEP_WITH_NVSHMEM
  nvshmemx_putmem_signal_nbi_warp(ll.sym + dst_offset, ll.sym + stage_offset, static_cast<size_t>(bytes),
                                  reinterpret_cast<uint64_t*>(ll.sym + signal_offset), value,
                                  add ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET, peer);
#endif
}
/// One thread, after this GPU's last put of a send phase: completes every put this PE issued, so
/// the staged copies they read may be rewritten by a later call (NVSHMEM's quiet is per PE; the
/// grid's puts are ordered before it by the phase's ticket). A no-op without NVSHMEM peers.
/// NVSHMEM's quiet has no time limit: in shrink mode, once a peer is masked (perhaps dead), it is
/// skipped (the masked peer's data is thrown away anyway; the stages are then reused unchecked).
__device__ __forceinline__ void quiet_puts(const LowLatencyComm& ll, const int* s_masked, int num_ranks) {
#if FLASHEP_WITH_NVSHMEM
  if (ll.sym == nullptr) return;
  if (ll.shrink)
    for (int r = 0; r < num_ranks; ++r)
      if (s_masked[r]) return;
  nvshmem_quiet();
#else
  (void)ll;
  (void)s_masked;
  (void)num_ranks;
#endif
}

enum class WaitResult : int { kArrived = 0, kMasked = 1, kFailed = 2 };

/// Masks `peer` on this rank (shrink mode) and says so once.
static __device__ __noinline__ void mask_peer(const DeviceComm& c, const LowLatencyComm& ll, int peer, Phase phase) {
  if (atomicExch(local_int(ll, ll.layout.mask(peer)), 1) == 0)
    printf("flashep: rank %d masks rank %d: no answer within %.1f s in %s (enable_shrink)\n", c.rank, peer,
           double(c.timeout_ns) * 1e-9, phase == Phase::kLowLatencyDispatchRecv     ? "low_latency_dispatch"
                                         : phase == Phase::kLowLatencyCombineWeights ? "low_latency_combine send"
                                         : phase == Phase::kLowLatencyCredit
                                             ? "a low-latency send (waiting for its previous call's receive)"
                                             : "low_latency_combine");
}

/// One thread: spins until `word` (our memory) holds the signal of call `seq`. Bounded: past the
/// timeout the peer is masked (shrink) or the call fails; an abort stops it at once, and so does a
/// signal of a later call (more calls in flight than the double buffer holds). `*value` gets the
/// word. A word written by an NVSHMEM peer (`nvshmem_peer`) then gets one NVSHMEM test, which runs
/// NVSHMEM's post-wait consistency step (proxy transports need it before the data is read; its own
/// waits have no time limit, so the spinning is ours).
/// Out of line: called from several sites of each kernel, one copy of the code.
static __device__ __noinline__ WaitResult wait_word(const DeviceComm& c, const LowLatencyComm& ll, const uint64_t* word,
                                                uint32_t seq, Phase phase, int peer, uint64_t* value,
                                                bool nvshmem_peer) {
  uint64_t start = 0;
  // The first poll reads only the flag: when it is there (a hook's receive, most waits of a fused
  // call) the wait costs one round trip. The abort word is read from the second poll on, and every
  // 128 polls after that (the kernel's entry read it already).
  for (uint32_t spins = 0;; ++spins) {
    const int abort = (spins & 127) == 1 ? device::abort_value(c) : 0;
    const uint64_t v = device::ld_acquire_sys_u64(word);
    if (ll_stop_if_aborted(c, abort, phase)) return WaitResult::kFailed;
    if (ll_signal_is(v, seq)) {
      *value = v;
#if FLASHEP_WITH_NVSHMEM
      if (nvshmem_peer) nvshmem_uint64_test(const_cast<uint64_t*>(word), NVSHMEM_CMP_EQ, v);
#else
      (void)nvshmem_peer;
#endif
      return WaitResult::kArrived;
    }
    if (ll_signal_is_ahead(v, seq)) {
      ll_fail(c, Phase::kLowLatencyOverrun, peer, -1, static_cast<int>(seq), static_cast<int>(v >> 32));
      return WaitResult::kFailed;
    }
    if (spins == 0) start = device::global_timer_ns();
    // In shrink mode another block (or the user) may have masked the peer meanwhile.
    if (ll.shrink && (spins & 127) == 64 && *reinterpret_cast<const volatile int*>(local_int(ll, ll.layout.mask(peer))) != 0)
      return WaitResult::kMasked;
    if ((spins & 127) == 127 && device::global_timer_ns() - start > c.timeout_ns) {
      if (ll.shrink) {
        mask_peer(c, ll, peer, phase);
        return WaitResult::kMasked;
      }
      ll_fail(c, phase, peer, -1, static_cast<int>(seq), static_cast<int>(v >> 32));
      return WaitResult::kFailed;
    }
  }
}

/// One thread: waits (wait_word) for the flag at `offset` of our inbox for `peer`, adds the cycles
/// waited to `wait_stats[peer]` (the *_wait_recv_cost_stats, when given), and marks the peer in
/// `s_masked` when it was masked meanwhile (shrink mode). `*value_out` (when given) gets the flag.
__device__ __forceinline__ WaitResult wait_flag(const DeviceComm& c, const LowLatencyComm& ll, int peer, int64_t offset,
                                                uint32_t seq, Phase phase, int64_t* wait_stats, int* s_masked,
                                                uint64_t* value_out = nullptr) {
  const long long wait_start = clock64();
  uint64_t value = 0;
  const WaitResult res = wait_word(c, ll, reinterpret_cast<const uint64_t*>(inbox_region(c, ll, peer) + offset), seq,
                                   phase, peer, &value, direct_region(c, ll, peer) == nullptr);
  if (value_out != nullptr) *value_out = value;
  if (wait_stats != nullptr)
    atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + peer), static_cast<unsigned long long>(clock64() - wait_start));
  if (res == WaitResult::kMasked) s_masked[peer] = 1;
  return res;
}

/// One thread of a send phase: spins until `peer` (reached directly) has forwarded that it finished
/// receiving call `seq` of `wire` and `half` (its credit word in our region, which it rewrites at
/// each of its send phases' entries). Bounded like wait_word: past the timeout the peer is masked
/// (shrink) or the call fails; an abort stops it. Rarely entered: a peer two calls behind.
static __device__ __noinline__ WaitResult wait_credit(const DeviceComm& c, const LowLatencyComm& ll, int peer,
                                                      int wire, int half, uint32_t seq) {
  const uint64_t* word = reinterpret_cast<const uint64_t*>(ll.local + ll.layout.credit(peer, wire, half));
  const uint64_t start = device::global_timer_ns();
  for (uint32_t spins = 0;; ++spins) {
    const uint64_t v = device::ld_acquire_sys_u64(word);
    if (ll_signal_at_least(v, seq)) return WaitResult::kArrived;
    if ((spins & 127) == 1 && ll_stop_if_aborted(c, device::abort_value(c), Phase::kLowLatencyCredit))
      return WaitResult::kFailed;
    if (ll.shrink && (spins & 127) == 64 && *reinterpret_cast<const volatile int*>(local_int(ll, ll.layout.mask(peer))) != 0)
      return WaitResult::kMasked;
    if ((spins & 127) == 127 && device::global_timer_ns() - start > c.timeout_ns) {
      if (ll.shrink) {
        mask_peer(c, ll, peer, Phase::kLowLatencyCredit);
        return WaitResult::kMasked;
      }
      ll_fail(c, Phase::kLowLatencyCredit, peer, wire * 2 + half, static_cast<int>(seq),
              (v & kSignalValid) != 0 ? static_cast<int>(v >> 32) : -1);
      return WaitResult::kFailed;
    }
  }
}

/// Block-wide, at the normal end of a receive phase (every block): this call's receive of `wire`
/// has finished here. Every block stores the same word; only later kernels read it (a send phase's
/// entry checks it and forwards it to the peers as their credit), after this kernel has ended.
__device__ __forceinline__ void record_receive_done(const LowLatencyComm& ll, int wire, uint32_t seq) {
  if (threadIdx.x == 0)
    *reinterpret_cast<volatile uint64_t*>(&state_of(ll)->recv_done[wire][seq & 1u]) = ll_signal(seq, 0);
}

/// The last block of a phase to finish: every thread gets true in exactly one block. The ticket
/// counts with atomicInc, which wraps to 0 at the last block: nothing resets it. The last block
/// publishes nothing to peers (each message and signal went out with its own release) and resets
/// no counter (the next call's send does, reset_previous_counters): it only leaves the call's
/// number for later kernels and, with NVSHMEM peers, runs the PE's quiet. Only the quiet needs the
/// other blocks' writes ordered before their tickets (their puts' descriptors), so the GPU-scope
/// fences run only with `fence` (NVSHMEM peers): a fence waits for the block's message stores to
/// reach the peers.
__device__ __forceinline__ bool last_block_done(int* ticket, bool fence) {
  __shared__ int is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (fence) __threadfence();
    const unsigned last = gridDim.x - 1;
    is_last = atomicInc(reinterpret_cast<unsigned*>(ticket), last) == last;
    if (fence && is_last) __threadfence();
  }
  __syncthreads();
  return is_last != 0;
}

/// Block-wide, in every block of a send phase: zeroes (a slice per block) the previous call's
/// counters, the other half's message and expert counters, for the next call of that half. The
/// previous call's send phase ended before this kernel began and the next call of that half begins
/// after this kernel ends, so kernel boundaries order these stores both ways (all of the area: the
/// previous call may have had another E). Stores only; nothing waits for them.
__device__ __forceinline__ void reset_previous_counters(const LowLatencyComm& ll, int half) {
  const LowLatencyLayout& L = ll.layout;
  const int other = half ^ 1, num_words = kMaxLowLatencyExperts + L.num_ranks;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < num_words; i += gridDim.x * blockDim.x)
    *local_int(ll, i < kMaxLowLatencyExperts ? L.expert_counter(other, i) : L.msg_counter(other, i - kMaxLowLatencyExperts)) = 0;
}

/// Re-reads every rank's mask into `s_masked` (a peer may have been masked meanwhile).
__device__ __forceinline__ void reload_mask(const DeviceComm& c, const LowLatencyComm& ll, int* s_masked) {
  for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x)
    s_masked[r] = *reinterpret_cast<const volatile int*>(local_int(ll, ll.layout.mask(r)));
}

/// Block-wide: every block of the grid arrives before any leaves. Bounded (timeout) and given up
/// on abort, unlike cooperative_groups' grid sync: a block that saw the abort at its entry returned
/// and never arrives. Returns false (every thread) when it gave up. The arrival counter is reset by
/// the last block to arrive, which then advances the generation the others wait on.
__device__ __forceinline__ bool grid_barrier(const DeviceComm& c, const LowLatencyComm& ll, Phase phase) {
  __shared__ int ok;
  __syncthreads();
  if (threadIdx.x == 0) {
    LowLatencyState* st = reinterpret_cast<LowLatencyState*>(ll.local + ll.layout.state());
    uint32_t* generation = &st->barrier_generation;
    const uint32_t before = ld_volatile_u32(generation);
    __threadfence();  // the generation is read before this block's arrival counts
    ok = 1;
    if (atomicAdd(&st->ticket[kTicketGridBarrier], 1) == static_cast<int>(gridDim.x) - 1) {
      st->ticket[kTicketGridBarrier] = 0;
      __threadfence();
      atomicAdd(generation, 1u);
    } else {
      const uint64_t start = device::global_timer_ns();
      for (uint32_t spins = 0; ld_volatile_u32(generation) == before; ++spins) {
        if ((spins & 127) == 0 && ll_stop_if_aborted(c, device::abort_value(c), phase)) {
          ok = 0;
          break;
        }
        if ((spins & 127) == 127 && device::global_timer_ns() - start > c.timeout_ns) {
          ll_fail(c, phase, c.rank, -1, static_cast<int>(gridDim.x), -1);
          ok = 0;
          break;
        }
      }
    }
    __threadfence();
  }
  __syncthreads();
  return ok != 0;
}

/// Block-wide, in the last block of a send phase: completes this PE's puts (quiet_puts, with the
/// masks re-read), then leaves the call's number in its slot (for the hook) and advances the
/// sequence (both read by later kernels only). Nobody waits for this.
__device__ __forceinline__ void finish_send_phase(const DeviceComm& c, const LowLatencyComm& ll, int* s_masked,
                                                  int call_slot, uint32_t seq, int wire) {
  reload_mask(c, ll, s_masked);
  __syncthreads();
  if (threadIdx.x == 0) {
    LowLatencyState* st = reinterpret_cast<LowLatencyState*>(ll.local + ll.layout.state());
    quiet_puts(ll, s_masked, c.num_ranks);
    st->call_seq[call_slot] = seq;
    st->last_sent[wire][seq & 1u] = ll_signal(seq, 0);
    st->layout_id = ll.layout.layout_id;
    st->send_seq = seq + 1;
  }
}

/// What every block reads once at kernel entry (one round of loads, one barrier).
struct EntryState {
  uint32_t send_seq;  // the call whose send phase this kernel runs (if it does)
  uint32_t recv_seq;  // the call whose receive phase this kernel runs (if it does)
  int abort;
  int failed;         // set by any thread of the block that gives up (a wait, bad input)
};

/// No loads of the caller's with the entry's.
struct NoEarlyLoads {
  __device__ void operator()() const {}
};

/// Block-wide kernel entry: the abort word, the sequence numbers and every rank's mask (into
/// `s_masked`). Returns false (every thread) when the buffer is aborted or the call failed here:
/// nothing may run. The receive phase's call: the one this kernel's send phase runs (fused), else
/// the number the call's send phase left in its slot (the hook). `early_loads` runs after the
/// entry's loads are issued and before the barrier that waits for them: loads it issues share their
/// round trip.
///
/// A send phase (`wire`: what it writes, LowLatencyWire) also takes its credits here. A half of a
/// wire is rewritten every second call on it, and a peer may still be reading the previous call of
/// that half when this rank sends (it finished its own receive of that call, and the peer's send of
/// it, but nothing says the peer finished receiving). So thread r < R checks, before anything is
/// sent, that rank r finished receiving the last call this rank sent on (wire, half) (its credit
/// word, which r forwards at the entry of each of its send phases) and waits for it (bounded) if
/// not: in the patterns of a decode loop the credit came long ago, and the check costs no round
/// trip (its loads go with the entry's). Thread `rank` checks this rank's own receive of that call:
/// a call whose hook has not run cannot be overwritten (kLowLatencyHalfBusy). Block 0 forwards this
/// rank's receive progress to its direct peers, except the current call's (blocks of a fused kernel
/// may finish this call's receive while block 0 is still here). NVSHMEM peers get no credits (their
/// halves are protected only by the order of the calls: the reduced combine's send waits for the
/// sources' weights); masked peers are skipped.
/// The credit check's slow path, out of line (the entry's fast path is a compare), for thread r of
/// a send phase: the credit of (wire, half) was not there, or this call's layout differs from the
/// last one sent (`all_wires`: then every wire and half, since areas of one layout overlap any area
/// of another). For r = this rank, its own receives: a call sent and not yet received here (its
/// hook not run) would be overwritten, so the call fails (kLowLatencyHalfBusy; not when the buffer
/// is aborted already: the abort is the cause). Else it waits for rank r's credits (wait_credit).
static __device__ __noinline__ WaitResult take_credit_slow(const DeviceComm& c, const LowLatencyComm& ll, int r,
                                                          int wire, uint32_t send_seq, bool all_wires) {
  const LowLatencyState* st = reinterpret_cast<const LowLatencyState*>(ll.local + ll.layout.state());
  const int half = static_cast<int>(send_seq & 1u);
  for (int w = 0; w < kLowLatencyWires; ++w) {
    for (int h = 0; h < 2; ++h) {
      if (!all_wires && (w != wire || h != half)) continue;
      const uint64_t previous = *reinterpret_cast<const volatile uint64_t*>(&st->last_sent[w][h]);
      if ((previous & kSignalValid) == 0) continue;
      const uint32_t previous_seq = static_cast<uint32_t>(previous >> 32);
      if (r == c.rank) {
        if (!ll_signal_at_least(*reinterpret_cast<const volatile uint64_t*>(&st->recv_done[w][h]), previous_seq)) {
          if (!ll_stop_if_aborted(c, device::abort_value(c), Phase::kLowLatencyHalfBusy))
            ll_fail(c, Phase::kLowLatencyHalfBusy, c.rank, w * 2 + h, static_cast<int>(previous_seq),
                    static_cast<int>(send_seq));
          return WaitResult::kFailed;
        }
      } else {
        const WaitResult res = wait_credit(c, ll, r, w, h, previous_seq);
        if (res != WaitResult::kArrived) return res;
      }
    }
  }
  return WaitResult::kArrived;
}

/// One thread of block 0 of a send phase: this rank's receive progress (`done`, every wire and half)
/// into direct peer r's credit words for it, except the current call's (`send_seq`: blocks of a
/// fused kernel may be finishing its receive).
__device__ __forceinline__ void forward_receives(const DeviceComm& c, const LowLatencyComm& ll, int r,
                                                 const uint64_t (&done)[kLowLatencyWires * 2], uint32_t send_seq) {
  char* peer = direct_region(c, ll, r);
  for (int w = 0; w < kLowLatencyWires * 2; ++w)
    if ((done[w] & kSignalValid) != 0 && static_cast<uint32_t>(done[w] >> 32) != send_seq)
      device::st_relaxed_sys_u64(reinterpret_cast<uint64_t*>(peer + ll.layout.credit(c.rank, w / 2, w % 2)), done[w]);
}

/// take_credit (kernel_entry) for a rank past the block's threads (R > kThreads): out of line, as it
/// never runs at the sizes the low-latency mode is for. Loads as it goes; forwards, then checks.
static __device__ __noinline__ bool take_credit_late(const DeviceComm& c, const LowLatencyComm& ll, int r, int wire,
                                                     int& mask) {
  const LowLatencyState* st = reinterpret_cast<const LowLatencyState*>(ll.local + ll.layout.state());
  const uint32_t send_seq = ld_volatile_u32(&st->send_seq);
  const bool direct = r != c.rank && direct_region(c, ll, r) != nullptr;
  if (mask || !(direct || r == c.rank)) return false;
  if (direct && blockIdx.x == 0) {
    uint64_t done[kLowLatencyWires * 2];
    for (int w = 0; w < kLowLatencyWires; ++w) ld_volatile_v2_u64(&st->recv_done[w][0], done[2 * w], done[2 * w + 1]);
    forward_receives(c, ll, r, done, send_seq);
  }
  const uint32_t layout_id = ld_volatile_u32(&st->layout_id);
  const WaitResult res =
      take_credit_slow(c, ll, r, wire, send_seq, layout_id != 0 && layout_id != ll.layout.layout_id);
  if (res == WaitResult::kMasked) mask = 1;
  return res == WaitResult::kFailed;
}

template <typename EarlyLoads = NoEarlyLoads>
__device__ __forceinline__ bool kernel_entry(const DeviceComm& c, const LowLatencyComm& ll, int phases, int wire,
                                             int call_slot, int* s_masked, EntryState& entry,
                                             const EarlyLoads& early_loads = {}) {
  // Every load is issued before any value is used or stored: a use (a shared store too) waits for
  // its load, and later loads issue after it, so stores between the loads made the entry up to
  // three round trips long (Nsight Compute, docs/results/2026-12-01-h200-r1-ncu.md).
  const int R = c.num_ranks;
  const int t = static_cast<int>(threadIdx.x);
  const bool sends = (phases & kLowLatencySend) != 0;
  const LowLatencyState* st = reinterpret_cast<const LowLatencyState*>(ll.local + ll.layout.state());
  int mask = 0;
  device::AbortWords abort{0, 0};
  uint32_t send_seq = 0, recv_seq = 0, layout_id = 0;
  // Thread t < R of a send phase, for rank t: this rank's last call on (wire, each half), its own
  // receives there (t = rank), its receives on every (wire, half) to forward (block 0), and rank
  // t's credit (direct peers; acquire, issued after every other load: an acquire holds back the
  // loads after it, a round trip when it came first).
  const bool direct = t < R && t != c.rank && direct_region(c, ll, t) != nullptr;
  const bool forwards = sends && direct && blockIdx.x == 0;
  uint64_t last_sent[2] = {0, 0}, own[2] = {0, 0}, credit[2] = {0, 0}, done[kLowLatencyWires * 2] = {};
  if (t < R) {
    mask = *reinterpret_cast<const volatile int*>(local_int(ll, ll.layout.mask(t)));
    if (sends) {
      send_seq = ld_volatile_u32(&st->send_seq);
      layout_id = ld_volatile_u32(&st->layout_id);
      ld_volatile_v2_u64(&st->last_sent[wire][0], last_sent[0], last_sent[1]);
      if (t == c.rank) ld_volatile_v2_u64(&st->recv_done[wire][0], own[0], own[1]);
      if (forwards)
        for (int w = 0; w < kLowLatencyWires; ++w) ld_volatile_v2_u64(&st->recv_done[w][0], done[2 * w], done[2 * w + 1]);
    }
  }
  if (t == 0) {
    abort = device::load_abort_words(c);
    if (!sends) send_seq = ld_volatile_u32(&st->send_seq);
    recv_seq = sends ? send_seq : ld_volatile_u32(&st->call_seq[call_slot]);
  }
  early_loads();
  if (sends && direct)
    device::ld_acquire_sys_v2_u64(reinterpret_cast<const uint64_t*>(ll.local + ll.layout.credit(t, wire, 0)), credit[0],
                                  credit[1]);
  if (t == 0) {
    entry.abort = device::abort_of(abort);
    entry.send_seq = send_seq;
    entry.recv_seq = recv_seq;
    entry.failed = 0;
  }
  bool failed = false;
  if (sends && t < R && !mask) {
    // Forward first: a peer may be waiting for it while this rank waits for the peer's.
    if (forwards) forward_receives(c, ll, t, done, send_seq);
    const bool half = (send_seq & 1u) != 0;
    const uint64_t previous = half ? last_sent[1] : last_sent[0];  // selects: an index would go to local memory
    const bool all_wires = layout_id != 0 && layout_id != ll.layout.layout_id;
    bool slow = all_wires && (direct || t == c.rank);
    if (!slow && (previous & kSignalValid) != 0) {
      const uint32_t previous_seq = static_cast<uint32_t>(previous >> 32);
      if (t == c.rank) slow = !ll_signal_at_least(half ? own[1] : own[0], previous_seq);
      else if (direct) slow = !ll_signal_at_least(half ? credit[1] : credit[0], previous_seq);
    }
    if (slow) {
      const WaitResult res = take_credit_slow(c, ll, t, wire, send_seq, all_wires);
      failed = res == WaitResult::kFailed;
      if (res == WaitResult::kMasked) mask = 1;
    }
  }
  if (t < R) s_masked[t] = mask;
  for (int r = t + blockDim.x; r < R; r += blockDim.x) {  // more ranks than threads
    int mask_r = *reinterpret_cast<const volatile int*>(local_int(ll, ll.layout.mask(r)));
    if (sends) failed |= take_credit_late(c, ll, r, wire, mask_r);
    s_masked[r] = mask_r;
  }
  if (__syncthreads_or(failed)) return false;
  if (entry.abort != 0) {
    if (t == 0) ll_stop_if_aborted(c, entry.abort, Phase::kKernelEntry);
    return false;
  }
  return true;
}

/// Block-wide, at the start of dispatch's receive phase: waits for every unmasked source's total
/// of call `seq` (bounded; a silent source is masked in shrink mode, else the call fails).
/// `s_count[r]` gets each source's count (0 when masked); block 0 adds the waited cycles to
/// `wait_stats`. In shrink mode the grid then synchronizes and every block takes the same view of
/// the masks (blocks may have masked different peers when a signal landed between their
/// deadlines). Returns false when the call failed here.
__device__ __forceinline__ bool wait_sources(const DeviceComm& c, const LowLatencyComm& ll, uint32_t seq,
                                             int total_kind, Phase phase, int64_t* wait_stats, int* s_masked,
                                             int* s_count, int& s_failed) {
  const LowLatencyLayout& L = ll.layout;
  const int half = static_cast<int>(seq & 1u);
  const long long wait_start = clock64();
  for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x) {
    int count = 0;
    if (!s_masked[r]) {
      const uint64_t* word = reinterpret_cast<const uint64_t*>(inbox_region(c, ll, r) + L.signal(total_kind, half, r));
      const bool nvshmem_peer = direct_region(c, ll, r) == nullptr;
      // A signal already there (a hook's receive) is taken inline: the call to wait_word first
      // waits for every load this thread has in flight, the receive's early message loads too.
      uint64_t value = nvshmem_peer ? 0 : device::ld_acquire_sys_u64(word);
      WaitResult res = WaitResult::kArrived;
      if (nvshmem_peer || !ll_signal_is(value, seq)) res = wait_word(c, ll, word, seq, phase, r, &value, nvshmem_peer);
      if (res == WaitResult::kArrived) {
        count = ll_signal_count(value);
        if (count > L.max_tokens) {  // not from a correct peer: nothing may be read past its inbox
          ll_fail(c, Phase::kLowLatencyBadMessage, r, -1, L.max_tokens, count);
          res = WaitResult::kFailed;
        }
      }
      if (res == WaitResult::kFailed) s_failed = 1;
      if (res != WaitResult::kArrived) count = 0, s_masked[r] = 1;
      if (blockIdx.x == 0 && wait_stats != nullptr)
        atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + r),
                  static_cast<unsigned long long>(clock64() - wait_start));
    }
    s_count[r] = count;
  }
  __syncthreads();
  if (ll.shrink) {
    if (!grid_barrier(c, ll, phase)) {
      s_failed = 1;
      return false;
    }
    reload_mask(c, ll, s_masked);
    __syncthreads();
    for (int r = threadIdx.x; r < c.num_ranks; r += blockDim.x)
      if (s_masked[r]) s_count[r] = 0;
    __syncthreads();
  }
  return s_failed == 0;
}

}  // namespace flashep::ll
