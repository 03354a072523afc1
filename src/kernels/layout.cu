// get_dispatch_layout: routing (topk_idx) -> per-rank, per-node and per-expert counts and the
// token-to-rank membership matrix. One thread per token; counts in shared memory, then one global
// atomic per block and counter (integer counts, so the result is deterministic).
#include "kernels/failure.cuh"
#include "kernels/launch.hpp"

namespace flashep::kernels {
namespace {

constexpr int kLayoutThreads = 256;

__global__ void __launch_bounds__(kLayoutThreads) get_dispatch_layout_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int shared_counts[];  // [E] experts, [R] ranks, [nodes] nodes
  // Nothing here touches a peer, but a buffer aborted by a peer is recorded at every call.
  if (device::aborted_at_entry(p.comm)) return;
  const int num_ranks = p.comm.num_ranks, nvl_size = p.comm.nvl_size;
  const int num_nodes = num_ranks / nvl_size;
  int* expert_counts = shared_counts;
  int* rank_counts = expert_counts + p.num_experts;
  int* node_counts = rank_counts + num_ranks;
  for (int i = threadIdx.x; i < p.num_experts + num_ranks + num_nodes; i += blockDim.x) shared_counts[i] = 0;
  __syncthreads();

  const int num_local_experts = p.num_experts / num_ranks;
  const int token = blockIdx.x * blockDim.x + threadIdx.x;
  if (token < p.num_tokens) {
    const int64_t* idx = p.topk_idx + int64_t(token) * p.num_topk;
    bool* in_rank = p.is_token_in_rank + int64_t(token) * num_ranks;
    for (int r = 0; r < num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < p.num_topk; ++k) {
      const int64_t expert = idx[k];
      if (expert < 0) {
        if (expert != -1) device::fail(p.comm, Phase::kLayoutInvalidExpert, p.num_experts, -1, token, int(expert));
        continue;
      }
      if (expert >= p.num_experts) {
        device::fail(p.comm, Phase::kLayoutInvalidExpert, p.num_experts, -1, token, int(expert));
        continue;
      }
      atomicAdd(&expert_counts[expert], 1);
      const int rank = int(expert / num_local_experts);
      // First slot of this token on `rank`/its node? (K <= 32: a quadratic scan is cheapest.)
      bool rank_seen = false, node_seen = false;
      for (int j = 0; j < k; ++j) {
        const int64_t other = idx[j];
        if (other < 0 || other >= p.num_experts) continue;
        const int other_rank = int(other / num_local_experts);
        rank_seen |= other_rank == rank;
        node_seen |= other_rank / nvl_size == rank / nvl_size;
      }
      if (!rank_seen) {
        in_rank[rank] = true;
        atomicAdd(&rank_counts[rank], 1);
      }
      if (!node_seen) atomicAdd(&node_counts[rank / nvl_size], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    if (expert_counts[i]) atomicAdd(&p.num_tokens_per_expert[i], expert_counts[i]);
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x)
    if (rank_counts[i]) atomicAdd(&p.num_tokens_per_rank[i], rank_counts[i]);
  if (p.num_tokens_per_rdma_rank != nullptr)
    for (int i = threadIdx.x; i < num_nodes; i += blockDim.x)
      if (node_counts[i]) atomicAdd(&p.num_tokens_per_rdma_rank[i], node_counts[i]);
}

}  // namespace

cudaError_t launch_get_dispatch_layout(const LayoutParams& p, cudaStream_t stream) {
  const int num_ranks = p.comm.num_ranks;
  const int num_nodes = num_ranks / p.comm.nvl_size;
  // The outputs are accumulated with atomics: clear them first (memsets, not kernels).
  cudaError_t err = cudaMemsetAsync(p.num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(p.num_tokens_per_expert, 0, sizeof(int) * p.num_experts, stream);
  if (err == cudaSuccess && p.num_tokens_per_rdma_rank != nullptr)
    err = cudaMemsetAsync(p.num_tokens_per_rdma_rank, 0, sizeof(int) * num_nodes, stream);
  if (err != cudaSuccess) return err;
  const size_t smem = sizeof(int) * (p.num_experts + num_ranks + num_nodes);
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(get_dispatch_layout_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const int blocks = p.num_tokens > 0 ? ceil_div(p.num_tokens, kLayoutThreads) : 1;
  get_dispatch_layout_kernel<<<blocks, kLayoutThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
