// Config validation, buffer-size hints and tuned defaults: pure host functions.
#include "flashep/config.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "core/internode_compose.hpp"
#include "core/launch_policy.hpp"
#include "core/layouts.hpp"

namespace flashep {

int channels_per_block(int num_nvl_ranks) { return block_channel_count(num_nvl_ranks); }

int num_channels(int num_sms, int num_nvl_ranks) { return num_sms * block_channel_count(num_nvl_ranks); }

namespace {
/// Largest ring slot any dispatch or combine with rows of `hidden_bytes` may use: a BF16 row
/// (hidden_bytes) or an FP8 row with its scales, plus kMaxTopk indices and weights.
int max_slot_bytes(size_t hidden_bytes) {
  const int hidden = static_cast<int>(hidden_bytes / 2);
  const int bf16 = make_dispatch_slot(hidden, 2, false, kMaxTopk).slot_bytes;
  const int fp8 = make_dispatch_slot(hidden, 1, true, kMaxTopk).slot_bytes;
  const int combine = make_combine_slot(hidden, kMaxTopk).slot_bytes;
  return std::max({bf16, fp8, combine});
}
}  // namespace

size_t Config::get_nvl_buffer_size_hint(size_t hidden_bytes, int num_ranks) const {
  validate();
  if (num_ranks < 1)
    throw std::invalid_argument("get_nvl_buffer_size_hint: num_ranks must be >= 1, got " + std::to_string(num_ranks));
  // DeepEP's callers pass the group size; beyond one NVLink domain the rings serve the default
  // domain of 8 ranks (a multi-node group).
  if (num_ranks > kMaxNvlRanks) num_ranks = 8;
  return static_cast<size_t>(ring_region_bytes(num_ranks, num_channels(num_sms, num_ranks),
                                               num_max_nvl_chunked_recv_tokens, max_slot_bytes(hidden_bytes)));
}

size_t Config::get_rdma_buffer_size_hint(size_t hidden_bytes, int num_ranks, int nvl_domain_size) const {
  validate();
  if (nvl_domain_size <= 0 || num_ranks <= nvl_domain_size) return 0;
  // The multi-node path's rail stage (docs/design.md, "Multi-node: the first version"): its inbox,
  // stages and return area for kDefaultInternodeMaxTokens tokens per rank (FLASHEP_INTERNODE_MAX_TOKENS'
  // default) of hidden_bytes (as BF16 rows: the larger dtype) and the largest top-k.
  if (num_ranks % nvl_domain_size != 0) return 0;
  const int hidden = static_cast<int>(align_up(int64_t(hidden_bytes), 256) / 2);
  return static_cast<size_t>(
      make_rail_region(num_ranks / nvl_domain_size, kDefaultInternodeMaxTokens, hidden, kMaxTopk, false, num_ranks).end);
}

void Config::validate() const {
  auto fail = [](const std::string& what) { throw std::invalid_argument("flashep::Config: " + what); };
  if (num_sms < 1 || num_sms > 1024) fail("num_sms must be in [1, 1024], got " + std::to_string(num_sms));
  if (num_max_nvl_chunked_send_tokens < 1) fail("num_max_nvl_chunked_send_tokens must be >= 1");
  if (num_max_nvl_chunked_recv_tokens < num_max_nvl_chunked_send_tokens)
    fail("num_max_nvl_chunked_recv_tokens (" + std::to_string(num_max_nvl_chunked_recv_tokens) +
         ") must be >= num_max_nvl_chunked_send_tokens (" + std::to_string(num_max_nvl_chunked_send_tokens) + ")");
  if (num_max_rdma_chunked_send_tokens < 1) fail("num_max_rdma_chunked_send_tokens must be >= 1");
  if (num_max_rdma_chunked_recv_tokens < num_max_rdma_chunked_send_tokens)
    fail("num_max_rdma_chunked_recv_tokens must be >= num_max_rdma_chunked_send_tokens");
}

// Defaults measured on 4 x H200 (docs/performance.md, 2026-11-22, DeepEP workload, stream timing).
// Ring depth 32 slots (64 lets the ring region outgrow L2 and was slower). Send chunk 8 (a sender
// publishes its ring tail every 8 slots, each publication a system-scope release): against 4,
// FP8 dispatch 313 -> 352 GB/s at 24 SMs and 184 -> 218 at 12, combine 352 -> 357 and 255 -> 267,
// BF16 dispatch 365 -> 354 and 267 -> 270. 16 helps FP8 a little more but costs BF16 10% at 24.
Config default_dispatch_config(int /*num_ranks*/, int num_sms) {
  return Config{num_sms, 8, 32, 6, 256};
}

Config default_combine_config(int /*num_ranks*/, int num_sms) {
  return Config{num_sms, 8, 32, 6, 256};
}

}  // namespace flashep
