// Tests of the CPU oracle (src/oracle): bf16 rounding, hand-computed layout/dispatch/combine on a
// tiny world, the documented float32 accumulation order, properties on many random worlds, and the
// rejection of invalid inputs. The GPU kernels are compared against this oracle, so it must be right.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "oracle/oracle.hpp"

using namespace flashep::oracle;

namespace {

uint32_t float_bits(float f) { return std::bit_cast<uint32_t>(f); }
float from_bits(uint32_t bits) { return std::bit_cast<float>(bits); }

/// bf16 values as the opaque bytes dispatch moves.
std::vector<uint8_t> bf16_bytes(const std::vector<float>& values) {
  std::vector<uint8_t> bytes(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t v = float_to_bf16(values[i]);
    std::memcpy(&bytes[i * 2], &v, 2);
  }
  return bytes;
}

std::vector<uint16_t> bytes_as_bf16(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> values(bytes.size() / 2);
  if (!values.empty()) std::memcpy(values.data(), bytes.data(), values.size() * 2);
  return values;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& values) {
  std::vector<uint16_t> out;
  for (float v : values) out.push_back(float_to_bf16(v));
  return out;
}

std::vector<float> to_float(const std::vector<uint16_t>& values) {
  std::vector<float> out;
  for (uint16_t v : values) out.push_back(bf16_to_float(v));
  return out;
}

RankInput make_bf16_input(int num_tokens, const std::vector<float>& x, const std::vector<int64_t>& topk_idx,
                          const std::vector<float>& topk_weights) {
  RankInput in;
  in.num_tokens = num_tokens;
  in.x = bf16_bytes(x);
  in.topk_idx = topk_idx;
  in.topk_weights = topk_weights;
  return in;
}

// ---- bf16 ------------------------------------------------------------------------------------------

void test_bf16() {
  CHECK_EQ(float_to_bf16(1.0f), 0x3F80);
  CHECK_EQ(float_to_bf16(-2.0f), 0xC000);
  CHECK_EQ(float_to_bf16(0.0f), 0x0000);
  CHECK_EQ(float_to_bf16(-0.0f), 0x8000);
  CHECK_EQ(bf16_to_float(0x3F80), 1.0f);
  CHECK_EQ(float_bits(bf16_to_float(0x8000)), 0x80000000u);

  // Ties go to the even neighbour; anything off the tie goes to the nearer one.
  CHECK_EQ(float_to_bf16(from_bits(0x3F808000)), 0x3F80);  // 1 + 2^-8: tie, 0x3F80 is even
  CHECK_EQ(float_to_bf16(from_bits(0x3F818000)), 0x3F82);  // tie between 0x3F81 and 0x3F82
  CHECK_EQ(float_to_bf16(from_bits(0x3F808001)), 0x3F81);  // just above the tie
  CHECK_EQ(float_to_bf16(from_bits(0x3F807FFF)), 0x3F80);  // just below the tie
  CHECK_EQ(float_to_bf16(from_bits(0xBF818000)), 0xBF82);  // negative tie
  CHECK_EQ(float_to_bf16(from_bits(0x3FFF8000)), 0x4000);  // carry into the exponent
  CHECK_EQ(float_to_bf16(from_bits(0x00008000)), 0x0000);  // subnormal tie to even (zero)
  CHECK_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);  // subnormal tie to even (up)

  // Infinities stay, the largest floats round up to infinity, NaNs become quiet NaNs with their sign.
  CHECK_EQ(float_to_bf16(INFINITY), 0x7F80);
  CHECK_EQ(float_to_bf16(-INFINITY), 0xFF80);
  CHECK_EQ(float_to_bf16(from_bits(0x7F7FFFFF)), 0x7F80);
  CHECK_EQ(float_to_bf16(from_bits(0x7F7F7FFF)), 0x7F7F);
  CHECK_EQ(float_to_bf16(from_bits(0x7F800001)), 0x7FC0);  // would truncate to inf if rounded naively
  CHECK_EQ(float_to_bf16(from_bits(0xFF800001)), 0xFFC0);
  CHECK_EQ(float_to_bf16(from_bits(0x7FC00000)), 0x7FC0);
  CHECK_EQ(float_to_bf16(from_bits(0x7FFFFFFF)), 0x7FC0);  // would carry into the sign if rounded naively

