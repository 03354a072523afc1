// CPU tests of the composed multi-node path's arithmetic (src/core/internode_compose.hpp), before
// the kernels: simulating rail stage -> node-local NVLink stage -> reordering on random worlds puts
// every token at the row the single-node contract gives it (by global source rank, then token),
// the NVLink stage's order is the one the single-node receivers produce (by forwarder, then the
// forwarded order), node-local expert ids select exactly the node's experts, and the rail region's
// areas and messages are disjoint and aligned.
#include <algorithm>
#include <random>
#include <vector>

#include "check.hpp"
#include "core/internode_compose.hpp"

using namespace flashep;

namespace {

void test_rail_layout() {
  for (int N : {1, 2, 4, 16})
    for (int T : {1, 128, 4096, kMaxRailTokens})
      for (int H : {128, 2048, 7168})
        for (int K : {1, 8, 32})
          for (bool fp8 : {false, true}) {
            const RailRegion r = make_rail_region(N, T, H, K, fp8, 8 * N);
            const RailMessage& m = r.msg;
            CHECK(m.scale_offset >= m.row_bytes && m.scale_offset % 16 == 0);
            CHECK(m.topk_offset >= m.scale_offset + (fp8 ? H / 128 * 4 : 0) && m.topk_offset % 16 == 0);
            CHECK(m.weight_offset >= m.topk_offset + 4 * K && m.weight_offset % 16 == 0);
            CHECK(m.meta_offset >= m.weight_offset + 4 * K && m.meta_offset % 16 == 0);
            CHECK(m.bytes == m.meta_offset + 16 + 4 * rail_mask_words(8 * N) && m.bytes % 4 == 0);
            CHECK(m.bytes <= m.stride && m.stride % 128 == 0);
            // Areas in address order, disjoint, aligned.
            const int64_t areas[][2] = {
                {r.state_offset, r.state_offset + 128},
                {r.signals_offset, r.signal(1, N - 1) + 8},
                {r.checks_offset, r.check(1, N - 1) + 16},
                {r.flags_offset, r.flag(1, N - 1, kMaxRailTokens - 1) + 8},
                {r.return_flags_offset, r.return_flag(1, N - 1, kMaxRailTokens - 1) + 8},
                {r.slots_offset, r.slot(1, N - 1, T - 1) + m.stride},
                {r.stage_offset, r.stage(T - 1) + m.stride},
                {r.check_stage_offset, r.check_stage(N - 1) + 16},
                {r.return_slots_offset, r.return_slot(1, N - 1, T - 1) + r.return_stride},
                {r.return_stage_offset, r.return_stage(N * T - 1) + r.return_stride},
            };
            const int num_areas = sizeof(areas) / sizeof(areas[0]);
            for (int i = 0; i < num_areas; ++i) {
              CHECK(areas[i][0] % 128 == 0);
              CHECK(i + 1 == num_areas ? areas[i][1] <= r.end : areas[i][1] <= areas[i + 1][0]);
            }
            CHECK(r.end % 128 == 0);
            CHECK(r.return_stride % 128 == 0 && r.return_stride >= 2 * H + 4 * kMaxTopk);
            // The fixed part, and the slots, do not move with the dtype or the top-k of a call (a peer
            // one call ahead writes the other half while this rank reads one).
            const RailRegion other = make_rail_region(N, T, H, K == 1 ? 32 : 1, !fp8, 8 * N);
            static_assert(sizeof(RailState) == 128, "the rail state fills its 128 bytes");
            CHECK_EQ(other.flag(1, N - 1, 3), r.flag(1, N - 1, 3));
            CHECK_EQ(other.signal(1, N - 1), r.signal(1, N - 1));
            CHECK_EQ(other.return_flag(1, N - 1, 3), r.return_flag(1, N - 1, 3));
            CHECK_EQ(other.slot(1, N - 1, T - 1), r.slot(1, N - 1, T - 1));
            CHECK_EQ(other.return_slot(1, N - 1, T - 1), r.return_slot(1, N - 1, T - 1));
            CHECK_EQ(other.end, r.end);
            CHECK_EQ(rail_fixed_bytes(N), r.slots_offset);
          }
  // Every rank agrees on a call's hash only when the call is the same.
  CHECK(rail_call_hash(1, 4096, 7168, 1, 8) != rail_call_hash(1, 4096, 7168, 0, 8));
  CHECK(rail_call_hash(1, 4096, 7168, 1, 8) != rail_call_hash(1, 4096, 7168, 1, 0));
  CHECK_EQ(rail_call_hash(1, 4096, 7168, 1, 8), rail_call_hash(1, 4096, 7168, 1, 8));
}

void test_node_local_experts() {
  const int M = 4, L = 3, N = 3;
  for (int node = 0; node < N; ++node)
    for (int64_t e = -1; e < int64_t(N) * M * L + 2; ++e) {
      const int local = node_local_expert(e, node, M, L);
      const bool on_node = e >= 0 && e / (M * L) == node && e < int64_t(N) * M * L;
      CHECK_EQ(local >= 0, on_node);
      if (on_node) {
        CHECK_EQ(local, int(e - int64_t(node) * M * L));
        // Local rank j of the node holds local experts [j * L, (j + 1) * L): the same rank as globally.
        CHECK_EQ(local / L, int(e / L) % M);
      }
    }
}

/// One random world: per rank, tokens with a random set of destination ranks.
void check_world(int nodes, int locals, std::mt19937& rng, double density) {
  const NodeShape s{nodes * locals, locals};
  const int R = s.num_ranks, N = nodes, M = locals;
  std::uniform_int_distribution<int> token_count(0, 60);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<int> num_tokens(R);
  std::vector<std::vector<uint8_t>> in_rank(R);
  for (int r = 0; r < R; ++r) {
    num_tokens[r] = r == 1 % R ? 0 : token_count(rng);  // one rank sends nothing
    in_rank[r].assign(size_t(num_tokens[r]) * R, 0);
    for (int t = 0; t < num_tokens[r]; ++t)
      for (int d = 0; d < R; ++d) in_rank[r][size_t(t) * R + d] = u(rng) < density;
  }
  for (int recv = 0; recv < R; ++recv) {
    const int node = s.node_of(recv), me = s.local_of(recv);
    // Rail stage: forwarder (node, i) receives, from each source node a, the tokens of (a, i) that
    // go to any rank of `node`, in token order; the forwarded list is by source node.
    // NVLink stage: the receiver gets from forwarder i the forwarded tokens whose local mask has
    // `me`, in forwarded order; forwarders in local-rank order.
    std::vector<int> counts(size_t(M) * N, 0);
    struct Row { int src, token; };
    std::vector<Row> nvlink_order;
    for (int i = 0; i < M; ++i) {
      std::vector<int> forwarded_prefix(N);
      int running = 0;
      for (int a = 0; a < N; ++a) {
        const int src = s.rank_of(a, i);
        for (int t = 0; t < num_tokens[src]; ++t)
          running += (token_node_mask(reinterpret_cast<const bool*>(&in_rank[src][size_t(t) * R]), s) >> node) & 1u;
        forwarded_prefix[a] = running;
      }
      for (int a = 0; a < N; ++a) {
        const int src = s.rank_of(a, i);
        int index = 0;  // among src's tokens for this node
        for (int t = 0; t < num_tokens[src]; ++t) {
          const bool* row = reinterpret_cast<const bool*>(&in_rank[src][size_t(t) * R]);
          if (!((token_node_mask(row, s) >> node) & 1u)) continue;
          const int f = forwarded_index(forwarded_prefix.data(), a, index++);
          CHECK(f >= 0 && f < running);
          if ((token_local_mask(row, s, node) >> me) & 1u) {
            nvlink_order.push_back({src, t});
            ++counts[size_t(i) * N + a];
          }
        }
        CHECK_EQ(forwarded_index(forwarded_prefix.data(), a, index), forwarded_prefix[a]);
      }
    }
    // The contract: by global source rank, then token.
    std::vector<Row> contract;
    for (int src = 0; src < R; ++src)
      for (int t = 0; t < num_tokens[src]; ++t)
        if (in_rank[src][size_t(t) * R + recv]) contract.push_back({src, t});
    CHECK_EQ(contract.size(), nvlink_order.size());
    if (contract.size() != nvlink_order.size()) continue;
    // Walk the NVLink stage's rows per (forwarder, source node) and map them.
    std::vector<int> filled(contract.size(), 0);
    for (int i = 0; i < M; ++i)
      for (int a = 0; a < N; ++a)
        for (int k = 0; k < counts[size_t(i) * N + a]; ++k) {
          const int64_t nv = composed_nvlink_row(counts.data(), s, i, a, k);
          const int64_t fin = composed_final_row(counts.data(), s, i, a, k);
          CHECK(nv >= 0 && nv < int64_t(nvlink_order.size()));
          CHECK(fin >= 0 && fin < int64_t(contract.size()));
          if (nv < 0 || nv >= int64_t(nvlink_order.size()) || fin < 0 || fin >= int64_t(contract.size())) continue;
          CHECK_EQ(nvlink_order[size_t(nv)].src, s.rank_of(a, i));
          CHECK_EQ(contract[size_t(fin)].src, nvlink_order[size_t(nv)].src);
          CHECK_EQ(contract[size_t(fin)].token, nvlink_order[size_t(nv)].token);
          ++filled[size_t(fin)];
        }
    for (int f : filled) CHECK_EQ(f, 1);
  }
}

void test_composed_order() {
  std::mt19937 rng(11);
  for (int nodes : {1, 2, 3, 4})
    for (int locals : {1, 2, 4, 8})
      for (double density : {0.0, 0.1, 0.5, 1.0})
        for (int rep = 0; rep < 3; ++rep) check_world(nodes, locals, rng, density);
}

}  // namespace

int main() {
  test_rail_layout();
  test_node_local_experts();
  test_composed_order();
  return check::summary("test_internode_compose");
}
