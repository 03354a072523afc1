// flashep CPU oracle: plain loops over the whole world, written for clarity rather than speed.
// See oracle.hpp for the contract; the GPU kernels are checked against these results bit for bit.
#include "oracle/oracle.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>

namespace flashep::oracle {

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("flashep::oracle: " + what); }

void require(bool condition, const std::string& what) {
  if (!condition) fail(what);
}

void require_size(size_t actual, size_t expected, const std::string& what) {
  if (actual != expected) {
    fail(what + " has " + std::to_string(actual) + " elements, expected " + std::to_string(expected));
  }
}

std::string rank_label(int rank) { return "rank " + std::to_string(rank) + ": "; }

int round_up(int value, int alignment) { return (value + alignment - 1) / alignment * alignment; }

/// Validates the shape and every rank's input sizes; returns whether the inputs carry top-k weights.
/// Weights are all-or-nothing across the world: a rank with tokens either has [n, K] weights or
/// none, and all ranks with tokens agree (a rank without tokens cannot tell the two apart).
bool validate_dispatch_inputs(const Shape& shape, const std::vector<RankInput>& inputs) {
  require(shape.num_ranks > 0, "num_ranks must be positive");
  require(shape.hidden >= 0, "hidden must be non-negative");
  require(shape.elem_size > 0, "elem_size must be positive");
  require(shape.num_topk >= 0, "num_topk must be non-negative");
  require(shape.num_experts > 0, "num_experts must be positive");
  require(shape.num_experts % shape.num_ranks == 0, "num_experts must be a multiple of num_ranks");
  require(shape.expert_alignment > 0, "expert_alignment must be positive");
  require(!shape.has_scales || shape.hidden % 128 == 0, "hidden must be a multiple of 128 with scales");
  require_size(inputs.size(), static_cast<size_t>(shape.num_ranks), "inputs (one per rank)");

  const size_t row_bytes = static_cast<size_t>(shape.hidden) * shape.elem_size;
  const size_t scales_per_token = shape.has_scales ? static_cast<size_t>(shape.hidden / 128) : 0;
  const size_t topk = static_cast<size_t>(shape.num_topk);
  bool any_weights = false, any_missing_weights = false;
  for (int r = 0; r < shape.num_ranks; ++r) {
    const RankInput& in = inputs[r];
    require(in.num_tokens >= 0, rank_label(r) + "num_tokens must be non-negative");
    const size_t n = static_cast<size_t>(in.num_tokens);
    require_size(in.x.size(), n * row_bytes, rank_label(r) + "x");
    require_size(in.x_scales.size(), n * scales_per_token, rank_label(r) + "x_scales");
    require_size(in.topk_idx.size(), n * topk, rank_label(r) + "topk_idx");
    if (!in.topk_weights.empty()) require_size(in.topk_weights.size(), n * topk, rank_label(r) + "topk_weights");
    if (n > 0 && topk > 0) {
      (in.topk_weights.empty() ? any_missing_weights : any_weights) = true;
    }
  }
  require(!(any_weights && any_missing_weights), "topk_weights must be given on all ranks or on none");
  return any_weights;
}

}  // namespace

// ---- bf16 ----------------------------------------------------------------------------------------

float bf16_to_float(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7FC0u);  // NaN: quiet
  // Round to nearest, ties to even: add just under half an ulp, plus one if the kept lsb is odd.
  // Overflow into the exponent is the correct result (it rounds up to the next binade or to inf).
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

// ---- layout --------------------------------------------------------------------------------------

