// flashep: memory round-trip latencies on this machine, by load kind (a design input of the
// low-latency kernels, where each dependent round trip is on the critical path).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/latency_probe scripts/latency_probe.cu && /tmp/latency_probe
//
// One thread chases pointers through a random cycle of 128-byte lines, so every load depends on
// the previous one; the time per load (globaltimer, ns) is the round trip. Regions: 8 MB (fits the
// L2: "L2" after a warm-up pass) and 1 GB (misses it: "HBM"), on this GPU and, when a second GPU is
// visible and peer access works, on the peer's memory over NVLink. Load kinds: plain, .cg (L2
// only), volatile, relaxed.sys, acquire.sys (what the kernels' waits use).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#define CHECK(call)                                                                    \
  do {                                                                                 \
    cudaError_t e = (call);                                                            \
    if (e != cudaSuccess) {                                                            \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

enum Kind { kPlain, kCg, kVolatile, kRelaxedSys, kAcquireSys, kKinds };
static const char* kKindNames[kKinds] = {"plain", ".cg", "volatile", "relaxed.sys", "acquire.sys"};

template <int kKind>
__device__ __forceinline__ uint64_t load(const uint64_t* p) {
  uint64_t v;
  if constexpr (kKind == kPlain) asm volatile("ld.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (kKind == kCg) asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (kKind == kVolatile) asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else if constexpr (kKind == kRelaxedSys) asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  else asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/// Chases `steps` pointers from line 0 (warm-up pass of `warm` steps first); out[0] = ns per load.
template <int kKind>
__global__ void chase(const uint64_t* base, int steps, int warm, uint64_t* out) {
  uint64_t i = 0;
  for (int s = 0; s < warm; ++s) i = load<kKind>(base + i * 16);
  const uint64_t t0 = now_ns();
  for (int s = 0; s < steps; ++s) i = load<kKind>(base + i * 16);
  const uint64_t t1 = now_ns();
  out[0] = (t1 - t0) * 1000 / steps;  // ps per load
  out[1] = i;                         // keeps the chase alive
}

/// A random cycle over `lines` 128-byte lines (16 words each; word 0 holds the next line's index).
static void fill_cycle(uint64_t* dev, size_t lines, unsigned seed) {
  std::vector<uint64_t> order(lines);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin() + 1, order.end(), std::mt19937_64(seed));
  std::vector<uint64_t> host(lines * 16, 0);
  for (size_t k = 0; k < lines; ++k) host[order[k] * 16] = order[(k + 1) % lines];
  CHECK(cudaMemcpy(dev, host.data(), host.size() * 8, cudaMemcpyHostToDevice));
}

template <int kKind>
static double run(const uint64_t* base, int steps, int warm, uint64_t* out) {
  chase<kKind><<<1, 1>>>(base, steps, warm, out);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  uint64_t host[2];
  CHECK(cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost));
  return host[0] / 1000.0;
}

static void row(const char* where, const uint64_t* base, int steps, int warm, uint64_t* out) {
  std::printf("| %-22s", where);
  double r[kKinds] = {run<kPlain>(base, steps, warm, out), run<kCg>(base, steps, warm, out),
                      run<kVolatile>(base, steps, warm, out), run<kRelaxedSys>(base, steps, warm, out),
                      run<kAcquireSys>(base, steps, warm, out)};
  for (double v : r) std::printf(" | %8.0f", v);
  std::printf(" |\n");
}

int main() {
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("latency_probe: %s, %d GPU(s) visible, L2 %d MB; ns per dependent load (one thread)\n\n", prop.name, n,
              prop.l2CacheSize >> 20);
  const size_t small_lines = (8u << 20) / 128, big_lines = (1ull << 30) / 128;
  std::printf("| memory                ");
  for (const char* k : kKindNames) std::printf(" | %8s", k);
  std::printf(" |\n|---|---|---|---|---|---|\n");
  for (int owner = 0; owner < std::min(n, 2); ++owner) {
    if (owner == 1) {
      int can = 0;
      CHECK(cudaDeviceCanAccessPeer(&can, 0, 1));
      if (!can) break;
      CHECK(cudaSetDevice(0));
      cudaError_t e = cudaDeviceEnablePeerAccess(1, 0);
      if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) break;
      (void)cudaGetLastError();
    }
    CHECK(cudaSetDevice(owner));
    uint64_t *small = nullptr, *big = nullptr;
    CHECK(cudaMalloc(&small, small_lines * 128));
    CHECK(cudaMalloc(&big, big_lines * 128));
    fill_cycle(small, small_lines, 1);
    fill_cycle(big, big_lines, 2);
    CHECK(cudaSetDevice(0));
    uint64_t* out = nullptr;
    CHECK(cudaMalloc(&out, 16));
    // 8 MB warmed by a full pass: L2 hits (the peer's L2 for peer memory); 1 GB: mostly misses.
    row(owner == 0 ? "local, 8 MB (L2)" : "peer, 8 MB (its L2)", small, 4000, int(small_lines), out);
    row(owner == 0 ? "local, 1 GB (HBM)" : "peer, 1 GB (its HBM)", big, 4000, 0, out);
    CHECK(cudaFree(out));
    CHECK(cudaSetDevice(owner));
    CHECK(cudaFree(small));
    CHECK(cudaFree(big));
    CHECK(cudaSetDevice(0));
  }
  return 0;
}
