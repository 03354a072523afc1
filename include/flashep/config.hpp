// flashep: launch configuration of the high-throughput kernels and the buffer-size hints.
//
// Torch-free, header of the public contract. Implementation: src/core/config.cpp.
#pragma once

#include <cstddef>

namespace flashep {

/// Largest NVLink domain (ranks sharing buffers over CUDA IPC) the intranode kernels support.
inline constexpr int kMaxNvlRanks = 16;
/// Largest top-k the kernels support.
inline constexpr int kMaxTopk = 32;
/// Largest number of experts per rank (L = E / R).
inline constexpr int kMaxLocalExperts = 1024;
/// Largest number of channels (contiguous token ranges that travel independently).
inline constexpr int kMaxChannels = 1024;

/// Tuning of a high-throughput dispatch or combine. Field names and defaults are DeepEP V1's.
///
/// `num_sms` is the SM-control knob: the dispatch/combine kernels launch exactly `num_sms` blocks of
/// one SM each. Every block serves `channels_per_block(R)` channels (see num_channels()); a channel is a
/// contiguous range of a rank's tokens that flows through its own ring buffer to every peer.
/// `num_max_nvl_chunked_send_tokens` is how many tokens a sender writes before publishing its ring
/// tail; `num_max_nvl_chunked_recv_tokens` is the ring depth (slots per (channel, peer)).
/// The rdma fields are kept for API compatibility and used by the multi-node path.
struct Config {
  int num_sms = 20;
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 256;

  /// Bytes of NVLink buffer a dispatch/combine with this config needs for `num_ranks` ranks in one
  /// NVLink domain and rows of `hidden_bytes` (= H * max(element size, 2)). Multiple of 128.
  size_t get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const;
  /// Bytes of RDMA buffer; 0 when all `num_ranks` fit in one NVLink domain of `nvl_domain_size`.
  /// Multi-node: what the rail stage needs for 4096 tokens per rank (FLASHEP_INTERNODE_MAX_TOKENS'
  /// default) of BF16 rows and any top-k; fewer bytes lower the tokens a call may send.
  size_t get_rdma_buffer_size_hint(size_t hidden_bytes, int num_ranks, int nvl_domain_size = 8) const;
  /// Throws std::invalid_argument when a field is out of range (odd values allowed; see docs).
  void validate() const;
};

/// Channels per block for `num_nvl_ranks` peers (2 today): every channel has a sender warp that feeds
/// all peers and receiver warps that drain all peers, each pipelined with bulk copies.
int channels_per_block(int num_nvl_ranks);
/// Number of channels C of a dispatch/combine: num_sms * channels_per_block(num_nvl_ranks).
int num_channels(int num_sms, int num_nvl_ranks);

/// Tuned defaults (pure host heuristics; see src/core/config.cpp for the measurements behind them).
Config default_dispatch_config(int num_ranks, int num_sms);
Config default_combine_config(int num_ranks, int num_sms);

}  // namespace flashep
