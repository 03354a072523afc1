// Device-side building blocks shared by every kernel: memory-model-correct flag accesses and
// warp-wide row copies. Bounded waits and the error record are in failure.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>


namespace flashep::device {

constexpr int kWarpSize = 32;

// ---- flags (all system scope: peers write our memory over NVLink) --------------------------------
__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
  int value;
  asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}
__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
  asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}
__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
  int value;
  asm volatile("ld.relaxed.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}
__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
  asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}
__device__ __forceinline__ uint64_t ld_acquire_sys_u64(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}
/// Two adjacent 64-bit words (16-byte aligned), one acquire: each word is read single-copy atomic
/// (a vector access is its elements' accesses), and later loads are ordered after both.
__device__ __forceinline__ void ld_acquire_sys_v2_u64(const uint64_t* ptr, uint64_t& first, uint64_t& second) {
  asm volatile("ld.acquire.sys.global.v2.b64 {%0, %1}, [%2];" : "=l"(first), "=l"(second) : "l"(ptr) : "memory");
}
__device__ __forceinline__ uint64_t ld_relaxed_sys_u64(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.relaxed.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}
__device__ __forceinline__ void st_relaxed_sys_u64(uint64_t* ptr, uint64_t value) {
  asm volatile("st.relaxed.sys.global.b64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}
__device__ __forceinline__ void st_release_sys_u64(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.sys.global.b64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---- 16-byte data movement -----------------------------------------------------------------------
// Source rows (user tensors, read once): non-coherent path, no L1 allocation.
__device__ __forceinline__ int4 ld_stream(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}
// Ring slots written by a peer: bypass L1 (a ring slot is rewritten every lap, L1 could be stale).
__device__ __forceinline__ int4 ld_ring(const int4* ptr) { return __ldcg(ptr); }
__device__ __forceinline__ void st_na(int4* ptr, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

/// Warp copies `num_int4` 16-byte words from src to dst, with up to kUnroll loads in flight per
/// lane. The last round is predicated rather than a one-word-at-a-time loop, so a row of any length
/// costs ceil(num_int4 / (32 * kUnroll)) load latencies (a 7168-wide BF16 row: 2 rounds at 16).
template <int kUnroll, bool kSrcIsRing>
__device__ __forceinline__ void warp_copy(int4* __restrict__ dst, const int4* __restrict__ src, int num_int4,
                                          int lane) {
  for (int base = lane; base < num_int4; base += kUnroll * kWarpSize) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize;
      if (i < num_int4) v[u] = kSrcIsRing ? ld_ring(src + i) : ld_stream(src + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kWarpSize;
      if (i < num_int4) st_na(dst + i, v[u]);
    }
  }
}

}  // namespace flashep::device
