// CPU tests of the intranode handle decoding (src/core/handle.hpp) against the oracle: on random
// worlds, the rows each (source, channel) decodes to must tile the dispatch output exactly in the
// oracle's order and hold exactly that channel's tokens; send_head must give each token's slot; and
// a handle with negative or decreasing prefix entries must decode to ranges that rows_inside()
// rejects (the kernels check it before writing).
#include <cstdint>
#include <random>
#include <vector>

#include "check.hpp"
#include "core/handle.hpp"
#include "core/layouts.hpp"
#include "oracle/oracle.hpp"

using namespace flashep;

namespace {

/// A world's handles, built from the oracle's routing the way notify_dispatch and dispatch build
/// them: per source, channel_prefix[dst][c] (inclusive over channels) and send_head[t][dst].
struct World {
  int R = 0, C = 0;
  std::vector<oracle::Layout> layouts;          // per rank
  std::vector<oracle::RankOutput> outputs;      // per rank (oracle dispatch)
  std::vector<std::vector<int>> channel_prefix;       // per source [R][C]
  std::vector<std::vector<int>> recv_channel_prefix;  // per destination [R][C]
  std::vector<std::vector<int>> send_head;            // per source [n][R]
  std::vector<int> num_tokens;
};

World make_world(std::mt19937& rng, int R, int C, int max_tokens) {
  World w;
  w.R = R;
  w.C = C;
  const int K = 4, E = 8 * R, hidden = 8;
  oracle::Shape shape;
  shape.num_ranks = R;
  shape.hidden = hidden;
  shape.elem_size = 2;
  shape.num_topk = K;
  shape.num_experts = E;
  std::vector<oracle::RankInput> inputs(R);
  for (int r = 0; r < R; ++r) {
    const int n = (rng() % 5 == 0) ? 0 : int(rng() % (max_tokens + 1));
    w.num_tokens.push_back(n);
    inputs[r].num_tokens = n;
    inputs[r].x.assign(size_t(n) * hidden * 2, 0);
    for (size_t i = 0; i < inputs[r].x.size(); ++i) inputs[r].x[i] = uint8_t(rng());
    inputs[r].topk_idx.resize(size_t(n) * K);
    for (auto& e : inputs[r].topk_idx) e = (rng() % 6 == 0) ? -1 : int64_t(rng() % E);
    // Distinct experts per token are not needed for the handle; duplicates are allowed input.
    w.layouts.push_back(oracle::get_dispatch_layout(inputs[r].topk_idx.data(), n, K, E, R, R));
  }
  w.outputs = oracle::dispatch(shape, inputs);
  w.channel_prefix.assign(R, std::vector<int>(size_t(R) * C, 0));
  w.send_head.resize(R);
  for (int s = 0; s < R; ++s) {
    const int n = w.num_tokens[s];
    w.send_head[s].assign(size_t(n) * R, 0);
    for (int c = 0; c < C; ++c) {
      const TokenRange range = channel_token_range(n, C, c);
      for (int d = 0; d < R; ++d) {
        int slots = 0;
        for (int t = range.begin; t < range.end; ++t) {
          const bool sent = w.layouts[s].is_token_in_rank[size_t(t) * R + d] != 0;
          w.send_head[s][size_t(t) * R + d] = encode_send_head(sent, slots);
          slots += sent;
        }
        w.channel_prefix[s][size_t(d) * C + c] = (c > 0 ? w.channel_prefix[s][size_t(d) * C + c - 1] : 0) + slots;
      }
    }
  }
  w.recv_channel_prefix.assign(R, std::vector<int>(size_t(R) * C, 0));
  for (int d = 0; d < R; ++d)
    for (int s = 0; s < R; ++s)
      for (int c = 0; c < C; ++c) w.recv_channel_prefix[d][size_t(s) * C + c] = w.channel_prefix[s][size_t(d) * C + c];
  return w;
}

void check_world(const World& w) {
  const int R = w.R, C = w.C;
  for (int d = 0; d < R; ++d) {
    const oracle::RankOutput& out = w.outputs[d];
    int64_t next_row = 0;
    for (int s = 0; s < R; ++s) {
      for (int c = 0; c < C; ++c) {
        const RowRange rows =
            received_rows(out.rank_prefix_matrix.data(), w.recv_channel_prefix[d].data(), R, C, d, s, c);
        // The ranges tile the output in the oracle's order: by source, then channel.
        CHECK_EQ(rows.begin, next_row);
        CHECK(rows_inside(rows, out.num_recv_tokens));
        CHECK_EQ(rows.count, sent_count(w.channel_prefix[s].data(), C, d, c));
        // They hold exactly the tokens of source s's channel c that go to d, in token order.
        const TokenRange range = channel_token_range(w.num_tokens[s], C, c);
        int64_t row = rows.begin;
        for (int t = range.begin; t < range.end; ++t) {
          if (!w.layouts[s].is_token_in_rank[size_t(t) * R + d]) continue;
          CHECK(row < rows.begin + rows.count);
          if (row < out.num_recv_tokens) CHECK_EQ(out.recv_src_idx[row], t);
          // send_head: the token's slot in ring (c, s) at d is its index among those rows.
          CHECK(was_sent(w.send_head[s][size_t(t) * R + d]));
          CHECK_EQ(int64_t(slots_before(w.send_head[s][size_t(t) * R + d])), row - rows.begin);
          ++row;
        }
        CHECK_EQ(row, rows.begin + rows.count);
        next_row = rows.begin + rows.count;
      }
    }
    CHECK_EQ(next_row, int64_t(out.num_recv_tokens));
  }
}

void test_random_worlds() {
  std::mt19937 rng(20261130);
  for (int R : {1, 2, 3, 4, 8, 16})
    for (int C : {1, 2, 5, 48})
      for (int round = 0; round < 3; ++round) check_world(make_world(rng, R, C, 70));
}

void test_corrupt_handles_are_rejected() {
  std::mt19937 rng(7);
  World w = make_world(rng, 4, 6, 60);
  const int R = w.R, C = w.C;
  for (int d = 0; d < R; ++d) {
    const int rows = w.outputs[d].num_recv_tokens;
    if (rows == 0) continue;
    auto any_rejected = [&](const std::vector<int>& rank_prefix, const std::vector<int>& recv_prefix) {
      bool rejected = false;
      for (int s = 0; s < R; ++s)
        for (int c = 0; c < C; ++c)
          rejected |= !rows_inside(received_rows(rank_prefix.data(), recv_prefix.data(), R, C, d, s, c), rows);
      return rejected;
    };
    CHECK(!any_rejected(w.outputs[d].rank_prefix_matrix, w.recv_channel_prefix[d]));
    // A negative rank prefix entry: the next source's rows start before row 0.
    std::vector<int> negative = w.outputs[d].rank_prefix_matrix;
    negative[size_t(0) * R + d] = -5;
    CHECK(any_rejected(negative, w.recv_channel_prefix[d]));
    // A decreasing channel prefix: a negative count.
    std::vector<int> decreasing = w.recv_channel_prefix[d];
    for (int s = 0; s < R; ++s) decreasing[size_t(s) * C + C - 1] = decreasing[size_t(s) * C + C - 2] - 1;
    CHECK(any_rejected(w.outputs[d].rank_prefix_matrix, decreasing));
    // Rows past the output (another dispatch's handle with more rows).
    std::vector<int> larger = w.outputs[d].rank_prefix_matrix;
    larger[size_t(R - 2) * R + d] += 1000;
    CHECK(any_rejected(larger, w.recv_channel_prefix[d]));
  }
  CHECK(!rows_inside(RowRange{0, -1}, 10));
  CHECK(!rows_inside(RowRange{-1, 1}, 10));
  CHECK(!rows_inside(RowRange{8, 3}, 10));
  CHECK(rows_inside(RowRange{7, 3}, 10));
  CHECK(rows_inside(RowRange{0, 0}, 0));
}

}  // namespace

int main() {
  test_random_worlds();
  test_corrupt_handles_are_rejected();
  return check::summary("test_handle");
}
