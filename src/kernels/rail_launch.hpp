// Typed launch parameters of the multi-node rail stage (src/kernels/rail.cu) and their host-side
// launch functions: the first stage of the composed multi-node dispatch (docs/design.md,
// "Multi-node: the first version, composed of stages"). Plain C++.
//
// One call is three kernels on one stream: plan (the slot of every token at each destination
// node's rail peer), send (every token once per destination node, counts first, each message with
// its own flag) and receive (wait for every source node, lay the forwarded tokens out as the
// NVLink stage's input). The rail state in the symmetric region holds the call's sequence number,
// advanced by the receive, so CUDA-graph replays stay in step.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/device_comm.hpp"
#include "core/internode_compose.hpp"

namespace flashep::kernels {

struct RailPlanParams {
  DeviceComm comm;
  NodeShape shape;
  const bool* is_token_in_rank;  // [n, R]
  const int64_t* topk_idx;       // [n, K] or nullptr: block 0 checks every id is in [-1, E) before anything is sent
  int num_tokens, num_topk, num_experts;
  int* rail_slot;   // out [n, N]: the token's slot at node b's rail peer, -1 when it does not go to b
  int* rail_count;  // out [N]: tokens to each node
};

struct RailSendParams {
  DeviceComm comm;
  NodeShape shape;
  RailRegion region;              // offsets in the symmetric region (the same on every rank)
  const void* x;                  // [n, H]: bf16, or fp8 with x_scales
  const float* x_scales;          // fp8: [n, H/128] of any strides
  int64_t scale_token_stride, scale_hidden_stride;
  const int64_t* topk_idx;        // [n, K] or nullptr (K = 0)
  const float* topk_weights;      // [n, K] or nullptr
  const bool* is_token_in_rank;   // [n, R]
  const int* rail_slot;           // [n, N] (plan)
  const int* rail_count;          // [N] (plan)
  int num_tokens, hidden, num_topk, fp8;
  uint32_t call_hash;             // rail_call_hash of the exchange (travels with the counts)
};

struct RailReceiveParams {
  DeviceComm comm;
  NodeShape shape;
  RailRegion region;
  int hidden, num_topk, num_local_experts, fp8;
  uint32_t call_hash;         // what every source's counts must carry
  // Outputs of F = N * T rows: source node a's tokens at rows [a * T, a * T + count_a), the rest
  // go nowhere (empty local mask, ids -1, source -1; their x rows are left as they are).
  void* fwd_x;                // [F, H]
  float* fwd_scales;          // fp8: [F, H/128] row-major
  int64_t* fwd_topk_idx;      // [F, K]: node-local expert ids (node_local_expert), or -1
  float* fwd_topk_weights;    // [F, K] (when the sources sent weights)
  bool* fwd_in_rank;          // [F, M]: the token's local ranks on this node
  int* fwd_source;            // [F, 2]: source node, source token
  int* fwd_counts;            // out [N]: tokens from each source node (their order in fwd_*)
};

/// Combine, forwarder side: the NVLink stage's combined row of every forwarded token goes back to
/// its source (the rail peer on the token's source node), at the slot the dispatch's plan gave it
/// there, with the token's combined weights and its own flag.
struct RailReturnSendParams {
  DeviceComm comm;
  NodeShape shape;
  RailRegion region;
  const void* combined_x;          // [N * T, H] bf16, in the forwarded rows' order
  const float* combined_weights;   // [N * T, K] or nullptr
  const int* fwd_counts;           // [N] (the dispatch's rail receive)
  int hidden, num_topk;
};

/// Combine, source side: every token adds the rows its destination nodes returned (float32,
/// ascending node), and the bias, into the BF16 result; likewise the weights.
struct RailReturnReceiveParams {
  DeviceComm comm;
  NodeShape shape;
  RailRegion region;
  const int* rail_slot;            // [n, N] (the dispatch's plan)
  int num_tokens, hidden, num_topk;
  const void* bias0;               // [n, H] bf16 or nullptr
  const void* bias1;               // [n, H] bf16 or nullptr
  void* combined_x;                // out [n, H] bf16
  float* combined_weights;         // out [n, K] or nullptr
};

/// Threads per block of the rail kernels.
inline constexpr int kRailThreads = 512;

cudaError_t launch_rail_plan(const RailPlanParams& p, cudaStream_t stream);
cudaError_t launch_rail_send(const RailSendParams& p, int num_blocks, cudaStream_t stream);
cudaError_t launch_rail_receive(const RailReceiveParams& p, int num_blocks, cudaStream_t stream);
cudaError_t launch_rail_return_send(const RailReturnSendParams& p, int num_blocks, cudaStream_t stream);
cudaError_t launch_rail_return_receive(const RailReturnReceiveParams& p, int num_blocks, cudaStream_t stream);

}  // namespace flashep::kernels
