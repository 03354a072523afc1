// Helpers shared by the communicating kernels (notify, dispatch, combine): addressing inside a
// rank's buffer and the wait context built from the kernel's CommContext.
#pragma once

#include "kernels/device_utils.cuh"
#include "kernels/launch.hpp"

namespace flashep::kernels {

/// Byte address `byte_offset` inside a buffer (ours or a peer's).
__device__ __forceinline__ char* at(void* base, int64_t byte_offset) { return static_cast<char*>(base) + byte_offset; }
__device__ __forceinline__ int* int_at(void* base, int64_t byte_offset) {
  return reinterpret_cast<int*>(at(base, byte_offset));
}

__device__ __forceinline__ device::WaitContext wait_context(const CommContext& comm) {
  return device::WaitContext{comm.error, comm.abort_flag, comm.timeout_ns, comm.rank};
}

}  // namespace flashep::kernels
