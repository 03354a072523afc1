// Bulk (TMA) copies between global and shared memory, and the mbarriers that complete them (sm_90).
//
// Why: a warp that copies rows with 16-byte loads and stores waits on every load, and its system-
// scope release after a chunk waits for every store of the chunk to reach the peer. A bulk copy is
// issued by one thread and moves a whole ring slot asynchronously, so one warp keeps several rows
// in flight towards several peers while it goes on with the next token.
//
// Completion rules used by the kernels (PTX ISA, "cp.async.bulk" and the async proxy):
//   - a global -> shared copy completes on an mbarrier (complete_tx); once a thread observes the
//     phase flip, the data is visible to it;
//   - shared -> global copies complete in bulk async-groups, per issuing thread, in order:
//     wait_group.read N  : all but the N newest groups finished reading shared memory (reuse it);
//     wait_group N       : all but the N newest groups finished writing global memory; the writes are
//                          then visible to the waiting thread, which publishes them to peers with a
//                          proxy fence and a system-scope release;
//   - generic writes to shared memory that a later bulk copy reads need fence.proxy.async first.
#pragma once

#include <utility>

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/device_utils.cuh"

namespace flashep::device {

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// ---- mbarriers -----------------------------------------------------------------------------------
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
/// Makes mbarrier initializations visible to the async proxy (the bulk copies that complete on them).
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
/// Waits for phase `parity` of `bar` to complete. Bounded: a bulk copy of local memory cannot stall
/// for long, but a fault or a bug must still end in an error, not a hang. Returns false on timeout.
__device__ __forceinline__ bool mbarrier_wait(uint64_t* bar, uint32_t parity, uint64_t timeout_ns) {
  if (mbarrier_try_wait(bar, parity)) return true;
  const uint64_t start = global_timer_ns();
  while (!mbarrier_try_wait(bar, parity))
    if (global_timer_ns() - start > timeout_ns) return false;
  return true;
}

// ---- bulk copies ---------------------------------------------------------------------------------
/// global -> shared, completing `bytes` on `bar` (the caller armed it with arrive_expect_tx).
/// Addresses 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void bulk_load(void* smem_dst, const void* global_src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_addr(smem_dst)),
      "l"(global_src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
/// shared -> global (local or a peer's memory mapped over NVLink), in the current bulk group.
__device__ __forceinline__ void bulk_store(void* global_dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global_dst),
               "r"(smem_addr(smem_src)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

/// Largest run-time count the waits below take exactly (larger counts wait as if this, which is
/// only stricter).
inline constexpr int kMaxBulkWaitCount = 15;

template <bool kRead, int kAllowedPending>
__device__ __forceinline__ void bulk_wait_imm() {
  if constexpr (kRead) {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kAllowedPending) : "memory");
  } else {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kAllowedPending) : "memory");
  }
}
/// The instruction takes an immediate: one comparison per possible count, for a run-time count.
template <bool kRead, int... kCounts>
__device__ __forceinline__ void bulk_wait_any(int allowed_pending, std::integer_sequence<int, kCounts...>) {
  const int n = allowed_pending <= 0 ? 0 : (allowed_pending > kMaxBulkWaitCount ? kMaxBulkWaitCount : allowed_pending);
  ((n == kCounts ? bulk_wait_imm<kRead, kCounts>() : void()), ...);
}
/// wait_group.read: all but the `allowed_pending` newest groups finished reading shared memory.
__device__ __forceinline__ void bulk_wait_read(int allowed_pending) {
  bulk_wait_any<true>(allowed_pending, std::make_integer_sequence<int, kMaxBulkWaitCount + 1>{});
}
/// wait_group: all but the `allowed_pending` newest groups finished writing global memory.
__device__ __forceinline__ void bulk_wait_written(int allowed_pending) {
  bulk_wait_any<false>(allowed_pending, std::make_integer_sequence<int, kMaxBulkWaitCount + 1>{});
}

// ---- small asynchronous copies (metadata next to a bulk-loaded row) -------------------------------
/// 4- or 8-byte global -> shared copy that does not hold a register until it lands.
template <int kBytes>
__device__ __forceinline__ void async_copy_small(void* smem_dst, const void* global_src) {
  static_assert(kBytes == 4 || kBytes == 8, "cp.async.ca copies 4, 8 or 16 bytes");
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(smem_addr(smem_dst)), "l"(global_src), "n"(kBytes)
               : "memory");
}
/// Makes `bar` track this thread's earlier cp.async copies: it counts one arrival when they landed
/// (the arrival is part of the mbarrier's expected count: .noinc).
__device__ __forceinline__ void async_copy_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// ---- proxy fences --------------------------------------------------------------------------------
/// Generic-proxy accesses of shared memory before it, ordered with async-proxy accesses after it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
/// Generic-proxy accesses of any memory before it ordered with async-proxy accesses after it (a
/// bulk load of a ring slot after the acquire that saw the slot's tail).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async;" ::: "memory"); }
/// Async-proxy writes to global memory (completed bulk stores) ordered with the generic-proxy
/// release that publishes them.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

}  // namespace flashep::device
