// Host+device function markers and the integer helpers every layout uses. The arithmetic of
// routing, offsets and buffer sizes is written once, as FLASHEP_HD functions, so that the CPU tests
// exercise exactly what the kernels compute.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLASHEP_HD __host__ __device__ __forceinline__
#else
#define FLASHEP_HD inline
#endif

namespace flashep {

FLASHEP_HD constexpr int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}
FLASHEP_HD constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

/// A call's check word from the fields every rank must agree on (FNV-1a over the ints), never 0
/// (a cleaned word never matches).
FLASHEP_HD uint32_t call_fields_hash(const int* fields, int count) {
  uint32_t h = 2166136261u;
  for (int i = 0; i < count; ++i) h = (h ^ uint32_t(fields[i])) * 16777619u;
  return h | 1u;
}

}  // namespace flashep
