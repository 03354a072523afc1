// flashep: memory round-trip latencies on this machine, by load kind (a design input of the
// low-latency kernels, where each dependent round trip is on the critical path).
//
//   nvcc -O3 -arch=sm_90 -o /tmp/latency_probe scripts/latency_probe.cu && /tmp/latency_probe
//
// One thread chases pointers through a random cycle of 128-byte lines, so every load depends on
// the previous one; the time per load (globaltimer, ns) is the round trip. Regions: 8 MB (fits the
// L2: "L2" after a warm-up pass) and 1 GB (misses it: "HBM"), on this GPU and, when a second GPU is
// visible and peer access works, on the peer's memory over NVLink. Load kinds: plain, .cg (L2
// only), volatile, relaxed.sys, acquire.sys (what the kernels' waits use). Then the step of
// %globaltimer, and what the first touch of a page costs after other work (address translation).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "probe_check.cuh"

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

/// Chases `steps` pointers from line `start` (warm-up pass of `warm` steps first); out[0] = ps per load.
template <int kKind>
__global__ void chase(const uint64_t* base, uint64_t start, int steps, int warm, uint64_t* out) {
  uint64_t i = start;
  for (int s = 0; s < warm; ++s) i = load<kKind>(base + i * 16);
  const uint64_t t0 = now_ns();
  for (int s = 0; s < steps; ++s) i = load<kKind>(base + i * 16);
  const uint64_t t1 = now_ns();
  out[0] = (t1 - t0) * 1000 / steps;  // ps per load
  out[1] = i;                         // keeps the chase alive
}

/// A random cycle over `lines` 128-byte lines (16 words each; word 0 holds the next line's index).
/// Returns lines spread along the cycle, so that each load kind chases its own stretch (a kind that
/// followed another along the same lines found them in L2: the first version of this probe
/// reported L2 latencies for the 1 GB rows).
static std::vector<uint64_t> fill_cycle(uint64_t* dev, size_t lines, unsigned seed) {
  std::vector<uint64_t> order(lines);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin() + 1, order.end(), std::mt19937_64(seed));
  std::vector<uint64_t> host(lines * 16, 0);
  for (size_t k = 0; k < lines; ++k) host[order[k] * 16] = order[(k + 1) % lines];
  CHECK(cudaMemcpy(dev, host.data(), host.size() * 8, cudaMemcpyHostToDevice));
  std::vector<uint64_t> starts;
  for (int k = 0; k < kKinds; ++k) starts.push_back(order[(size_t(k) * lines) / kKinds]);
  return starts;
}

template <int kKind>
static double run(const uint64_t* base, uint64_t start, int steps, int warm, uint64_t* out) {
  chase<kKind><<<1, 1>>>(base, start, steps, warm, out);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  uint64_t host[2];
  CHECK(cudaMemcpy(host, out, sizeof(host), cudaMemcpyDeviceToHost));
  return host[0] / 1000.0;
}

static void row(const char* where, const uint64_t* base, const std::vector<uint64_t>& starts, int steps, int warm,
                uint64_t* out) {
  std::printf("| %-22s", where);
  double r[kKinds] = {run<kPlain>(base, starts[0], steps, warm, out), run<kCg>(base, starts[1], steps, warm, out),
                      run<kVolatile>(base, starts[2], steps, warm, out),
                      run<kRelaxedSys>(base, starts[3], steps, warm, out),
                      run<kAcquireSys>(base, starts[4], steps, warm, out)};
  for (double v : r) std::printf(" | %8.0f", v);
  std::printf(" |\n");
}