  // Every bf16 value survives a round trip through float, NaNs as quiet NaNs of the same sign.
  int round_trip_errors = 0;
  for (uint32_t v = 0; v <= 0xFFFF; ++v) {
    const float f = bf16_to_float(static_cast<uint16_t>(v));
    const uint16_t back = float_to_bf16(f);
    const bool is_nan = (v & 0x7F80) == 0x7F80 && (v & 0x007F) != 0;
    const uint16_t expected = is_nan ? static_cast<uint16_t>((v & 0x8000) | 0x7FC0) : static_cast<uint16_t>(v);
    CHECK(std::isnan(f) == is_nan);
    if (back != expected) ++round_trip_errors;
  }
  CHECK_EQ(round_trip_errors, 0);
}

// ---- a hand-computed world: R=2, E=4 (L=2), K=2, H=2 ---------------------------------------------------
//
// rank 0 tokens:  t0 [0, 3] -> ranks 0,1     rank 1 tokens:  t0 [3, 2] -> rank 1 (two experts there)
//                 t1 [1, 0] -> rank 0 (two)                  t1 [-1, 1] -> rank 0
//                 t2 [-1,-1] -> nowhere                      t2 [0, 2] -> ranks 0,1
//                 t3 [2, -1] -> rank 1
// x of token t on rank s = {10s + t + 1, -(10s + t + 1)}.

std::vector<RankInput> hand_world_inputs() {
  std::vector<RankInput> inputs;
  inputs.push_back(make_bf16_input(4, {1, -1, 2, -2, 3, -3, 4, -4}, {0, 3, 1, 0, -1, -1, 2, -1},
                                   {0.5f, 0.25f, 0.125f, 2.0f, 7.0f, 8.0f, 3.0f, 9.0f}));
  inputs.push_back(make_bf16_input(3, {11, -11, 12, -12, 13, -13}, {3, 2, -1, 1, 0, 2},
                                   {1.5f, 2.5f, 4.0f, 0.75f, 5.0f, 6.0f}));
  return inputs;
}

Shape hand_world_shape() {
  Shape shape;
  shape.num_ranks = 2;
  shape.hidden = 2;
  shape.elem_size = 2;
  shape.num_topk = 2;
  shape.num_experts = 4;
  shape.expert_alignment = 2;
  return shape;
}

void test_hand_layout() {
  const std::vector<RankInput> inputs = hand_world_inputs();
  const Layout rank0 = get_dispatch_layout(inputs[0].topk_idx.data(), 4, 2, 4, 2, 2);
  CHECK_EQ(rank0.num_tokens_per_rank, (std::vector<int>{2, 2}));
  CHECK_EQ(rank0.num_tokens_per_rdma_rank, (std::vector<int>{3}));
  CHECK_EQ(rank0.num_tokens_per_expert, (std::vector<int>{2, 1, 1, 1}));
  CHECK_EQ(rank0.is_token_in_rank, (std::vector<uint8_t>{1, 1, 1, 0, 0, 0, 0, 1}));

  // One rank per "node": the rdma counts are the per-rank counts.
  const Layout rank0_two_nodes = get_dispatch_layout(inputs[0].topk_idx.data(), 4, 2, 4, 2, 1);
  CHECK_EQ(rank0_two_nodes.num_tokens_per_rdma_rank, (std::vector<int>{2, 2}));

  const Layout rank1 = get_dispatch_layout(inputs[1].topk_idx.data(), 3, 2, 4, 2, 1);
  CHECK_EQ(rank1.num_tokens_per_rank, (std::vector<int>{2, 2}));
  CHECK_EQ(rank1.num_tokens_per_rdma_rank, (std::vector<int>{2, 2}));
  CHECK_EQ(rank1.num_tokens_per_expert, (std::vector<int>{1, 1, 2, 1}));
  CHECK_EQ(rank1.is_token_in_rank, (std::vector<uint8_t>{0, 1, 1, 0, 1, 1}));

  // R=4, E=8, nvl_domain_size=2: experts 0,1 -> rank 0 (node 0), 6,7 -> rank 3 (node 1).
  const std::vector<int64_t> idx = {0, 7, 1, -1, 6, 7, -1, -1, 2, 5};
  const Layout four = get_dispatch_layout(idx.data(), 5, 2, 8, 4, 2);
  CHECK_EQ(four.num_tokens_per_rank, (std::vector<int>{2, 1, 1, 2}));
  CHECK_EQ(four.num_tokens_per_rdma_rank, (std::vector<int>{3, 3}));
  CHECK_EQ(four.num_tokens_per_expert, (std::vector<int>{1, 1, 1, 0, 0, 1, 1, 2}));
  const Layout four_one_node = get_dispatch_layout(idx.data(), 5, 2, 8, 4, 4);
  CHECK_EQ(four_one_node.num_tokens_per_rdma_rank, (std::vector<int>{4}));
}

