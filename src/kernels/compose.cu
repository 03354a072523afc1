// The composed multi-node path's reordering (src/kernels/compose_launch.hpp has the contract; the
// arithmetic is composed_nvlink_row / composed_final_row of src/core/internode_compose.hpp, which
// the CPU tests check). Written 2026-11-30; not yet called by the host, not run on GPUs.
#include "kernels/compose_launch.hpp"
#include "kernels/failure.cuh"
#include "core/internode_routing.hpp"  // kMaxNodes
#include "flashep/config.hpp"          // kMaxNvlRanks

namespace flashep::kernels {
namespace {

constexpr int kComposeThreads = 512;

__device__ __forceinline__ int forwarder_of(const int* starts, int M, int row) {
  int i = 0;
  while (i + 1 < M && starts[i + 1] <= row) ++i;
  return i;
}

__global__ void __launch_bounds__(kComposeThreads) compose_plan_kernel(const __grid_constant__ ComposePlanParams p) {
  const int M = p.nvl_size, N = p.num_nodes, T = p.max_tokens, me = p.nvl_rank;
  __shared__ int s_start[kMaxNvlRanks + 1];             // forwarder i's rows: [s_start[i], s_start[i + 1])
  __shared__ int s_count[kMaxNvlRanks * kMaxNodes];     // [i][a]
  __shared__ int s_nvlink_base[kMaxNvlRanks * kMaxNodes];  // [i][a]: first row of (i, a) in the NVLink order
  __shared__ int s_final_base[kMaxNvlRanks * kMaxNodes];   // [i][a]: first row of (i, a) in the contract's order
  __shared__ int s_bad;
  for (int i = threadIdx.x; i < M * N; i += blockDim.x) s_count[i] = 0;
  if (threadIdx.x == 0) {
    s_bad = 0;
    s_start[0] = 0;
    for (int i = 0; i < M; ++i) s_start[i + 1] = p.rank_prefix_matrix[i * M + me];
  }
  __syncthreads();
  const int real_rows = min(s_start[M], p.rows);
  for (int r = threadIdx.x; r < real_rows; r += blockDim.x) {
    const int f = p.recv_src_idx[r];
    if (f < 0 || f >= N * T) {
      atomicAdd(&s_bad, 1);
      continue;
    }
    atomicAdd(&s_count[forwarder_of(s_start, M, r) * N + f / T], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 0; i < M; ++i) {
      int row = s_start[i];
      for (int a = 0; a < N; ++a) {
        s_nvlink_base[i * N + a] = row;
        row += s_count[i * N + a];
      }
    }
    int row = 0;
    for (int a = 0; a < N; ++a)
      for (int i = 0; i < M; ++i) {
        s_final_base[i * N + a] = row;
        row += s_count[i * N + a];
        p.recv_gbl_rank_prefix_sum[a * M + i] = row;
      }
    if (s_bad != 0 || s_start[M] > p.rows)  // not the handle of an NVLink stage of this shape
      device::fail(p.comm, Phase::kDispatchBadHandle, -1, -1, p.rows, s_start[M] > p.rows ? s_start[M] : -s_bad);
  }
  __syncthreads();
  for (int r = threadIdx.x; r < p.rows; r += blockDim.x) {
    int out = -1;
    if (r < real_rows) {
      const int f = p.recv_src_idx[r];
      if (f >= 0 && f < N * T) {
        const int cell = forwarder_of(s_start, M, r) * N + f / T;
        out = s_final_base[cell] + (r - s_nvlink_base[cell]);
      }
    }
    p.final_row[r] = out;
  }
}

__global__ void __launch_bounds__(kComposeThreads) compose_copy_kernel(const __grid_constant__ ComposeCopyParams p) {
  const int lane = threadIdx.x % 32;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, num_warps = gridDim.x * blockDim.x / 32;
  for (int r = warp; r < p.rows; r += num_warps) {
    const int d = p.final_row[r];
    if (d < 0) continue;  // warp-uniform
    const int64_t from = p.forward ? r : d, to = p.forward ? d : r;
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(p.src_x) + from * p.row_bytes);
    int4* dst = reinterpret_cast<int4*>(static_cast<char*>(p.dst_x) + to * p.row_bytes);
    for (int i = lane; i < p.row_bytes / 16; i += 32) dst[i] = src[i];
    for (int i = lane; i < p.num_scales; i += 32) p.dst_scales[to * p.num_scales + i] = p.src_scales[from * p.num_scales + i];
    for (int k = lane; k < p.num_topk; k += 32) {
      if (p.src_topk_idx != nullptr) p.dst_topk_idx[to * p.num_topk + k] = p.src_topk_idx[from * p.num_topk + k];
      if (p.src_topk_weights != nullptr) p.dst_topk_weights[to * p.num_topk + k] = p.src_topk_weights[from * p.num_topk + k];
    }
  }
}

}  // namespace

cudaError_t launch_compose_plan(const ComposePlanParams& p, cudaStream_t stream) {
  compose_plan_kernel<<<1, kComposeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
cudaError_t launch_compose_copy(const ComposeCopyParams& p, int num_blocks, cudaStream_t stream) {
  compose_copy_kernel<<<num_blocks, kComposeThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace flashep::kernels
