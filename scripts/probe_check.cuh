// flashep: what the standalone probes in scripts/ (latency_probe.cu, icache_probe.cu) share: a CUDA
// call that fails prints where and exits.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(call)                                                                         \
  do {                                                                                      \
    cudaError_t e = (call);                                                                 \
    if (e != cudaSuccess) {                                                                 \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);  \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)