void test_hand_dispatch_and_combine() {
  const Shape shape = hand_world_shape();
  const std::vector<RankInput> inputs = hand_world_inputs();
  const std::vector<RankOutput> outputs = dispatch(shape, inputs);
  CHECK_EQ(outputs.size(), 2u);

  const std::vector<int> prefix = {2, 2, 4, 4};
  const RankOutput& d0 = outputs[0];
  CHECK_EQ(d0.num_recv_tokens, 4);
  CHECK_EQ(d0.rank_prefix_matrix, prefix);
  CHECK_EQ(d0.recv_src_idx, (std::vector<int>{0, 1, 1, 2}));
  CHECK_EQ(d0.recv_x, bf16_bytes({1, -1, 2, -2, 12, -12, 13, -13}));
  CHECK_EQ(d0.recv_topk_idx, (std::vector<int64_t>{0, -1, 1, 0, -1, 1, 0, -1}));
  CHECK_EQ(d0.recv_topk_weights, (std::vector<float>{0.5f, 0, 0.125f, 2.0f, 0, 0.75f, 5.0f, 0}));
  CHECK_EQ(d0.num_recv_tokens_per_expert, (std::vector<int>{4, 2}));  // raw {3, 2}, alignment 2
  CHECK(d0.recv_x_scales.empty());

  const RankOutput& d1 = outputs[1];
  CHECK_EQ(d1.num_recv_tokens, 4);
  CHECK_EQ(d1.rank_prefix_matrix, prefix);
  CHECK_EQ(d1.recv_src_idx, (std::vector<int>{0, 3, 0, 2}));
  CHECK_EQ(d1.recv_x, bf16_bytes({1, -1, 4, -4, 11, -11, 13, -13}));
  CHECK_EQ(d1.recv_topk_idx, (std::vector<int64_t>{-1, 1, 0, -1, 1, 0, -1, 0}));
  CHECK_EQ(d1.recv_topk_weights, (std::vector<float>{0, 0.25f, 3.0f, 0, 1.5f, 2.5f, 0, 6.0f}));
  CHECK_EQ(d1.num_recv_tokens_per_expert, (std::vector<int>{4, 2}));  // raw {3, 2}
  // Dropped weights are exactly +0.0f, not -0.0f.
  for (float w : d1.recv_topk_weights) CHECK(!std::signbit(w));

  // Combine: each rank sends back what it received plus 100 x its rank; bias0 on rank 0 only.
  std::vector<CombineRankInput> combine_inputs(2);
  combine_inputs[0].x = to_bf16({1, -1, 2, -2, 12, -12, 13, -13});
  combine_inputs[1].x = to_bf16({101, 99, 104, 96, 111, 89, 113, 87});
  combine_inputs[0].topk_weights = d0.recv_topk_weights;
  combine_inputs[1].topk_weights = d1.recv_topk_weights;
  combine_inputs[0].bias0 = to_bf16({0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f});
  const std::vector<CombineRankOutput> combined = combine(shape, inputs, outputs, combine_inputs);
  // Rank 0: t0 from ranks 0 and 1, t1 from rank 0, t2 nowhere (bias only), t3 from rank 1.
  CHECK_EQ(to_float(combined[0].combined_x),
           (std::vector<float>{102.5f, 98.5f, 2.5f, -1.5f, 0.5f, 0.5f, 104.5f, 96.5f}));
  CHECK_EQ(combined[0].combined_topk_weights, (std::vector<float>{0.5f, 0.25f, 0.125f, 2.0f, 0, 0, 3.0f, 0}));
  // Rank 1: t0 from rank 1, t1 from rank 0, t2 from ranks 0 and 1; no bias.
  CHECK_EQ(to_float(combined[1].combined_x), (std::vector<float>{111, 89, 12, -12, 126, 74}));
  CHECK_EQ(combined[1].combined_topk_weights, (std::vector<float>{1.5f, 2.5f, 0, 0.75f, 5.0f, 6.0f}));

  // Without weights anywhere, dispatch and combine produce no weights.
  std::vector<RankInput> unweighted = inputs;
  for (RankInput& in : unweighted) in.topk_weights.clear();
  const std::vector<RankOutput> unweighted_outputs = dispatch(shape, unweighted);
  CHECK(unweighted_outputs[0].recv_topk_weights.empty());
  CHECK(unweighted_outputs[1].recv_topk_weights.empty());
  combine_inputs[0].topk_weights.clear();
  combine_inputs[1].topk_weights.clear();
  const std::vector<CombineRankOutput> unweighted_combined =
      combine(shape, unweighted, unweighted_outputs, combine_inputs);
  CHECK(unweighted_combined[0].combined_topk_weights.empty());
  CHECK_EQ(unweighted_combined[0].combined_x, combined[0].combined_x);
}

