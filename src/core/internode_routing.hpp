// The routing math of the multi-node high-throughput mode (docs/design.md, "Multi-node
// high-throughput mode: the plan"): which nodes and local ranks a token goes to, and the prefix
// matrices of DeepEP's multi-node handle, as host+device functions the CPU tests exercise before
// the kernels exist.
//
// Ranks: N nodes of M GPUs, rank = node * M + local. A token of source (a, i) crosses the network
// once per destination node b, to the rail peer (b, i), which forwards it over NVLink to every
// (b, j) that holds one of its experts. Channels split a rank's tokens into C contiguous ranges
// (channel_token_range in layouts.hpp), each travelling in token order.
#pragma once

#include <cstdint>

#include "core/hd.hpp"
#include "core/layouts.hpp"

namespace flashep {

/// Largest node count the masks address.
inline constexpr int kMaxNodes = 64;

struct NodeShape {
  int num_ranks;  // R
  int nvl_size;   // M
  FLASHEP_HD int num_nodes() const { return num_ranks / nvl_size; }
  FLASHEP_HD int node_of(int rank) const { return rank / nvl_size; }
  FLASHEP_HD int local_of(int rank) const { return rank % nvl_size; }
  FLASHEP_HD int rank_of(int node, int local) const { return node * nvl_size + local; }
  /// The rail peer of `rank` on `node`: the GPU with the same local index there.
  FLASHEP_HD int rail_peer(int rank, int node) const { return rank_of(node, local_of(rank)); }
};

/// Destination nodes of a token from its row of is_token_in_rank ([R] bools).
FLASHEP_HD uint64_t token_node_mask(const bool* in_rank, const NodeShape& s) {
  uint64_t mask = 0;
  for (int r = 0; r < s.num_ranks; ++r)
    if (in_rank[r]) mask |= uint64_t(1) << s.node_of(r);
  return mask;
}

/// Local ranks of `node` that receive the token (what its forwarder fans out to).
FLASHEP_HD uint32_t token_local_mask(const bool* in_rank, const NodeShape& s, int node) {
  uint32_t mask = 0;
  for (int j = 0; j < s.nvl_size; ++j)
    if (in_rank[s.rank_of(node, j)]) mask |= 1u << j;
  return mask;
}

/// Send side of one rank, from its is_token_in_rank [n, R]:
///   rdma_channel_prefix [N, C]: tokens per destination node, inclusive prefix over channels;
///   gbl_channel_prefix  [R, C]: tokens per destination rank, inclusive prefix over channels.
FLASHEP_HD void send_channel_prefixes(const bool* is_token_in_rank, int num_tokens, const NodeShape& s,
                                      int num_channels, int* rdma_channel_prefix, int* gbl_channel_prefix) {
  const int N = s.num_nodes(), R = s.num_ranks;
  for (int i = 0; i < N * num_channels; ++i) rdma_channel_prefix[i] = 0;
  for (int i = 0; i < R * num_channels; ++i) gbl_channel_prefix[i] = 0;
  for (int c = 0; c < num_channels; ++c) {
    const TokenRange range = channel_token_range(num_tokens, num_channels, c);
    for (int t = range.begin; t < range.end; ++t) {
      const bool* row = is_token_in_rank + int64_t(t) * R;
      const uint64_t nodes = token_node_mask(row, s);
      for (int b = 0; b < N; ++b)
        if ((nodes >> b) & 1u) ++rdma_channel_prefix[b * num_channels + c];
      for (int r = 0; r < R; ++r)
        if (row[r]) ++gbl_channel_prefix[r * num_channels + c];
    }
  }
  for (int b = 0; b < N; ++b)
    for (int c = 1; c < num_channels; ++c) rdma_channel_prefix[b * num_channels + c] += rdma_channel_prefix[b * num_channels + c - 1];
  for (int r = 0; r < R; ++r)
    for (int c = 1; c < num_channels; ++c) gbl_channel_prefix[r * num_channels + c] += gbl_channel_prefix[r * num_channels + c - 1];
}

/// Receive side of rank `me`, from the send side of every rank (what the multi-node notify
/// exchange delivers: `gbl_of(src)` is source src's gbl_channel_prefix [R, C], `rdma_of(src)` its
/// rdma_channel_prefix [N, C]):
///   recv_gbl_channel_prefix_matrix [R, C]: per source rank, its channel prefix of tokens to me;
///   recv_gbl_rank_prefix_sum [R]: inclusive prefix over source ranks of tokens I receive
///     (DeepEP's handle[-4]);
///   recv_rdma_channel_prefix_matrix [N, C]: per source node a, the channel prefix of tokens its
///     GPU with my local index sends to my node (what I forward);
///   recv_rdma_rank_prefix_sum [N]: inclusive prefix over source nodes of those.
template <typename GblOf, typename RdmaOf>
FLASHEP_HD void receive_prefixes(const NodeShape& s, int me, int num_channels, GblOf gbl_of, RdmaOf rdma_of,
                                 int* recv_gbl_channel_prefix_matrix, int* recv_gbl_rank_prefix_sum,
                                 int* recv_rdma_channel_prefix_matrix, int* recv_rdma_rank_prefix_sum) {
  const int C = num_channels, node = s.node_of(me);
  int running = 0;
  for (int src = 0; src < s.num_ranks; ++src) {
    const int* gbl = gbl_of(src);
    for (int c = 0; c < C; ++c) recv_gbl_channel_prefix_matrix[src * C + c] = gbl[me * C + c];
    running += gbl[me * C + C - 1];
    recv_gbl_rank_prefix_sum[src] = running;
  }
  running = 0;
  for (int a = 0; a < s.num_nodes(); ++a) {
    const int* rdma = rdma_of(s.rank_of(a, s.local_of(me)));
    for (int c = 0; c < C; ++c) recv_rdma_channel_prefix_matrix[a * C + c] = rdma[node * C + c];
    running += rdma[node * C + C - 1];
    recv_rdma_rank_prefix_sum[a] = running;
  }
}

/// The row of a received token in the output of its receiver: source `src`'s rows start after
/// the inclusive prefix of the sources before it, then its channels before `channel`, then the
/// token's position among the channel's tokens routed to this receiver. `recv_gbl_rank_prefix_sum`
/// [R] and `recv_gbl_channel_prefix_matrix` [R, C] are the receiver's handle entries.
FLASHEP_HD int64_t internode_recv_row(const int* recv_gbl_rank_prefix_sum, const int* recv_gbl_channel_prefix_matrix,
                                      int num_channels, int src, int channel, int position_in_channel) {
  const int64_t rank_begin = src == 0 ? 0 : recv_gbl_rank_prefix_sum[src - 1];
  const int64_t channel_begin = channel == 0 ? 0 : recv_gbl_channel_prefix_matrix[src * num_channels + channel - 1];
  return rank_begin + channel_begin + position_in_channel;
}

}  // namespace flashep
