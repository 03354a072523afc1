// flashep: what straight-line code costs the first time it runs (a design input of the low-latency
// kernels, which run most of their code once per call: if instruction fetch misses cost a memory
// round trip per line, a phase's time follows its code size, not its memory round trips).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/icache_probe scripts/icache_probe.cu && /tmp/icache_probe
//
// One warp runs N bytes of straight-line code (independent FMAs in 8 chains, no loop, no memory
// access) between two reads of %clock64; ns at the SM clock read from the device. Cases: warm (the
// same kernel ran just before), after other code (another kernel of the same size ran between),
// after an L2 flush (a 256 MB memset between: the code's lines are out of L2 too).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "probe_check.cuh"

// kBytes of FMAs (16 bytes each); kSalt makes two kernels of the same size with different code.
template <int kBytes, int kSalt>
__global__ void straight_line(float* out, long long* cycles) {
  float a0 = threadIdx.x, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7;
  const float m = 1.0001f + kSalt * 1e-6f, c = 0.5f;
  const long long start = clock64();
#pragma unroll
  for (int i = 0; i < kBytes / 16 / 8; ++i) {
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a0) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a1) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a2) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a3) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a4) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a5) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a6) : "f"(m), "f"(c));
    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a7) : "f"(m), "f"(c));
  }
  const long long end = clock64();
  if (threadIdx.x == 0) *cycles = end - start;
  out[threadIdx.x] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

template <int kBytes>
void measure(float* out, long long* cycles, char* flush, double ghz) {
  const int reps = 9;
  double sum[3] = {0, 0, 0};
  double best[3] = {1e30, 1e30, 1e30};
  long long host = 0;
  for (int r = 0; r < reps; ++r) {
    for (int mode = 0; mode < 3; ++mode) {
      if (mode == 0) straight_line<kBytes, 0><<<1, 32>>>(out, cycles);      // warm: itself just before
      if (mode == 1) straight_line<kBytes, 1><<<1, 32>>>(out, cycles);      // other code between
      if (mode == 2) CHECK(cudaMemsetAsync(flush, r, size_t(256) << 20));  // the L2 flushed
      straight_line<kBytes, 0><<<1, 32>>>(out, cycles);
      CHECK(cudaMemcpy(&host, cycles, sizeof(host), cudaMemcpyDeviceToHost));
      const double ns = host / ghz;
      sum[mode] += ns;
      if (ns < best[mode]) best[mode] = ns;
    }
  }
  std::printf("| %6d | %8.0f | %8.0f | %8.0f | %8.0f | %8.0f | %8.0f |\n", kBytes, best[0], sum[0] / reps, best[1],
              sum[1] / reps, best[2], sum[2] / reps);
}

int main() {
  int device = 0, khz = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, device));
  const double ghz = khz / 1e6;
  float* out = nullptr;
  long long* cycles = nullptr;
  char* flush = nullptr;
  CHECK(cudaMalloc(&out, 1024 * sizeof(float)));
  CHECK(cudaMalloc(&cycles, sizeof(long long)));
  CHECK(cudaMalloc(&flush, size_t(256) << 20));
  std::printf("icache_probe: %s, clock %.2f GHz (cycles / clock; the SM may run slower); ns for N bytes of "
              "straight-line code, one warp, best / mean of 9\n\n",
              prop.name, ghz);
  std::printf("| bytes  | warm     |          | other code |        | L2 flushed |        |\n|---|---|---|---|---|---|---|\n");
  measure<1024>(out, cycles, flush, ghz);
  measure<4096>(out, cycles, flush, ghz);
  measure<16384>(out, cycles, flush, ghz);
  measure<65536>(out, cycles, flush, ghz);
  measure<131072>(out, cycles, flush, ghz);
  return 0;
}