void test_fp8_payload_and_scales() {
  // FP8 with scales: bytes and scale rows move untouched; H=256 -> 2 scales per token.
  Shape shape;
  shape.num_ranks = 2;
  shape.hidden = 256;
  shape.elem_size = 1;
  shape.has_scales = true;
  shape.num_topk = 1;
  shape.num_experts = 2;
  std::vector<RankInput> inputs(2);
  for (int r = 0; r < 2; ++r) {
    inputs[r].num_tokens = 2;
    for (int i = 0; i < 2 * 256; ++i) inputs[r].x.push_back(static_cast<uint8_t>(i * 7 + r));
    inputs[r].x_scales = {1.0f + r, 2.0f + r, 3.0f + r, 4.0f + r};
    inputs[r].topk_idx = {1, 0};  // token 0 -> rank 1, token 1 -> rank 0
  }
  const std::vector<RankOutput> outputs = dispatch(shape, inputs);
  // Rank 0 receives token 1 of each source.
  CHECK_EQ(outputs[0].recv_x_scales, (std::vector<float>{3, 4, 4, 5}));
  CHECK_EQ(outputs[1].recv_x_scales, (std::vector<float>{1, 2, 2, 3}));
  CHECK(std::equal(outputs[0].recv_x.begin(), outputs[0].recv_x.begin() + 256, inputs[0].x.begin() + 256));
  CHECK(std::equal(outputs[0].recv_x.begin() + 256, outputs[0].recv_x.end(), inputs[1].x.begin() + 256));
  CHECK_EQ(outputs[0].recv_x.size(), 512u);
  CHECK(outputs[0].recv_topk_weights.empty());
}

// ---- the documented float32 accumulation order ---------------------------------------------------------

