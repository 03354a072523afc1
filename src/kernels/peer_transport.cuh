// Per-peer data movement for kernels that reach every rank: peers of our NVLink domain get plain
// stores through their CUDA IPC mapping (the NVLink allocation); peers of other domains get NVSHMEM
// puts and signals into their symmetric region (built with FLASHEP_WITH_NVSHMEM; a translation
// unit that includes this with NVSHMEM must be compiled as relocatable device code, which is why
// the NVSHMEM kernels live in their own library, src/CMakeLists layout in the top CMakeLists.txt).
//
// Peers of other domains are always reached through the NVSHMEM API, never through nvshmem_ptr,
// so the code that runs between the GPUs of one host (NVSHMEM over NVLink P2P) is the code that
// runs between hosts (IBGDA or a proxy transport).
#pragma once

#include <cstdint>

#include "kernels/failure.cuh"

#ifndef FLASHEP_WITH_NVSHMEM
#define FLASHEP_WITH_NVSHMEM 0
#endif
#if FLASHEP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace flashep::device {

/// Warp-wide: `bytes` (a multiple of 16) from `src` (in our region: the NVLink allocation for an
/// NVLink peer, the symmetric region for an NVSHMEM peer) to the same kind of region of `peer` at
/// `dst_offset`, then the 64-bit `value` into `peer`'s word at `signal_offset` of that region,
/// ordered after the data (system-scope release over NVLink; put-with-signal in NVSHMEM).
__device__ __forceinline__ void warp_put_with_signal(const DeviceComm& c, int peer, int64_t dst_offset,
                                                     const void* src, int64_t bytes, int64_t signal_offset,
                                                     uint64_t value, int lane) {
  if (c.is_nvl_peer(peer)) {
    char* base = c.nvl_base[c.nvl_index(peer)];
    const int4* from = static_cast<const int4*>(src);
    int4* to = reinterpret_cast<int4*>(base + dst_offset);
    for (int64_t i = lane; i < bytes / 16; i += kWarpSize) to[i] = from[i];
    __syncwarp();
    if (lane == 0) {
      __threadfence_system();
      st_release_sys_u64(reinterpret_cast<uint64_t*>(base + signal_offset), value);
    }
    __syncwarp();
    return;
  }
#if FLASHEP_WITH_NVSHMEM
  nvshmemx_putmem_signal_nbi_warp(c.sym_base + dst_offset, src, static_cast<size_t>(bytes),
                                  reinterpret_cast<uint64_t*>(c.sym_base + signal_offset), value,
                                  NVSHMEM_SIGNAL_SET, peer);
#endif
}

/// Spins (one thread) until the 64-bit signal at `signal` (our memory, written by `peer`) reaches
/// `target` (wrap-safe, acquire). Bounded by the timeout and given up on abort, like wait_reached.
/// For an NVSHMEM peer, one NVSHMEM test then runs NVSHMEM's post-wait consistency step (which
/// proxy transports need; its own waits have no timeout, so the spinning is ours).
__device__ __forceinline__ bool wait_signal(const DeviceComm& c, uint64_t* signal, uint64_t target, Phase phase,
                                           int peer) {
  const uint64_t start = global_timer_ns();
  for (uint32_t spins = 0;; ++spins) {
    const int abort = (spins & 255) == 0 ? abort_value(c) : 0;
    const uint64_t value = ld_acquire_sys_u64(signal);
    if (stop_if_aborted(c, abort, phase)) return false;
    if (seq_reached64(value, target)) break;
    if ((spins & 255) == 255 && global_timer_ns() - start > c.timeout_ns) {
      fail(c, phase, peer, -1, static_cast<int>(target), static_cast<int>(value));
      return false;
    }
  }
#if FLASHEP_WITH_NVSHMEM
  if (!c.is_nvl_peer(peer)) nvshmem_uint64_test(signal, NVSHMEM_CMP_GE, target);
#endif
  return true;
}

}  // namespace flashep::device