Layout get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                           int num_ranks, int nvl_domain_size) {
  require(num_tokens >= 0, "num_tokens must be non-negative");
  require(num_topk >= 0, "num_topk must be non-negative");
  require(num_ranks > 0, "num_ranks must be positive");
  require(num_experts > 0, "num_experts must be positive");
  require(num_experts % num_ranks == 0, "num_experts must be a multiple of num_ranks");
  require(nvl_domain_size > 0 && num_ranks % nvl_domain_size == 0,
          "num_ranks must be a positive multiple of nvl_domain_size");
  require(topk_idx != nullptr || num_tokens == 0 || num_topk == 0, "topk_idx is null");

  const int experts_per_rank = num_experts / num_ranks;
  const int num_nodes = num_ranks / nvl_domain_size;
  Layout layout;
  layout.num_tokens_per_rank.assign(num_ranks, 0);
  layout.num_tokens_per_rdma_rank.assign(num_nodes, 0);
  layout.num_tokens_per_expert.assign(num_experts, 0);
  layout.is_token_in_rank.assign(static_cast<size_t>(num_tokens) * num_ranks, 0);

  std::vector<uint8_t> is_token_in_node(num_nodes);
  for (int t = 0; t < num_tokens; ++t) {
    uint8_t* in_rank = &layout.is_token_in_rank[static_cast<size_t>(t) * num_ranks];
    std::fill(is_token_in_node.begin(), is_token_in_node.end(), 0);
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_idx[static_cast<size_t>(t) * num_topk + k];
      if (expert < -1 || expert >= num_experts) {
        fail("topk_idx[" + std::to_string(t) + "][" + std::to_string(k) + "] = " + std::to_string(expert) +
             " is outside [-1, " + std::to_string(num_experts) + ")");
      }
      if (expert == -1) continue;
      const int rank = static_cast<int>(expert) / experts_per_rank;
      layout.num_tokens_per_expert[expert] += 1;
      in_rank[rank] = 1;
      is_token_in_node[rank / nvl_domain_size] = 1;
    }
    // Counted per token, not per slot: two experts on one rank still send the token there once.
    for (int r = 0; r < num_ranks; ++r) layout.num_tokens_per_rank[r] += in_rank[r];
    for (int node = 0; node < num_nodes; ++node) layout.num_tokens_per_rdma_rank[node] += is_token_in_node[node];
  }
  return layout;
}

// ---- dispatch ------------------------------------------------------------------------------------

std::vector<RankOutput> dispatch(const Shape& shape, const std::vector<RankInput>& inputs) {
  const bool has_weights = validate_dispatch_inputs(shape, inputs);
  const int num_ranks = shape.num_ranks;
  const int topk = shape.num_topk;
  const int experts_per_rank = shape.num_experts / num_ranks;
  const size_t row_bytes = static_cast<size_t>(shape.hidden) * shape.elem_size;
  const size_t scales_per_token = shape.has_scales ? static_cast<size_t>(shape.hidden / 128) : 0;

  // Single node: the NVLink domain is the whole world, so the rdma counts are not needed here.
  std::vector<Layout> layouts;
  layouts.reserve(num_ranks);
  for (const RankInput& in : inputs) {
    layouts.push_back(
        get_dispatch_layout(in.topk_idx.data(), in.num_tokens, topk, shape.num_experts, num_ranks, num_ranks));
  }

  // rank_prefix_matrix[i][j] = tokens sent by sources 0..i to destination j; the same on every rank.
  std::vector<int> rank_prefix_matrix(static_cast<size_t>(num_ranks) * num_ranks);
  for (int src = 0; src < num_ranks; ++src) {
    for (int dst = 0; dst < num_ranks; ++dst) {
      const int previous = src > 0 ? rank_prefix_matrix[static_cast<size_t>(src - 1) * num_ranks + dst] : 0;
      rank_prefix_matrix[static_cast<size_t>(src) * num_ranks + dst] =
          previous + layouts[src].num_tokens_per_rank[dst];
    }
  }

  std::vector<RankOutput> outputs(num_ranks);
  for (int dst = 0; dst < num_ranks; ++dst) {
    RankOutput& out = outputs[dst];
    const int num_recv = rank_prefix_matrix[static_cast<size_t>(num_ranks - 1) * num_ranks + dst];
    out.num_recv_tokens = num_recv;
    out.rank_prefix_matrix = rank_prefix_matrix;
    out.recv_x.reserve(num_recv * row_bytes);
    out.recv_x_scales.reserve(num_recv * scales_per_token);
    out.recv_topk_idx.reserve(static_cast<size_t>(num_recv) * topk);
    if (has_weights) out.recv_topk_weights.reserve(static_cast<size_t>(num_recv) * topk);
    out.recv_src_idx.reserve(num_recv);

    const int first_local_expert = dst * experts_per_rank;
    out.num_recv_tokens_per_expert.assign(experts_per_rank, 0);
    // Rows are appended in source-rank order, then token order on the source: the documented order.
    for (int src = 0; src < num_ranks; ++src) {
      const RankInput& in = inputs[src];
      for (int local = 0; local < experts_per_rank; ++local) {
        out.num_recv_tokens_per_expert[local] += layouts[src].num_tokens_per_expert[first_local_expert + local];
      }
      for (int t = 0; t < in.num_tokens; ++t) {
        if (!layouts[src].is_token_in_rank[static_cast<size_t>(t) * num_ranks + dst]) continue;
        const uint8_t* row = in.x.data() + t * row_bytes;
        out.recv_x.insert(out.recv_x.end(), row, row + row_bytes);
        const float* scales = in.x_scales.data() + t * scales_per_token;
        out.recv_x_scales.insert(out.recv_x_scales.end(), scales, scales + scales_per_token);
        for (int k = 0; k < topk; ++k) {
          const size_t slot = static_cast<size_t>(t) * topk + k;
          const int64_t expert = in.topk_idx[slot];
          const bool is_local = expert >= first_local_expert && expert < first_local_expert + experts_per_rank;
          out.recv_topk_idx.push_back(is_local ? expert - first_local_expert : -1);
          if (has_weights) out.recv_topk_weights.push_back(is_local ? in.topk_weights[slot] : 0.0f);
        }
        out.recv_src_idx.push_back(t);
      }
    }
    for (int& count : out.num_recv_tokens_per_expert) count = round_up(count, shape.expert_alignment);
  }
  return outputs;
}