void test_combine_accumulation_order() {
  // One token on rank 0 with experts on both ranks (E=2, R=2). With 2^25 magnitudes a float32 sum
  // loses a 1.0 when added in the wrong order, so the result shows which order was used.
  Shape shape;
  shape.num_ranks = 2;
  shape.hidden = 2;
  shape.num_topk = 2;
  shape.num_experts = 2;
  std::vector<RankInput> inputs(2);
  inputs[0] = make_bf16_input(1, {0, 0}, {0, 1}, {});
  const std::vector<RankOutput> outputs = dispatch(shape, inputs);
  const float big = 33554432.0f;  // 2^25, exact in bf16

  std::vector<CombineRankInput> combine_inputs(2);
  // Column 0, ranks ascending: -2^25 (bias0) + 2^25 (rank 0) = 0, + 1 (rank 1) = 1.
  //   Descending would give -2^25 + 1 -> -2^25 (tie to even), + 2^25 -> 0.
  // Column 1, biases before ranks: 2^25 (bias0) - 2^25 (bias1) = 0, + 1 + 0 = 1.
  //   Any rank before bias1 would give 2^25 + 1 -> 2^25, - 2^25 -> 0.
  combine_inputs[0].bias0 = to_bf16({-big, big});
  combine_inputs[0].bias1 = to_bf16({0, -big});
  combine_inputs[0].x = to_bf16({big, 1});
  combine_inputs[1].x = to_bf16({1, 0});
  const std::vector<CombineRankOutput> combined = combine(shape, inputs, outputs, combine_inputs);
  CHECK_EQ(to_float(combined[0].combined_x), (std::vector<float>{1, 1}));

  // The float32 sum is rounded to bf16 once, at the end: 1 + 2^-8 + 2^-8 = 1 + 2^-7 exactly,
  // whereas rounding after each step would give 1 (two ties to even).
  combine_inputs[0].bias0.clear();
  combine_inputs[0].bias1 = to_bf16({1, 0});
  combine_inputs[0].x = to_bf16({1.0f / 256, 0});
  combine_inputs[1].x = to_bf16({1.0f / 256, 0});
  const std::vector<CombineRankOutput> once = combine(shape, inputs, outputs, combine_inputs);
  CHECK_EQ(once[0].combined_x[0], float_to_bf16(1.0f + 1.0f / 128));
}

// ---- properties on random worlds ---------------------------------------------------------------------

enum class Routing { kDistinct, kWithDuplicates, kOneExpert, kNowhere, kOneRank };

struct WorldSpec {
  int num_ranks, num_experts, num_topk;
  Routing routing;
  int expert_alignment;
};

/// Fills one rank's routing; values are small integers so that sums of up to 8 of them stay exact.
RankInput random_rank_input(const WorldSpec& spec, int num_tokens, int hidden, int hot_expert, std::mt19937& rng) {
  const int E = spec.num_experts, K = spec.num_topk, L = E / spec.num_ranks;
  std::uniform_int_distribution<int> small_value(-8, 8);
  std::uniform_int_distribution<int> any_slot(-1, E - 1);
  std::bernoulli_distribution masked(0.2);
  std::uniform_real_distribution<float> weight(0.01f, 1.0f);

  std::vector<float> x(static_cast<size_t>(num_tokens) * hidden);
  for (float& v : x) v = static_cast<float>(small_value(rng));
  std::vector<int64_t> idx(static_cast<size_t>(num_tokens) * K, -1);
  std::vector<int> experts(E);
  for (int t = 0; t < num_tokens; ++t) {
    int64_t* row = &idx[static_cast<size_t>(t) * K];
    switch (spec.routing) {
      case Routing::kDistinct:
      case Routing::kOneRank: {
        // Distinct experts where there are enough (else duplicates), some slots masked.
        const int first = spec.routing == Routing::kOneRank ? (spec.num_ranks - 1) * L : 0;
        const int count = spec.routing == Routing::kOneRank ? L : E;
        experts.resize(count);
        for (int i = 0; i < count; ++i) experts[i] = first + i;
        std::shuffle(experts.begin(), experts.end(), rng);
        for (int k = 0; k < K; ++k) row[k] = masked(rng) ? -1 : experts[k % count];
        break;
      }
      case Routing::kWithDuplicates:
        for (int k = 0; k < K; ++k) row[k] = any_slot(rng);
        break;
      case Routing::kOneExpert:
        row[0] = hot_expert;
        break;
      case Routing::kNowhere:
        break;
    }
  }
  std::vector<float> weights(idx.size());
  for (float& w : weights) w = weight(rng);
  return make_bf16_input(num_tokens, x, idx, weights);
}

