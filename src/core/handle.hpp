// Decoding the intranode dispatch handle (DeepEP V1's tuple: rank_prefix_matrix [R, R],
// channel_prefix_matrix [R, C], recv_channel_prefix_matrix [R, C], recv_src_idx, is_token_in_rank,
// send_head [n, R]) into the rows and ring slots the kernels touch. Host+device functions: the
// kernels decode with exactly what the CPU tests check against the oracle.
//
//   rank_prefix_matrix[i][j]          tokens sent by ranks 0..i to rank j (inclusive prefix)
//   channel_prefix_matrix[d][c]       tokens of this rank's channels 0..c sent to rank d (inclusive)
//   recv_channel_prefix_matrix[s][c]  tokens of source s's channels 0..c received here (inclusive)
//   send_head[t][r]                   ring slot of token t in its channel's ring to r, or
//                                     -(slots used before t) - 1 when t was not sent to r
#pragma once

#include <cstdint>

#include "core/hd.hpp"

namespace flashep {

/// A run of rows [begin, begin + count) of a tensor.
struct RowRange {
  int64_t begin;
  int64_t count;
};

/// Entry `index - 1` of an inclusive prefix row, 0 for index 0.
FLASHEP_HD int64_t prefix_before(const int* prefix_row, int index) { return index > 0 ? prefix_row[index - 1] : 0; }

/// Rows of the dispatch output on `rank` that came from source `src` through `channel` (the same
/// rows combine sends back to `src` from that channel).
FLASHEP_HD RowRange received_rows(const int* rank_prefix_matrix, const int* recv_channel_prefix_matrix, int num_ranks,
                                  int num_channels, int rank, int src, int channel) {
  const int* channel_prefix = recv_channel_prefix_matrix + int64_t(src) * num_channels;
  const int64_t channel_begin = prefix_before(channel_prefix, channel);
  const int64_t source_begin = src > 0 ? rank_prefix_matrix[int64_t(src - 1) * num_ranks + rank] : 0;
  return RowRange{source_begin + channel_begin, channel_prefix[channel] - channel_begin};
}

/// Tokens of this rank's `channel` that went to `dst` (slots of ring (channel, this rank) at dst).
FLASHEP_HD int64_t sent_count(const int* channel_prefix_matrix, int num_channels, int dst, int channel) {
  const int* prefix = channel_prefix_matrix + int64_t(dst) * num_channels;
  return prefix[channel] - prefix_before(prefix, channel);
}

/// Whether a decoded range lies inside a tensor of `num_rows` rows. A handle with negative or
/// decreasing prefix entries (another dispatch's, or modified) decodes to a negative begin or count.
FLASHEP_HD bool rows_inside(RowRange rows, int64_t num_rows) {
  return rows.begin >= 0 && rows.count >= 0 && rows.begin + rows.count <= num_rows;
}

/// send_head encoding: either way slots_before() gives how many of the channel's tokens before t
/// went to r, which is what a combine receiver needs to release ring space in order.
FLASHEP_HD int encode_send_head(bool sent, int slots_before) { return sent ? slots_before : -slots_before - 1; }
FLASHEP_HD int slots_before(int send_head) { return send_head >= 0 ? send_head : -send_head - 1; }
FLASHEP_HD bool was_sent(int send_head) { return send_head >= 0; }

}  // namespace flashep
