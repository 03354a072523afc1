// Diagnostics builds only (CMake FLASHEP_ENABLE_DIAGNOSTICS): the low-latency kernels' timeline.
// Thread 0 of each block stamps %globaltimer at named points; per point the earliest and the
// latest block are kept (atomicMin / atomicMax), so a call's critical path reads off directly:
// "last block past point i" minus "first block at entry". The host takes and resets the stamps
// with take_low_latency_trace (python: flashep._C.debug_ll_trace; bench_low_latency --trace).
// In production builds trace_mark compiles to nothing.
#pragma once

#include <cstdint>

#include "kernels/device_utils.cuh"
#include "kernels/low_latency_launch.hpp"
#include "kernels/profile.cuh"

namespace flashep::ll {

struct TraceStamps {
  unsigned long long first[kernels::kLowLatencyTracePoints];
  unsigned long long last[kernels::kLowLatencyTracePoints];
};

/// Thread 0 of the block: stamps point `point` (in `stamps`, a __device__ global of the kernel's
/// translation unit).
__device__ __forceinline__ void trace_mark(TraceStamps* stamps, int point) {
  if constexpr (device::kDiagnostics) {
    if (threadIdx.x == 0) {
      const unsigned long long now = device::global_timer_ns();
      atomicMin(&stamps->first[point], now);
      atomicMax(&stamps->last[point], now);
    }
  } else {
    (void)stamps;
    (void)point;
  }
}

/// Host side (one copy per kernel translation unit): the stamps, then reset.
inline std::vector<uint64_t> take_trace_stamps(const void* symbol) {
  std::vector<uint64_t> out;
  if constexpr (!device::kDiagnostics) {
    (void)symbol;
    return out;
  } else {
    TraceStamps host{};
    if (cudaMemcpyFromSymbol(&host, symbol, sizeof(host)) != cudaSuccess) return out;
    for (int i = 0; i < kernels::kLowLatencyTracePoints; ++i) out.push_back(host.first[i]);
    for (int i = 0; i < kernels::kLowLatencyTracePoints; ++i) out.push_back(host.last[i]);
    for (int i = 0; i < kernels::kLowLatencyTracePoints; ++i) host.first[i] = ~0ull, host.last[i] = 0;
    cudaMemcpyToSymbol(symbol, &host, sizeof(host));
    return out;
  }
}

}  // namespace flashep::ll