void check_world(const WorldSpec& spec, std::mt19937& rng) {
  const int R = spec.num_ranks, E = spec.num_experts, K = spec.num_topk, L = E / R;
  const int hidden = 64;
  Shape shape;
  shape.num_ranks = R;
  shape.hidden = hidden;
  shape.num_topk = K;
  shape.num_experts = E;
  shape.expert_alignment = spec.expert_alignment;

  const int token_choices[] = {0, 1, 127};
  std::uniform_int_distribution<int> pick_count(0, 2);
  const int hot_expert = std::uniform_int_distribution<int>(0, E - 1)(rng);
  std::vector<RankInput> inputs;
  std::vector<Layout> layouts;
  long total_sent = 0;
  for (int r = 0; r < R; ++r) {
    inputs.push_back(random_rank_input(spec, token_choices[pick_count(rng)], hidden, hot_expert, rng));
    const RankInput& in = inputs.back();
    layouts.push_back(get_dispatch_layout(in.topk_idx.data(), in.num_tokens, K, E, R, R));
    const Layout& layout = layouts.back();

    // Layout self-consistency.
    long routed_slots = 0, tokens_routed_anywhere = 0;
    for (int64_t e : in.topk_idx) routed_slots += e >= 0;
    long expert_total = 0;
    for (int c : layout.num_tokens_per_expert) expert_total += c;
    CHECK_EQ(expert_total, routed_slots);
    for (int t = 0; t < in.num_tokens; ++t) {
      bool anywhere = false;
      for (int d = 0; d < R; ++d) anywhere |= layout.is_token_in_rank[static_cast<size_t>(t) * R + d] != 0;
      tokens_routed_anywhere += anywhere;
    }
    for (int d = 0; d < R; ++d) {
      int column = 0;
      for (int t = 0; t < in.num_tokens; ++t) column += layout.is_token_in_rank[static_cast<size_t>(t) * R + d];
      CHECK_EQ(layout.num_tokens_per_rank[d], column);
      total_sent += column;
    }
    CHECK_EQ(layout.num_tokens_per_rdma_rank, (std::vector<int>{static_cast<int>(tokens_routed_anywhere)}));
    const Layout per_rank_nodes = get_dispatch_layout(in.topk_idx.data(), in.num_tokens, K, E, R, 1);
    CHECK_EQ(per_rank_nodes.num_tokens_per_rdma_rank, layout.num_tokens_per_rank);
  }

  const std::vector<RankOutput> outputs = dispatch(shape, inputs);
  long total_received = 0;
  for (int d = 0; d < R; ++d) {
    const RankOutput& out = outputs[d];
    total_received += out.num_recv_tokens;
    CHECK_EQ(out.rank_prefix_matrix, outputs[0].rank_prefix_matrix);
    CHECK_EQ(out.recv_x.size(), static_cast<size_t>(out.num_recv_tokens) * hidden * 2);
    CHECK_EQ(out.recv_topk_idx.size(), static_cast<size_t>(out.num_recv_tokens) * K);
    CHECK_EQ(out.recv_topk_weights.size(), static_cast<size_t>(out.num_recv_tokens) * K);
    CHECK_EQ(out.recv_src_idx.size(), static_cast<size_t>(out.num_recv_tokens));

    std::vector<int> raw_expert_counts(L, 0);
    int row_errors = 0;
    for (int s = 0; s < R; ++s) {
      const int begin = s > 0 ? out.rank_prefix_matrix[static_cast<size_t>(s - 1) * R + d] : 0;
      const int end = out.rank_prefix_matrix[static_cast<size_t>(s) * R + d];
      // The segment holds exactly the tokens of s routed to d, in increasing token order.
      CHECK_EQ(end - begin, layouts[s].num_tokens_per_rank[d]);
      for (int row = begin; row < end; ++row) {
        const int t = out.recv_src_idx[row];
        if (row > begin && !(t > out.recv_src_idx[row - 1])) ++row_errors;
        if (t < 0 || t >= inputs[s].num_tokens || !layouts[s].is_token_in_rank[static_cast<size_t>(t) * R + d]) {
          ++row_errors;
          continue;
        }
        if (!std::equal(out.recv_x.begin() + static_cast<size_t>(row) * hidden * 2,
                        out.recv_x.begin() + static_cast<size_t>(row + 1) * hidden * 2,
                        inputs[s].x.begin() + static_cast<size_t>(t) * hidden * 2)) {
          ++row_errors;
        }
        bool any_kept = false;
        for (int k = 0; k < K; ++k) {
          const int64_t e = inputs[s].topk_idx[static_cast<size_t>(t) * K + k];
          const int64_t local = out.recv_topk_idx[static_cast<size_t>(row) * K + k];
          const float w = out.recv_topk_weights[static_cast<size_t>(row) * K + k];
          const bool lives_here = e >= 0 && e / L == d;
          any_kept |= lives_here;
          if (lives_here) {
            raw_expert_counts[local] += 1;
            if (local != e - d * L || w != inputs[s].topk_weights[static_cast<size_t>(t) * K + k]) ++row_errors;
          } else if (local != -1 || float_bits(w) != 0u) {
            ++row_errors;
          }
        }
        if (!any_kept) ++row_errors;
      }
    }
    CHECK_EQ(row_errors, 0);
    for (int l = 0; l < L; ++l) {
      const int a = spec.expert_alignment;
      CHECK_EQ(out.num_recv_tokens_per_expert[l], (raw_expert_counts[l] + a - 1) / a * a);
    }
  }
  CHECK_EQ(total_received, total_sent);

  // combine(dispatch(x)) without bias = x * (number of receiving ranks): exact for small integers.
  // With biases of small integers the sum stays exact too.
  std::vector<CombineRankInput> combine_inputs(R);
  for (int d = 0; d < R; ++d) {
    combine_inputs[d].x = bytes_as_bf16(outputs[d].recv_x);
    combine_inputs[d].topk_weights = outputs[d].recv_topk_weights;
  }
  const bool with_bias = std::bernoulli_distribution(0.5)(rng);
  if (with_bias) {
    std::uniform_int_distribution<int> small_bias(-4, 4);
    for (int s = 0; s < R; ++s) {
      std::vector<float> bias0(static_cast<size_t>(inputs[s].num_tokens) * hidden), bias1(bias0.size());
      for (float& b : bias0) b = static_cast<float>(small_bias(rng));
      for (float& b : bias1) b = static_cast<float>(small_bias(rng));
      combine_inputs[s].bias0 = to_bf16(bias0);
      combine_inputs[s].bias1 = to_bf16(bias1);
    }
  }
  const std::vector<CombineRankOutput> combined = combine(shape, inputs, outputs, combine_inputs);
  for (int s = 0; s < R; ++s) {
    const RankInput& in = inputs[s];
    const std::vector<uint16_t> x = bytes_as_bf16(in.x);
    std::vector<uint16_t> expected_x(x.size());
    std::vector<float> expected_weights(in.topk_weights.size());
    for (int t = 0; t < in.num_tokens; ++t) {
      int receivers = 0;
      for (int d = 0; d < R; ++d) receivers += layouts[s].is_token_in_rank[static_cast<size_t>(t) * R + d];
      for (int h = 0; h < hidden; ++h) {
        const size_t i = static_cast<size_t>(t) * hidden + h;
        // The sum starts from +0.0f, so a token sent nowhere gives +0 (not -0) for a negative x.
        float value = 0.0f + bf16_to_float(x[i]) * static_cast<float>(receivers);
        if (with_bias) value += bf16_to_float(combine_inputs[s].bias0[i]) + bf16_to_float(combine_inputs[s].bias1[i]);
        expected_x[i] = float_to_bf16(value);
      }
      for (int k = 0; k < K; ++k) {
        const size_t slot = static_cast<size_t>(t) * K + k;
        expected_weights[slot] = in.topk_idx[slot] >= 0 ? in.topk_weights[slot] : 0.0f;
      }
    }
    CHECK_EQ(combined[s].combined_x, expected_x);
    CHECK_EQ(combined[s].combined_topk_weights, expected_weights);
  }
}

