// The first multi-node path, composed of stages (docs/design.md, "Multi-node: the first version"):
// a rail stage (each rank sends each token once per destination node to its rail peer over
// NVSHMEM), the single-node NVLink dispatch run inside each node on what the rail peers received,
// and a local reordering into the contract's order. This header holds the host+device arithmetic
// of that composition, which the CPU tests check against the single-node contract before any
// kernel exists: the rail stage's message and region layout, the forwarded token order, the remap
// of expert ids to node-local ids, and the row permutation.
//
// Ranks: N nodes of M GPUs, rank = node * M + local (NodeShape in internode_routing.hpp).
#pragma once

#include <cstdint>

#include "core/hd.hpp"
#include "core/internode_routing.hpp"
#include "core/layouts.hpp"

namespace flashep {

// ---- the rail stage's wire -----------------------------------------------------------------------

/// One rail message (a token, the same bytes for every destination node, so it is staged once):
/// [row][scales (FP8)][top-k ids (global, or -1)][top-k weights][meta: source token, 3 reserved,
/// then the token's row of is_token_in_rank as R bits]. The receiving forwarder derives its node's
/// local ids and local-rank mask from it. `stride` is that of the largest form (BF16 rows, FP8-sized
/// scales, kMaxTopk slots), a multiple of 128: the slots sit where no dtype or top-k of a call moves
/// them (a peer one call ahead may write the other half of a region while this rank reads one).
struct RailMessage {
  int row_bytes;      // H * element size
  int scale_offset;   // float32 [H / 128] (FP8 only)
  int topk_offset;    // int32 [K]
  int weight_offset;  // float32 [K]
  int meta_offset;    // int32 {source token, 3 reserved, mask words}
  int bytes;          // what travels
  int stride;         // bytes between messages (any dtype and top-k)
};
FLASHEP_HD int rail_mask_words(int num_ranks) { return (num_ranks + 31) / 32; }
FLASHEP_HD RailMessage make_rail_message(int hidden, int num_topk, bool fp8, int num_ranks) {
  auto layout = [&](bool is_fp8, int topk) {
    RailMessage m{};
    m.row_bytes = hidden * (is_fp8 ? 1 : 2);
    m.scale_offset = static_cast<int>(align_up(m.row_bytes, 16));
    m.topk_offset = static_cast<int>(align_up(m.scale_offset + (is_fp8 ? (hidden / 128) * 4 : 0), 16));
    m.weight_offset = static_cast<int>(align_up(m.topk_offset + topk * 4, 16));
    m.meta_offset = static_cast<int>(align_up(m.weight_offset + topk * 4, 16));
    m.bytes = m.meta_offset + 16 + 4 * rail_mask_words(num_ranks);
    return m;
  };
  RailMessage m = layout(fp8, num_topk);
  // The largest form: a BF16 row, then room for FP8's scales, then kMaxTopk ids and weights.
  const int64_t largest = align_up(int64_t(hidden) * 2, 16) + align_up((hidden / 128) * 4, 16) +
                          2 * align_up(kMaxTopk * 4, 16) + 16 + 4 * rail_mask_words(num_ranks);
  m.stride = static_cast<int>(align_up(largest, 128));
  return m;
}
inline constexpr int kRailMetaSrcToken = 0;
inline constexpr int kRailMetaMask = 4;  // first of the mask words

/// The rail stage's own state (this rank only), at RailRegion::state_offset.
struct RailState {
  uint32_t seq;         // dispatch rail exchanges whose receive finished (the next one's number)
  int send_ticket;      // blocks done with the send
  int receive_ticket;   // blocks done with the receive
  uint32_t return_seq;  // combine returns whose receive finished
  int return_send_ticket;
  int return_receive_ticket;
  int reserved[26];
};

/// Tokens per rank the multi-node buffer hint (Config::get_rdma_buffer_size_hint) sizes the rail
/// stage for: FLASHEP_INTERNODE_MAX_TOKENS' default.
inline constexpr int kDefaultInternodeMaxTokens = 4096;

/// Largest token count per rank of the multi-node path (the rail flags are sized for it, so that
/// they sit at offsets no shape moves).
inline constexpr int kMaxRailTokens = 16384;

/// A call's check word: what every rank of a rail exchange or return must agree on (a mismatch
/// fails the call on the receiver instead of misreading messages).
FLASHEP_HD uint32_t rail_call_hash(int op, int max_tokens, int hidden, int fp8, int num_topk) {
  const int fields[5] = {op, max_tokens, hidden, fp8, num_topk};
  return call_fields_hash(fields, 5);
}

/// The rail stage's inbox on each rank (at the start of the NVSHMEM symmetric region). Everything
/// peers write comes in two halves, by the parity of the call's sequence number: a peer can be one
/// call ahead of this rank (its next send before this rank's receive), never two (its receive of
/// that call needs this rank's send of it, which follows this rank's receive).
///   Fixed part (offsets depend on N only): the state; per half and source node a 64-bit count
///   signal ("seq << 32 | valid | count", the low-latency encoding) with a 16-byte check block (the
///   call hash) that travels with it; per half, source node and slot the message's own flag; the
///   same flags for the combine's returned rows.
///   Per shape (N, T, H, R): per half the message slots [N][T] and the returned rows [N][T]; our
///   staged messages [T], check blocks [N] and staged returns [N * T].
struct RailRegion {
  int num_nodes;
  int max_tokens;
  RailMessage msg;
  int64_t state_offset;         // RailState (128 bytes)
  int64_t signals_offset;       // uint64 [2][N]
  int64_t checks_offset;        // 16 bytes [2][N]: the call hash of each source's count
  int64_t flags_offset;         // uint64 [2][N][kMaxRailTokens]
  int64_t return_flags_offset;  // uint64 [2][N][kMaxRailTokens]
  int64_t slots_offset;         // [2][N][T] messages
  int64_t stage_offset;         // [T] staged messages of ours (puts read them)
  int64_t check_stage_offset;   // 16 bytes [N]: our staged check blocks
  int return_stride;            // bytes between returned rows: BF16 row + kMaxTopk float32 weights, multiple of 128
  int64_t return_slots_offset;  // [2][N][T] returned rows (combine, at the source)
  int64_t return_stage_offset;  // [N * T] our staged returns (at the forwarder)
  int64_t end;