// ---- combine -------------------------------------------------------------------------------------

std::vector<CombineRankOutput> combine(const Shape& shape, const std::vector<RankInput>& dispatch_inputs,
                                       const std::vector<RankOutput>& dispatch_outputs,
                                       const std::vector<CombineRankInput>& inputs) {
  const bool dispatch_had_weights = validate_dispatch_inputs(shape, dispatch_inputs);
  const int num_ranks = shape.num_ranks;
  const int topk = shape.num_topk;
  const size_t hidden = static_cast<size_t>(shape.hidden);
  const size_t matrix_size = static_cast<size_t>(num_ranks) * num_ranks;
  require_size(dispatch_outputs.size(), static_cast<size_t>(num_ranks), "dispatch_outputs (one per rank)");
  require_size(inputs.size(), static_cast<size_t>(num_ranks), "combine inputs (one per rank)");

  // Combine weights are all-or-nothing like dispatch weights: produced when the ranks pass them.
  // A rank without received rows cannot tell "no weights" from "[0, K] weights"; when no rank
  // received anything, the dispatch inputs decide (the weights combine sends back are the ones
  // dispatch delivered).
  bool any_weights = false, any_missing_weights = false, any_rows = false;
  for (int r = 0; r < num_ranks; ++r) {
    const RankOutput& routed = dispatch_outputs[r];
    const CombineRankInput& in = inputs[r];
    const size_t num_recv = static_cast<size_t>(routed.num_recv_tokens);
    require(routed.num_recv_tokens >= 0, rank_label(r) + "num_recv_tokens must be non-negative");
    require_size(routed.rank_prefix_matrix.size(), matrix_size, rank_label(r) + "rank_prefix_matrix");
    require(routed.rank_prefix_matrix[matrix_size - num_ranks + r] == routed.num_recv_tokens,
            rank_label(r) + "rank_prefix_matrix disagrees with num_recv_tokens");
    require(routed.recv_src_idx.empty() || routed.recv_src_idx.size() == num_recv,
            rank_label(r) + "recv_src_idx must be empty or have num_recv_tokens entries");
    require_size(in.x.size(), num_recv * hidden, rank_label(r) + "combine x");
    if (!in.topk_weights.empty()) {
      require_size(in.topk_weights.size(), num_recv * topk, rank_label(r) + "combine topk_weights");
    }
    if (num_recv > 0 && topk > 0) (in.topk_weights.empty() ? any_missing_weights : any_weights) = true;
    any_rows |= num_recv > 0 && topk > 0;
    const size_t num_tokens = static_cast<size_t>(dispatch_inputs[r].num_tokens);
    if (!in.bias0.empty()) require_size(in.bias0.size(), num_tokens * hidden, rank_label(r) + "bias0");
    if (!in.bias1.empty()) require_size(in.bias1.size(), num_tokens * hidden, rank_label(r) + "bias1");
  }
  require(!(any_weights && any_missing_weights), "combine topk_weights must be given on all ranks or on none");
  const bool has_weights = any_rows ? any_weights : dispatch_had_weights;

  std::vector<CombineRankOutput> outputs(num_ranks);
  std::vector<float> accumulator(hidden);
  std::vector<float> weight_sums(topk);
  for (int src = 0; src < num_ranks; ++src) {
    // `src` is the rank that dispatched the tokens and now combines them back.
    const RankInput& original = dispatch_inputs[src];
    const CombineRankInput& own = inputs[src];
    const Layout layout = get_dispatch_layout(original.topk_idx.data(), original.num_tokens, topk,
                                              shape.num_experts, num_ranks, num_ranks);
    // next_row[r]: the row on rank r of src's next token routed to r; src's segment on r starts
    // where the previous sources' segments end.
    std::vector<int> next_row(num_ranks);
    for (int r = 0; r < num_ranks; ++r) {
      next_row[r] = src > 0 ? dispatch_outputs[r].rank_prefix_matrix[static_cast<size_t>(src - 1) * num_ranks + r] : 0;
    }

    CombineRankOutput& out = outputs[src];
    out.combined_x.resize(static_cast<size_t>(original.num_tokens) * hidden);
    if (has_weights) out.combined_topk_weights.resize(static_cast<size_t>(original.num_tokens) * topk);
    for (int t = 0; t < original.num_tokens; ++t) {
      const size_t token_offset = static_cast<size_t>(t) * hidden;
      // The order below is the contract the GPU kernels follow (see oracle.hpp); do not reorder.
      std::fill(accumulator.begin(), accumulator.end(), 0.0f);
      std::fill(weight_sums.begin(), weight_sums.end(), 0.0f);
      if (!own.bias0.empty()) {
        for (size_t h = 0; h < hidden; ++h) accumulator[h] += bf16_to_float(own.bias0[token_offset + h]);
      }
      if (!own.bias1.empty()) {
        for (size_t h = 0; h < hidden; ++h) accumulator[h] += bf16_to_float(own.bias1[token_offset + h]);
      }
      for (int r = 0; r < num_ranks; ++r) {
        if (!layout.is_token_in_rank[static_cast<size_t>(t) * num_ranks + r]) continue;
        const int row = next_row[r]++;
        const RankOutput& routed = dispatch_outputs[r];
        require(row >= 0 && row < routed.num_recv_tokens, rank_label(r) + "no row for a token of rank " +
                    std::to_string(src) + " (rank_prefix_matrix disagrees with the routing)");
        require(routed.recv_src_idx.empty() || routed.recv_src_idx[row] == t,
                rank_label(r) + "recv_src_idx[" + std::to_string(row) + "] does not match the routing of rank " +
                    std::to_string(src));
        const uint16_t* expert_output = inputs[r].x.data() + static_cast<size_t>(row) * hidden;
        for (size_t h = 0; h < hidden; ++h) accumulator[h] += bf16_to_float(expert_output[h]);
        if (has_weights) {
          const float* weights = inputs[r].topk_weights.data() + static_cast<size_t>(row) * topk;
          for (int k = 0; k < topk; ++k) weight_sums[k] += weights[k];
        }
      }
      for (size_t h = 0; h < hidden; ++h) out.combined_x[token_offset + h] = float_to_bf16(accumulator[h]);
      if (has_weights) {
        std::copy(weight_sums.begin(), weight_sums.end(), out.combined_topk_weights.begin() + t * topk);
      }
    }
    // Every row of src's segment on every rank must have been consumed, or the routing disagrees.
    for (int r = 0; r < num_ranks; ++r) {
      require(next_row[r] == dispatch_outputs[r].rank_prefix_matrix[static_cast<size_t>(src) * num_ranks + r],
              rank_label(r) + "rank_prefix_matrix disagrees with the routing of rank " + std::to_string(src));
    }
  }
  return outputs;
}

}  // namespace flashep::oracle
