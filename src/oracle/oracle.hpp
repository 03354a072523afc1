// flashep CPU oracle: the semantics of ../shared/docs/interface.md (single-node high-throughput
// layout, dispatch, combine), implemented plainly over the inputs of the whole world (every rank),
// so a test process that knows all ranks' inputs (same seed) can compute any rank's expected output.
//
// Payloads are opaque bytes (bf16 and fp8 are moved, not computed); combine computes in float32 in
// a fixed order that the GPU kernels follow too, so BF16 results compare bit for bit:
//   acc = 0; acc += bias0[t] (if any); acc += bias1[t] (if any);
//   for r = 0..R-1 ascending: if is_token_in_rank[t][r]: acc += x_r[row of t on r];
//   combined_x[t] = bf16_round_nearest_even(acc)
//   combined_topk_weights[t][k] = 0 + sum over the same r ascending of topk_weights_r[row][k]
#pragma once

#include <cstdint>
#include <vector>

namespace flashep::oracle {

/// bf16 <-> float, round to nearest even (NaN stays NaN).
float bf16_to_float(uint16_t v);
uint16_t float_to_bf16(float f);

/// get_dispatch_layout for one rank's topk_idx [n, K] (-1 = empty).
struct Layout {
  std::vector<int> num_tokens_per_rank;       ///< [R]
  std::vector<int> num_tokens_per_rdma_rank;  ///< [R / nvl_domain_size]
  std::vector<int> num_tokens_per_expert;     ///< [E]
  std::vector<uint8_t> is_token_in_rank;      ///< [n, R], 0/1
};
/// Throws std::invalid_argument if an index is < -1 or >= E, or E % R != 0.
Layout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int nvl_domain_size);

/// One rank's dispatch input.
struct RankInput {
  int num_tokens = 0;
  std::vector<uint8_t> x;              ///< [n, row_bytes] (row_bytes = H * elem_size)
  std::vector<float> x_scales;         ///< [n, H/128] contiguous, empty when no scales
  std::vector<int64_t> topk_idx;       ///< [n, K]
  std::vector<float> topk_weights;     ///< [n, K], may be empty (then outputs weights are empty)
};

/// Shape of the world shared by all ranks.
struct Shape {
  int num_ranks = 1;
  int hidden = 0;
  int elem_size = 2;      ///< 2 for bf16, 1 for fp8
  bool has_scales = false;
  int num_topk = 0;
  int num_experts = 0;
  int expert_alignment = 1;
};

/// One rank's dispatch output (what dispatch returns on that rank, plus the handle fields that are
/// independent of the channel split).
struct RankOutput {
  int num_recv_tokens = 0;
  std::vector<uint8_t> recv_x;                      ///< [num_recv, row_bytes]
  std::vector<float> recv_x_scales;                 ///< [num_recv, H/128] or empty
  std::vector<int64_t> recv_topk_idx;               ///< [num_recv, K] local index or -1
  std::vector<float> recv_topk_weights;             ///< [num_recv, K] (0 where idx -1) or empty
  std::vector<int> recv_src_idx;                    ///< [num_recv]
  std::vector<int> num_recv_tokens_per_expert;      ///< [L], each rounded up to expert_alignment
  std::vector<int> rank_prefix_matrix;              ///< [R, R] inclusive prefix over source ranks
};

/// Dispatch of the whole world: inputs[r] is rank r's input; returns outputs[r] for every rank.
std::vector<RankOutput> dispatch(const Shape& shape, const std::vector<RankInput>& inputs);

/// One rank's combine input: expert outputs aligned with that rank's dispatch output rows.
struct CombineRankInput {
  std::vector<uint16_t> x;             ///< bf16 [num_recv, H]
  std::vector<float> topk_weights;     ///< [num_recv, K] or empty
  std::vector<uint16_t> bias0, bias1;  ///< bf16 [n, H] or empty (n = that rank's num_tokens)
};
struct CombineRankOutput {
  std::vector<uint16_t> combined_x;           ///< bf16 [n, H]
  std::vector<float> combined_topk_weights;   ///< [n, K] or empty
};
/// Combine of the whole world. `inputs` and `outputs` of dispatch describe the routing.
std::vector<CombineRankOutput> combine(const Shape& shape, const std::vector<RankInput>& dispatch_inputs,
                                       const std::vector<RankOutput>& dispatch_outputs,
                                       const std::vector<CombineRankInput>& inputs);

}  // namespace flashep::oracle
