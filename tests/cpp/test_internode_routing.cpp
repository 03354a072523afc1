// CPU tests of the multi-node routing math (src/core/internode_routing.hpp), before the kernels:
// simulating the planned path (source -> rail peer over the network -> local receivers over
// NVLink, channel by channel in token order) with the handle entries it defines puts every token
// at the row the single-node contract gives it (by source rank, then token), and the forwarder and
// receiver counts match the prefix sums of the handle.
#include <random>
#include <vector>

#include "check.hpp"
#include "core/internode_routing.hpp"

using namespace flashep;

namespace {

struct World {
  NodeShape shape;
  int num_channels;
  std::vector<int> num_tokens;                 // per rank
  std::vector<std::vector<uint8_t>> in_rank;   // per rank: [n, R]
};

World random_world(int nodes, int locals, int channels, std::mt19937& rng, double density, bool one_node_only) {
  World w{NodeShape{nodes * locals, locals}, channels, {}, {}};
  const int R = nodes * locals;
  std::uniform_int_distribution<int> tokens(0, 200);
  std::uniform_real_distribution<double> u(0, 1);
  for (int r = 0; r < R; ++r) {
    const int n = r == 1 ? 0 : tokens(rng);  // rank 1 sends nothing
    w.num_tokens.push_back(n);
    std::vector<uint8_t> rows(size_t(n) * R, 0);
    for (int t = 0; t < n; ++t)
      for (int d = 0; d < R; ++d)
        if (u(rng) < density && (!one_node_only || d / locals == 0)) rows[size_t(t) * R + d] = 1;
    w.in_rank.push_back(rows);
  }
  return w;
}

void check_world(const World& w) {
  const NodeShape& s = w.shape;
  const int R = s.num_ranks, N = s.num_nodes(), C = w.num_channels;
  // Send side of every rank.
  std::vector<std::vector<int>> rdma(R, std::vector<int>(size_t(N) * C)), gbl(R, std::vector<int>(size_t(R) * C));
  for (int r = 0; r < R; ++r)
    send_channel_prefixes(reinterpret_cast<const bool*>(w.in_rank[r].data()), w.num_tokens[r], s, C, rdma[r].data(),
                          gbl[r].data());
  for (int recv = 0; recv < R; ++recv) {
    // The receiver's handle entries, from the senders' (what the notify exchange will carry).
    std::vector<int> rank_prefix(R), channel_prefix(size_t(R) * C), rdma_prefix(size_t(N) * C), rdma_rank_prefix(N);
    receive_prefixes(
        s, recv, C, [&](int src) { return gbl[src].data(); }, [&](int src) { return rdma[src].data(); },
        channel_prefix.data(), rank_prefix.data(), rdma_prefix.data(), rdma_rank_prefix.data());
    const int running = rank_prefix[R - 1];
    // The forwarder role of this GPU: what reaches it over the network, per source node.
    const int node = s.node_of(recv);
    int forwarded = 0;
    for (int a = 0; a < N; ++a) {
      const int src = s.rank_of(a, s.local_of(recv));  // its rail peer on node a
      int from_a = 0;
      for (int t = 0; t < w.num_tokens[src]; ++t)
        from_a += (token_node_mask(reinterpret_cast<const bool*>(&w.in_rank[src][size_t(t) * R]), s) >> node) & 1u;
      forwarded += from_a;
      CHECK_EQ(rdma_rank_prefix[a], forwarded);
      CHECK_EQ(rdma_prefix[size_t(a) * C + C - 1], from_a);
    }
    // Rows: walk the planned path and place each token where the receiver would.
    std::vector<int> row_src(size_t(running), -1), row_token(size_t(running), -1);
    for (int src = 0; src < R; ++src) {
      const int forwarder = s.rail_peer(src, node);
      CHECK_EQ(s.node_of(forwarder), node);
      for (int c = 0; c < C; ++c) {
        const TokenRange range = channel_token_range(w.num_tokens[src], C, c);
        int position = 0;
        for (int t = range.begin; t < range.end; ++t) {
          const bool* row = reinterpret_cast<const bool*>(&w.in_rank[src][size_t(t) * R]);
          if (!((token_local_mask(row, s, node) >> s.local_of(recv)) & 1u)) continue;
          const int64_t out = internode_recv_row(rank_prefix.data(), channel_prefix.data(), C, src, c, position++);
          CHECK(out >= 0 && out < running);
          if (out < 0 || out >= running) continue;
          CHECK_EQ(row_src[out], -1);
          row_src[out] = src;
          row_token[out] = t;
        }
      }
    }
    // The single-node contract: rows by source rank, then token, every row filled.
    for (int i = 0; i < running; ++i) {
      CHECK(row_src[i] >= 0);
      if (i > 0) CHECK(row_src[i - 1] < row_src[i] || (row_src[i - 1] == row_src[i] && row_token[i - 1] < row_token[i]));
    }
  }
}

void test_layouts_of_nodes() {
  std::mt19937 rng(5);
  // 2 x 1 (this machine), 2 x 2, 2 x 4, 4 x 2, 2 x 8: random routing, a rank that sends nothing,
  // dense and sparse, and a node that receives nothing.
  for (auto [nodes, locals] : {std::pair{2, 1}, {2, 2}, {2, 4}, {4, 2}, {2, 8}})
    for (int channels : {1, 3, 12})
      for (double density : {0.05, 0.3, 1.0})
        for (bool one_node : {false, true}) check_world(random_world(nodes, locals, channels, rng, density, one_node));
}

void test_masks_and_peers() {
  const NodeShape s{8, 4};
  CHECK_EQ(s.num_nodes(), 2);
  CHECK_EQ(s.rail_peer(1, 1), 5);
  CHECK_EQ(s.rail_peer(6, 0), 2);
  bool row[8] = {false, true, false, false, false, false, true, true};
  CHECK_EQ(token_node_mask(row, s), uint64_t(3));
  CHECK_EQ(token_local_mask(row, s, 0), 2u);
  CHECK_EQ(token_local_mask(row, s, 1), 12u);
}

}  // namespace

int main() {
  test_masks_and_peers();
  test_layouts_of_nodes();
  return check::summary("test_internode_routing");
}
