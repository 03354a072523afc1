// Failure containment on the GPU: the error record, the abort word, and bounded waits that give up
// as soon as any rank has failed.
//
// A rank that fails (a wait past the timeout, bad input found on the GPU, ranks that disagree)
// claims its error record (the first failing thread of the rank wins), then writes the abort word
// of every rank of its NVLink domain (and its own). Every wait reads the abort word next to the
// counter it waits on, on its first check too, so a wait on any rank gives up within one spin
// round of the abort landing: it records that a peer aborted (naming it) and returns false, and
// its kernel stops writing to peers. Kernels also check the word at entry, so work enqueued after
// the failure does nothing. Peers in other NVLink domains learn of the abort from the host, which
// posts it through NVSHMEM (BufferImpl::propagate_abort), or from the multi-node kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/counters.hpp"
#include "core/device_comm.hpp"
#include "kernels/device_utils.cuh"

namespace flashep::device {

__device__ __forceinline__ int* local_word(const DeviceComm& c, int64_t offset) {
  return reinterpret_cast<int*>(c.local() + offset);
}

/// The abort words: our NVLink control word, written by our domain's ranks, and (when the buffer
/// has an NVSHMEM region) the RDMA header's word, written by other domains'. Each is 0, or 1 + the
/// rank that aborted the buffer.
struct AbortWords {
  int nvl, rdma;
};
/// Both words are loaded before either is looked at: one memory round trip, not two (this sits on
/// the critical path of every wait's first poll and of every kernel's entry). The values are looked
/// at by abort_of, which a caller may put after more loads of its own.
__device__ __forceinline__ AbortWords load_abort_words(const DeviceComm& c) {
  AbortWords w{ld_relaxed_sys(local_word(c, c.nvl.control.abort_word())), 0};
  if (c.sym_base != nullptr)
    w.rdma = static_cast<int>(ld_relaxed_sys_u64(reinterpret_cast<const uint64_t*>(c.sym_base + c.rdma.abort_word())));
  return w;
}
/// 0, or 1 + a rank that aborted the buffer (the larger, when two did). Both values are used
/// whatever they are: with `nvl != 0 ? nvl : rdma`, ptxas issued the second load only after the
/// first had returned 0, a second round trip.
__device__ __forceinline__ int abort_of(AbortWords w) { return max(w.nvl, w.rdma); }
__device__ __forceinline__ int abort_value(const DeviceComm& c) { return abort_of(load_abort_words(c)); }

/// Writes the abort word of every rank of our NVLink domain (ours included).
__device__ __forceinline__ void raise_abort_nvlink(const DeviceComm& c) {
  for (int p = 0; p < c.nvl_size; ++p)
    st_relaxed_sys(reinterpret_cast<int*>(c.nvl_base[p] + c.nvl.control.abort_word()), c.rank + 1);
  __threadfence_system();
}

/// States of a rank's error claim (the control block's error_claim word).
inline constexpr int kClaimFree = 0;
inline constexpr int kClaimWritingPeer = 1;  // a peer-abort record is being written
inline constexpr int kClaimPeer = 2;         // a peer-abort record is complete (an own failure may replace it)
inline constexpr int kClaimOwn = 3;          // this rank's own failure is recorded (final)

/// Records a failure and, for this rank's own failures, aborts the buffer on the peers. The first
/// record wins, except that this rank's own failure replaces a record of a peer's abort.
__device__ __forceinline__ void record_error_body(const DeviceComm& c, Phase phase, Cause cause, int peer, int channel,
                                                  int expected, int observed, int block) {
  int* claim = local_word(c, c.nvl.control.error_claim());
  bool write = false;
  if (cause == Cause::kPeerAbort) {
    write = atomicCAS(claim, kClaimFree, kClaimWritingPeer) == kClaimFree;
  } else {
    // Bounded: a peer-abort record is a handful of stores away from complete.
    for (int attempt = 0; attempt < 1 << 20 && !write; ++attempt) {
      const int previous = atomicCAS(claim, kClaimFree, kClaimOwn);
      if (previous == kClaimFree) write = true;
      else if (previous == kClaimPeer) write = atomicCAS(claim, kClaimPeer, kClaimOwn) == kClaimPeer;
      else if (previous == kClaimOwn) break;
    }
  }
  if (write) {
    DeviceErrorRecord* r = c.error;
    const int seq = r->seq;
    r->seq = seq + 1;  // odd: being written
    __threadfence_system();
    r->rank = c.rank;
    r->phase = static_cast<int>(phase);
    r->cause = static_cast<int>(cause);
    r->peer = peer;
    r->channel = channel;
    r->expected = expected;
    r->observed = observed;
    r->block = block >= 0 ? block : static_cast<int>(blockIdx.x);
    __threadfence_system();
    r->seq = seq + 2;  // even: complete
    __threadfence_system();
    if (cause == Cause::kPeerAbort) atomicExch(claim, kClaimPeer);
  }
  if (cause == Cause::kOwn) raise_abort_nvlink(c);
}

/// The same, out of line (issue 7): inlined at every wait's cold path it was ~1100 of the 2650
/// instructions of combine_kernel<2> (42 KB of SASS, against 27.5 KB now), and combine ran 3% slower
/// (measured at 2 GPUs). The site and the values travel packed (record_error below), so that a call
/// site needs few registers. Kernels of 1024 threads (64 registers) spill around the call in their
/// hot loops (combine_kernel<4> and <8>), so those keep the body inline (kInline below).
static __device__ __noinline__ void record_error_packed(const DeviceComm& c, uint64_t site, uint64_t values, int block) {
  // 24-bit fields, sign-extended (-1 stays -1).
  record_error_body(c, static_cast<Phase>(site & 0xff), static_cast<Cause>((site >> 8) & 0xff),
                    static_cast<int>(static_cast<uint32_t>(site >> 16) << 8) >> 8,
                    static_cast<int>(static_cast<uint32_t>(site >> 40) << 8) >> 8,
                    static_cast<int>(static_cast<uint32_t>(values)), static_cast<int>(static_cast<uint32_t>(values >> 32)),
                    block);
}

/// record_error_packed's site word: the phase, the cause, and the peer and channel as 24-bit
/// signed values (a peer field may hold an expert count, a channel field an expert id: both are
/// far below 2^23). With kInline, the body at the call site instead.
template <bool kInline = false>
__device__ __forceinline__ void record_error(const DeviceComm& c, Phase phase, Cause cause, int peer, int channel,
                                             int expected, int observed, int block = -1) {
  if constexpr (kInline) {
    record_error_body(c, phase, cause, peer, channel, expected, observed, block);
  } else {
    const uint64_t site = uint64_t(static_cast<uint32_t>(phase) & 0xffu) | (uint64_t(static_cast<uint32_t>(cause) & 0xffu) << 8) |
                          (uint64_t(static_cast<uint32_t>(peer) & 0xffffffu) << 16) |
                          (uint64_t(static_cast<uint32_t>(channel) & 0xffffffu) << 40);
    const uint64_t values = uint64_t(static_cast<uint32_t>(expected)) | (uint64_t(static_cast<uint32_t>(observed)) << 32);
    record_error_packed(c, site, values, block);
  }
}

/// This rank's own failure.
template <bool kInline = false>
__device__ __forceinline__ void fail(const DeviceComm& c, Phase phase, int peer, int channel, int expected,
                                     int observed, int block = -1) {
  record_error<kInline>(c, phase, Cause::kOwn, peer, channel, expected, observed, block);
}

/// If the buffer is aborted: records (once) that this rank stopped in `phase` because of the
/// aborting rank, and returns true.
template <bool kInline = false>
__device__ __forceinline__ bool stop_if_aborted(const DeviceComm& c, int abort, Phase phase) {
  if (abort == 0) return false;
  // Our own abort: this rank's error is recorded already (the claim is taken before the word is set).
  if (abort - 1 != c.rank) record_error<kInline>(c, phase, Cause::kPeerAbort, abort - 1, -1, 0, 0);
  return true;
}
__device__ __forceinline__ bool aborted(const DeviceComm& c) { return abort_value(c) != 0; }

/// Block-uniform check at kernel entry: true (every thread) when the buffer is aborted already; the
/// kernel must then return without touching peers.
template <bool kInline = false>
__device__ __forceinline__ bool aborted_at_entry(const DeviceComm& c) {
  __shared__ int abort;
  if (threadIdx.x == 0) abort = abort_value(c);
  __syncthreads();
  const int seen = abort;
  if (seen != 0 && threadIdx.x == 0) stop_if_aborted<kInline>(c, seen, Phase::kKernelEntry);
  return seen != 0;
}

/// Spins until the counter at `counter` has reached `target` (wrap-safe, acquire). Bounded by the
/// timeout; gives up at once when the buffer is aborted (checked before the first read of the
/// counter too, and every 256 spins). Returns false when it gave up (the reason is recorded);
/// `*seen` gets the last value read.
template <bool kInline = false>
__device__ __forceinline__ bool wait_reached(const DeviceComm& c, const int* counter, int target, Phase phase,
                                             int peer, int channel, int* seen = nullptr) {
  // The abort word first (relaxed) so its load is in flight together with the acquire.
  int abort = abort_value(c);
  int value = ld_acquire_sys(counter);
  if (stop_if_aborted<kInline>(c, abort, phase)) return false;
  if (seq_reached(static_cast<uint32_t>(value), static_cast<uint32_t>(target))) {
    if (seen != nullptr) *seen = value;
    return true;
  }
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 1;; ++spins) {
    value = ld_acquire_sys(counter);
    if (seq_reached(static_cast<uint32_t>(value), static_cast<uint32_t>(target))) {
      if (seen != nullptr) *seen = value;
      return true;
    }
    if ((spins & 255) == 0) {
      if (stop_if_aborted<kInline>(c, abort_value(c), phase)) return false;
      if (global_timer_ns() - start > c.timeout_ns) {
        fail<kInline>(c, phase, peer, channel, target, value);
        return false;
      }
    }
  }
}

}  // namespace flashep::device
