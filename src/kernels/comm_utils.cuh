// Helpers shared by the intranode kernels (notify, dispatch, combine): addressing inside a rank's
// NVLink allocation (ours or a peer's).
#pragma once

#include "kernels/failure.cuh"
#include "kernels/launch.hpp"

namespace flashep::kernels {

/// Byte address `byte_offset` inside an allocation (ours or a peer's).
__device__ __forceinline__ char* at(void* base, int64_t byte_offset) { return static_cast<char*>(base) + byte_offset; }
__device__ __forceinline__ int* int_at(void* base, int64_t byte_offset) {
  return reinterpret_cast<int*>(at(base, byte_offset));
}

}  // namespace flashep::kernels