  FLASHEP_HD int64_t signal(int half, int src_node) const { return signals_offset + (int64_t(half) * num_nodes + src_node) * 8; }
  FLASHEP_HD int64_t check(int half, int src_node) const { return checks_offset + (int64_t(half) * num_nodes + src_node) * 16; }
  FLASHEP_HD int64_t check_stage(int node) const { return check_stage_offset + int64_t(node) * 16; }
  FLASHEP_HD int64_t flag(int half, int src_node, int index) const {
    return flags_offset + ((int64_t(half) * num_nodes + src_node) * kMaxRailTokens + index) * 8;
  }
  FLASHEP_HD int64_t return_flag(int half, int node, int index) const {
    return return_flags_offset + ((int64_t(half) * num_nodes + node) * kMaxRailTokens + index) * 8;
  }
  FLASHEP_HD int64_t slot(int half, int src_node, int index) const {
    return slots_offset + ((int64_t(half) * num_nodes + src_node) * max_tokens + index) * msg.stride;
  }
  FLASHEP_HD int64_t stage(int index) const { return stage_offset + int64_t(index) * msg.stride; }
  FLASHEP_HD int64_t return_slot(int half, int node, int index) const {
    return return_slots_offset + ((int64_t(half) * num_nodes + node) * max_tokens + index) * return_stride;
  }
  FLASHEP_HD int64_t return_stage(int row) const { return return_stage_offset + int64_t(row) * return_stride; }
};
FLASHEP_HD RailRegion make_rail_region(int num_nodes, int max_tokens, int hidden, int num_topk, bool fp8, int num_ranks) {
  RailRegion r{};
  r.num_nodes = num_nodes;
  r.max_tokens = max_tokens;
  r.msg = make_rail_message(hidden, num_topk, fp8, num_ranks);
  const int64_t N = num_nodes, T = max_tokens;
  int64_t at = 0;
  r.state_offset = at;
  at += 128;
  r.signals_offset = at;
  at = align_up(at + 2 * N * 8, 128);
  r.checks_offset = at;
  at = align_up(at + 2 * N * 16, 128);
  r.flags_offset = at;
  at = align_up(at + 2 * N * kMaxRailTokens * 8, 128);
  r.return_flags_offset = at;
  at = align_up(at + 2 * N * kMaxRailTokens * 8, 128);
  r.slots_offset = at;
  at = align_up(at + 2 * N * T * r.msg.stride, 128);
  r.stage_offset = at;
  at = align_up(at + T * r.msg.stride, 128);
  r.check_stage_offset = at;
  at = align_up(at + N * 16, 128);
  r.return_stride = static_cast<int>(align_up(int64_t(hidden) * 2 + int64_t(kMaxTopk) * 4, 128));
  r.return_slots_offset = at;
  at = align_up(at + 2 * N * T * r.return_stride, 128);
  r.return_stage_offset = at;
  at = align_up(at + N * T * r.return_stride, 128);
  r.end = at;
  return r;
}
/// Bytes of the rail region's fixed part (what check_transports, which scribbles over the start of
/// the symmetric region, resets on every rank afterwards).
FLASHEP_HD int64_t rail_fixed_bytes(int num_nodes) { return make_rail_region(num_nodes, 1, 128, 0, false, 1).slots_offset; }

// ---- the forwarded tokens ------------------------------------------------------------------------

/// Where a token sits in what a forwarder received: tokens from source node a come after those of
/// the source nodes before it (`forwarded_prefix` [N], inclusive over source nodes), in the
/// source's token order (`index` among that source's tokens for this node).
FLASHEP_HD int forwarded_index(const int* forwarded_prefix, int src_node, int index) {
  return (src_node == 0 ? 0 : forwarded_prefix[src_node - 1]) + index;
}

/// A global expert id as the node-local NVLink stage sees it: the experts of `node`'s ranks are
/// numbered from 0 (local rank j holds [j * L, (j + 1) * L)); every other expert, and -1, is -1.
FLASHEP_HD int node_local_expert(int64_t expert, int node, int nvl_size, int num_local_experts) {
  const int64_t first = int64_t(node) * nvl_size * num_local_experts;
  const int64_t local = expert - first;
  return (expert >= 0 && local >= 0 && local < int64_t(nvl_size) * num_local_experts) ? static_cast<int>(local) : -1;
}

// ---- the row permutation -------------------------------------------------------------------------

/// What one receiver gets, by forwarder (its node's local rank i) and source node a:
/// `counts[i * N + a]` rows, all from global source rank a * M + i. The NVLink stage delivers them
/// by forwarder, then (the forwarded order) by source node, then by token; the contract wants
/// them by global source rank (a * M + i), then by token. These give both positions of the k-th
/// row of (i, a).
FLASHEP_HD int64_t composed_nvlink_row(const int* counts, const NodeShape& s, int forwarder, int src_node, int k) {
  const int N = s.num_nodes(), M = s.nvl_size;
  int64_t row = 0;
  for (int i = 0; i < M; ++i)
    for (int a = 0; a < N; ++a) {
      if (i == forwarder && a == src_node) return row + k;
      row += counts[i * N + a];
    }
  return row + k;  // not reached for valid (forwarder, src_node)
}
FLASHEP_HD int64_t composed_final_row(const int* counts, const NodeShape& s, int forwarder, int src_node, int k) {
  const int N = s.num_nodes(), M = s.nvl_size;
  int64_t row = 0;
  for (int a = 0; a < N; ++a)
    for (int i = 0; i < M; ++i) {
      if (i == forwarder && a == src_node) return row + k;
      row += counts[i * N + a];
    }
  return row + k;
}

}  // namespace flashep
