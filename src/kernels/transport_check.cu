// check_transports: every rank sends a pattern to every peer through the transport chosen for it
// (NVLink stores, or NVSHMEM puts with signals) and checks what it received. The proof that the
// memory domains, the device communicator and the per-peer helpers work together, and a health
// check users can run. (No role word in the kernel's name: it is not a dispatch or combine.)
#include "kernels/launch.hpp"
#include "kernels/peer_transport.cuh"

namespace flashep::kernels {
namespace {

constexpr int kCheckThreads = 512;

__device__ __forceinline__ uint32_t pattern(int src, int dst, int64_t word, uint64_t seq) {
  uint64_t h = (uint64_t(src) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(dst) * 0xC2B2AE3D27D4EB4Full) ^
               (uint64_t(word) * 0x165667B19E3779F9ull) ^ (seq * 0x27D4EB2F165667C5ull);
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return static_cast<uint32_t>(h);
}

/// Our outbox and inbox for `peer`: in the NVLink ring region (NVLink peers) or the symmetric
/// region (NVSHMEM peers); [outbox: R x words][inbox: R x words] 32-bit words.
__device__ __forceinline__ char* region_of(const DeviceComm& c, int peer) {
  return c.is_nvl_peer(peer) ? c.local() : c.sym_base;
}

__global__ void __launch_bounds__(kCheckThreads, 1) transport_check_kernel(const __grid_constant__ TransportCheckParams p) {
  const DeviceComm& c = p.comm;
  if (device::aborted_at_entry(c)) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  const int64_t bytes = p.words * 4;
  auto reached = [&](int peer) { return peer != c.rank && (c.is_nvl_peer(peer) || p.nvshmem_peers); };
  auto outbox = [&](int peer) { return reinterpret_cast<uint32_t*>(region_of(c, peer) + int64_t(peer) * bytes); };
  auto inbox_offset = [&](int src) { return int64_t(c.num_ranks + src) * bytes; };

  // 1. Fill the outboxes.
  for (int peer = 0; peer < c.num_ranks; ++peer) {
    if (!reached(peer)) continue;
    uint32_t* out = outbox(peer);
    for (int64_t i = threadIdx.x; i < p.words; i += blockDim.x) out[i] = pattern(c.rank, peer, i, p.seq);
  }
  __threadfence();
  __syncthreads();

  // 2. Send: warp w serves peers w, w + warps, ...
  for (int peer = warp; peer < c.num_ranks; peer += num_warps) {
    if (!reached(peer)) continue;
    const bool nvl = c.is_nvl_peer(peer);
    const int64_t signal = nvl ? c.nvl.control.check_signal(c.nvl_rank) : c.rdma.check_signal(c.rank);
    device::warp_put_with_signal(c, peer, inbox_offset(c.rank), outbox(peer), bytes, signal, p.seq, lane);
  }

  // 3. Receive: wait for each peer's signal, then compare its data with the pattern.
  for (int peer = warp; peer < c.num_ranks; peer += num_warps) {
    if (!reached(peer)) continue;
    const bool nvl = c.is_nvl_peer(peer);
    uint64_t* signal = reinterpret_cast<uint64_t*>(
        nvl ? c.local() + c.nvl.control.check_signal(c.nvl_index(peer)) : c.sym_base + c.rdma.check_signal(peer));
    int ok = 1;
    if (lane == 0) ok = device::wait_signal(c, signal, p.seq, Phase::kTransportCheck, peer);
    if (!__shfl_sync(0xffffffffu, ok, 0)) {
      if (lane == 0) p.mismatches[peer] = -1;
      continue;
    }
    __syncwarp();  // lane 0's acquire orders the data before every lane's reads
    const uint32_t* in = reinterpret_cast<const uint32_t*>(region_of(c, peer) + inbox_offset(peer));
    long long wrong = 0;
    for (int64_t i = lane; i < p.words; i += 32) wrong += __ldcv(in + i) != pattern(peer, c.rank, i, p.seq);
    for (int offset = 16; offset > 0; offset /= 2) wrong += __shfl_xor_sync(0xffffffffu, wrong, offset);
    if (lane == 0) p.mismatches[peer] = wrong;
  }
#if FLASHEP_WITH_NVSHMEM
  if (p.nvshmem_peers) {
    __syncthreads();
    if (threadIdx.x == 0) nvshmem_quiet();
  }
#endif
}

__global__ void __launch_bounds__(kCheckThreads) put_probe_kernel(const __grid_constant__ PutProbeParams p) {
#if FLASHEP_WITH_NVSHMEM
  const DeviceComm& c = p.comm;
  for (int64_t at = int64_t(blockIdx.x) * p.chunk; at < p.bytes; at += int64_t(gridDim.x) * p.chunk) {
    const int64_t len = p.bytes - at < p.chunk ? p.bytes - at : p.chunk;
    nvshmemx_putmem_nbi_block(c.sym_base + p.offset + at, c.sym_base + p.offset + at, static_cast<size_t>(len), p.peer);
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
#else
  (void)p;
#endif
}

}  // namespace

cudaError_t launch_put_probe(const PutProbeParams& p, int num_blocks, cudaStream_t stream) {
  put_probe_kernel<<<num_blocks, kCheckThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_transport_check(const TransportCheckParams& p, cudaStream_t stream) {
  transport_check_kernel<<<1, kCheckThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
