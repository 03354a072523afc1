// Typed launch parameters of the composed multi-node path's reordering (src/kernels/compose.cu):
// the NVLink stage delivers a receiver's rows by forwarder, then source node, then token; the
// contract wants them by global source rank (node * M + forwarder), then token (docs/design.md,
// "Multi-node: the first version"). Plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/device_comm.hpp"

namespace flashep::kernels {

/// One block: the final row of every row of the NVLink stage's output, and the receive prefix over
/// global source ranks (DeepEP's recv_gbl_rank_prefix_sum, handle[-4]).
struct ComposePlanParams {
  DeviceComm comm;                // a row whose source index is out of range fails the call (kDispatchBadHandle)
  const int* rank_prefix_matrix;  // [M, M] of the NVLink stage's handle (inclusive prefix over forwarders)
  const int* recv_src_idx;        // [rows]: the row's index among its forwarder's N * T forwarded rows
  int nvl_rank, nvl_size, num_nodes, max_tokens;  // me, M, N, T
  int rows;                       // rows of the NVLink stage's output (num_worst_tokens in worst-case mode)
  int* final_row;                 // out [rows]: the row's place in the contract's order, -1 past the real rows
  int* recv_gbl_rank_prefix_sum;  // out [N * M]
};

/// Many blocks, one warp per row: moves rows between the NVLink stage's order and the contract's,
/// `forward` (NVLink -> contract, dispatch) or back (contract -> NVLink, before combine).
struct ComposeCopyParams {
  const int* final_row;  // [rows] (plan)
  int rows;
  int row_bytes;         // H * element size (a multiple of 16)
  int num_scales;        // H / 128 for fp8 rows, else 0
  int num_topk;          // K, or 0
  bool forward;
  const void* src_x;  void* dst_x;
  const float* src_scales;  float* dst_scales;      // [rows, num_scales] or nullptr
  const int64_t* src_topk_idx;  int64_t* dst_topk_idx;  // [rows, K] or nullptr
  const float* src_topk_weights;  float* dst_topk_weights;  // [rows, K] or nullptr
};

cudaError_t launch_compose_plan(const ComposePlanParams& p, cudaStream_t stream);
cudaError_t launch_compose_copy(const ComposeCopyParams& p, int num_blocks, cudaStream_t stream);

}  // namespace flashep::kernels