/// First touches of memory pages after other work (a low-latency kernel after a GEMM touches pages
/// nothing has touched since): a chain of dependent loads, one per 2 MB page through 512 pages, in
/// three states. Cold: after an 8 GB memset (the address translation caches and the L2 hold other
/// pages). Translation warm, L2 cold: chain A has just run through the same pages, then a 256 MB
/// memset flushed the L2, then chain B (other lines of those pages). Warm: chain B again.
static void first_touch() {
  const size_t page = size_t(2) << 20, pages = 512, lines_per_page = page / 128;
  uint64_t *region = nullptr, *out = nullptr;
  char *thrash = nullptr, *flush = nullptr;
  const size_t thrash_bytes = size_t(8) << 30, flush_bytes = size_t(256) << 20;
  if (cudaMalloc(&region, pages * page) != cudaSuccess || cudaMalloc(&thrash, thrash_bytes) != cudaSuccess ||
      cudaMalloc(&flush, flush_bytes) != cudaSuccess) {
    (void)cudaGetLastError();
    std::printf("\nfirst touch: not enough memory, skipped\n");
    return;
  }
  CHECK(cudaMalloc(&out, 16));
  std::mt19937_64 rng(3);
  uint64_t chain[2][pages];
  for (auto& c : chain)
    for (size_t k = 0; k < pages; ++k) c[k] = k * lines_per_page + 1 + rng() % (lines_per_page - 2);
  for (auto& c : chain)
    for (size_t k = 0; k < pages; ++k) {
      const uint64_t next = c[(k + 1) % pages];
      CHECK(cudaMemcpy(region + c[k] * 16, &next, sizeof(next), cudaMemcpyHostToDevice));
    }
  const int steps = static_cast<int>(pages) - 1;
  CHECK(cudaMemset(thrash, 1, thrash_bytes));
  const double cold = run<kRelaxedSys>(region, chain[0][0], steps, 0, out);
  (void)run<kRelaxedSys>(region, chain[0][0], steps, 0, out);  // chain A: translations of every page
  CHECK(cudaMemset(flush, 2, flush_bytes));
  const double l2_cold = run<kRelaxedSys>(region, chain[1][0], steps, 0, out);
  const double warm = run<kRelaxedSys>(region, chain[1][0], steps, 0, out);
  std::printf("\nfirst touch of a page (relaxed.sys loads, one per 2 MB page, ns each): cold (after an 8 GB memset) "
              "%.0f; translation warm, L2 cold %.0f; warm %.0f\n", cold, l2_cold, warm);
  CHECK(cudaFree(region));
  CHECK(cudaFree(thrash));
  CHECK(cudaFree(flush));
  CHECK(cudaFree(out));
}

/// %globaltimer read back to back: the steps it moves in (the low-latency trace stamps with it).
__global__ void timer_steps(uint64_t* out, int n) {
  for (int k = 0; k < n; ++k) out[k] = now_ns();
}

static void globaltimer_granularity() {
  const int n = 4096;
  uint64_t* dev = nullptr;
  CHECK(cudaMalloc(&dev, n * sizeof(uint64_t)));
  timer_steps<<<1, 1>>>(dev, n);
  CHECK(cudaDeviceSynchronize());
  std::vector<uint64_t> t(n);
  CHECK(cudaMemcpy(t.data(), dev, n * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  CHECK(cudaFree(dev));
  std::vector<uint64_t> steps;
  for (int k = 1; k < n; ++k)
    if (t[k] != t[k - 1]) steps.push_back(t[k] - t[k - 1]);
  std::sort(steps.begin(), steps.end());
  if (steps.empty()) {
    std::printf("\n%%globaltimer: did not move in %d reads\n", n);
    return;
  }
  std::printf("\n%%globaltimer: %d reads over %llu ns moved %zu times; steps min %llu / median %llu / max %llu ns\n", n,
              static_cast<unsigned long long>(t[n - 1] - t[0]), steps.size(), static_cast<unsigned long long>(steps.front()),
              static_cast<unsigned long long>(steps[steps.size() / 2]), static_cast<unsigned long long>(steps.back()));
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
    const std::vector<uint64_t> small_starts = fill_cycle(small, small_lines, 1);
    const std::vector<uint64_t> big_starts = fill_cycle(big, big_lines, 2);
    CHECK(cudaSetDevice(0));
    uint64_t* out = nullptr;
    CHECK(cudaMalloc(&out, 16));
    // 8 MB warmed by a full pass: L2 hits (the peer's L2 for peer memory); 1 GB: mostly misses.
    row(owner == 0 ? "local, 8 MB (L2)" : "peer, 8 MB (its L2)", small, small_starts, 4000, int(small_lines), out);
    row(owner == 0 ? "local, 1 GB (HBM)" : "peer, 1 GB (its HBM)", big, big_starts, 4000, 0, out);
    CHECK(cudaFree(out));
    CHECK(cudaSetDevice(owner));
    CHECK(cudaFree(small));
    CHECK(cudaFree(big));
    CHECK(cudaSetDevice(0));
  }
  globaltimer_granularity();
  first_touch();
  return 0;
}