void test_random_worlds() {
  std::mt19937 rng(20240611);
  const Routing routings[] = {Routing::kDistinct, Routing::kWithDuplicates, Routing::kOneExpert,
                              Routing::kNowhere, Routing::kOneRank};
  for (int R : {1, 2, 4, 8}) {
    for (int E : {R, 64, 256}) {
      if (E % R != 0) continue;
      for (int K : {1, 6, 8}) {
        for (Routing routing : routings) {
          const int alignment = std::uniform_int_distribution<int>(0, 1)(rng) ? 1 : 4;
          check_world(WorldSpec{R, E, K, routing, alignment}, rng);
        }
      }
    }
  }
}

// ---- invalid inputs --------------------------------------------------------------------------------

void test_invalid_inputs() {
  const std::vector<int64_t> below = {0, -2}, above = {0, 4}, fine = {0, 3};
  CHECK_THROWS(get_dispatch_layout(below.data(), 1, 2, 4, 2, 2), std::invalid_argument);
  CHECK_THROWS(get_dispatch_layout(above.data(), 1, 2, 4, 2, 2), std::invalid_argument);
  CHECK_THROWS(get_dispatch_layout(fine.data(), 1, 2, 6, 4, 4), std::invalid_argument);  // E % R
  CHECK_THROWS(get_dispatch_layout(fine.data(), 1, 2, 4, 2, 3), std::invalid_argument);  // R % nvl
  CHECK_THROWS(get_dispatch_layout(fine.data(), 1, 2, 4, 2, 0), std::invalid_argument);

  const Shape shape = hand_world_shape();
  const std::vector<RankInput> inputs = hand_world_inputs();
  CHECK_THROWS(dispatch(shape, {inputs[0]}), std::invalid_argument);  // one input per rank
  auto broken = [&](auto&& edit) {
    std::vector<RankInput> copy = inputs;
    edit(copy);
    return copy;
  };
  CHECK_THROWS(dispatch(shape, broken([](auto& in) { in[1].x.pop_back(); })), std::invalid_argument);
  CHECK_THROWS(dispatch(shape, broken([](auto& in) { in[0].topk_idx.push_back(0); })), std::invalid_argument);
  CHECK_THROWS(dispatch(shape, broken([](auto& in) { in[0].topk_weights.pop_back(); })), std::invalid_argument);
  CHECK_THROWS(dispatch(shape, broken([](auto& in) { in[1].topk_weights.clear(); })), std::invalid_argument);
  CHECK_THROWS(dispatch(shape, broken([](auto& in) { in[0].x_scales.push_back(1); })), std::invalid_argument);
  CHECK_THROWS(dispatch(shape, broken([](auto& in) { in[0].topk_idx[0] = 4; })), std::invalid_argument);
  Shape scaled = shape;
  scaled.has_scales = true;  // hidden 2 is no multiple of 128
  CHECK_THROWS(dispatch(scaled, inputs), std::invalid_argument);

  const std::vector<RankOutput> outputs = dispatch(shape, inputs);
  std::vector<CombineRankInput> combine_inputs(2);
  for (int r = 0; r < 2; ++r) combine_inputs[r].x = bytes_as_bf16(outputs[r].recv_x);
  CHECK(combine(shape, inputs, outputs, combine_inputs).size() == 2);
  auto broken_combine = [&](auto&& edit) {
    std::vector<CombineRankInput> copy = combine_inputs;
    edit(copy);
    return copy;
  };
  CHECK_THROWS(combine(shape, inputs, outputs, broken_combine([](auto& in) { in[0].x.pop_back(); })),
               std::invalid_argument);
  CHECK_THROWS(combine(shape, inputs, outputs, broken_combine([](auto& in) { in[1].bias0.assign(5, 0); })),
               std::invalid_argument);
  CHECK_THROWS(combine(shape, inputs, outputs, broken_combine([](auto& in) { in[0].topk_weights.assign(3, 0); })),
               std::invalid_argument);
  CHECK_THROWS(combine(shape, inputs, outputs, broken_combine([](auto& in) { in[0].topk_weights.assign(8, 0); })),
               std::invalid_argument);  // weights on rank 0 only
  CHECK_THROWS(combine(shape, inputs, {outputs[0]}, combine_inputs), std::invalid_argument);
  // Dispatch outputs that disagree with the routing are rejected rather than silently misread.
  std::vector<RankOutput> swapped = outputs;
  std::swap(swapped[1].recv_src_idx[0], swapped[1].recv_src_idx[1]);
  CHECK_THROWS(combine(shape, inputs, swapped, combine_inputs), std::invalid_argument);
}

}  // namespace

int main() {
  test_bf16();
  test_hand_layout();
  test_hand_dispatch_and_combine();
  test_fp8_payload_and_scales();
  test_combine_accumulation_order();
  test_random_worlds();
  test_invalid_inputs();
  return check::summary("test_oracle");
}
