// CPU tests of the arithmetic the kernels share with the host: channel ranges, ring-slot and
// buffer layouts (NVLink allocation, control block, RDMA region), send_head encoding, wrap-safe
// counters, launch policy, configs and size hints, the call check and the error messages.
#include <set>
#include <stdexcept>

#include "check.hpp"
#include "core/device_error.hpp"
#include "core/call_check.hpp"
#include "core/counters.hpp"
#include "core/handle.hpp"
#include "core/launch_policy.hpp"
#include "core/layouts.hpp"
#include "flashep/buffer.hpp"
#include "flashep/config.hpp"

using namespace flashep;

static void test_channel_ranges() {
  for (int n : {0, 1, 5, 127, 128, 4096, 4097}) {
    for (int C : {1, 2, 3, 24, 96, 1024}) {
      int expected_begin = 0, min_size = 1 << 30, max_size = 0;
      for (int c = 0; c < C; ++c) {
        const TokenRange r = channel_token_range(n, C, c);
        CHECK_EQ(r.begin, expected_begin);  // contiguous cover, in order
        CHECK(r.end >= r.begin);
        min_size = std::min(min_size, r.end - r.begin);
        max_size = std::max(max_size, r.end - r.begin);
        expected_begin = r.end;
        for (int t = r.begin; t < r.end; ++t) CHECK_EQ(channel_of_token(n, C, t), c);
      }
      CHECK_EQ(expected_begin, n);
      CHECK(max_size - min_size <= 1);  // balanced
    }
  }
}

static void test_slot_layouts() {
  for (int hidden : {2048, 2560, 4096, 7168, 8192}) {
    for (int k : {0, 1, 6, 8, 32}) {
      const DispatchSlotLayout bf16 = make_dispatch_slot(hidden, 2, false, k);
      CHECK_EQ(bf16.row_bytes, hidden * 2);
      CHECK_EQ(bf16.num_scales, 0);
      CHECK_EQ(bf16.slot_bytes % kSlotAlignment, 0);
      CHECK(bf16.src_idx_offset + 4 <= bf16.slot_bytes);
      CHECK(bf16.topk_weights_offset >= bf16.topk_idx_offset + 8 * k);
      CHECK(bf16.topk_idx_offset % 8 == 0);
      const DispatchSlotLayout fp8 = make_dispatch_slot(hidden, 1, true, k);
      CHECK_EQ(fp8.num_scales, hidden / 128);
      CHECK_EQ(fp8.scale_offset % 16, 0);
      CHECK(fp8.topk_idx_offset >= fp8.scale_offset + 4 * fp8.num_scales && fp8.topk_idx_offset % 8 == 0);
      CHECK(fp8.slot_bytes < bf16.slot_bytes + kSlotAlignment + 4 * fp8.num_scales);
      CHECK_EQ(fp8.slot_bytes % kSlotAlignment, 0);
      const CombineSlotLayout combine = make_combine_slot(hidden, k);
      CHECK_EQ(combine.slot_bytes % kSlotAlignment, 0);
      CHECK(combine.topk_weights_offset + 4 * k <= combine.slot_bytes);
    }
  }
}

static void test_buffer_layout() {
  for (int R : {1, 2, 4, 8, 16}) {
    const int64_t capacity = 1 << 20;
    const NvlAllocationLayout a = make_nvl_allocation(R, capacity);
    const IntranodeLayout& l = a.intranode;
    const ControlLayout& c = a.control;
    // The intranode counters live after the user-visible ring region, in 128-byte aligned blocks.
    CHECK(l.notify_offset >= capacity);
    CHECK(l.notify_offset % 128 == 0 && l.tail_offset % 128 == 0 && l.head_offset % 128 == 0);
    CHECK(l.notify_slot(R - 1) + l.notify_slot_ints * 4 <= l.tail_offset);
    CHECK(l.tail(kMaxChannels - 1, R - 1) + 4 <= l.head_offset);
    CHECK(l.head(kMaxChannels - 1, R - 1) + 4 <= l.end);
    // The control block (every mode's) follows, its words disjoint and in order.
    CHECK(c.base >= l.end && c.base % 128 == 0);
    CHECK(c.abort_word() == c.base && c.error_claim() == c.base + 4 && c.barrier_epoch() == c.base + 8);
    CHECK(c.barrier_signal(0) >= c.barrier_epoch() + 4);
    CHECK(c.barrier_signal(kMaxNvlRanks - 1) + 4 <= c.call_info(0, 0));
    // Call infos: both parities of every rank; parity wraps with the epoch, also across 2^32.
    CHECK(c.call_info(1, 0) >= c.call_info(0, kMaxNvlRanks - 1) + kCallInfoInts * 4);
    CHECK(c.call_info(3, kMaxNvlRanks - 1) == c.call_info(1, kMaxNvlRanks - 1));
    CHECK(c.call_info(0xFFFFFFFFu, 2) == c.call_info(1, 2) && c.call_info(0u, 2) != c.call_info(0xFFFFFFFFu, 2));
    CHECK(c.call_info(1, kMaxNvlRanks - 1) + kCallInfoInts * 4 <= c.check_signal(0));
    CHECK(c.check_signal(0) % 8 == 0 && c.check_signal(kMaxNvlRanks - 1) + 8 <= c.end());
    CHECK(a.bytes >= c.end() && a.bytes % 128 == 0);
    // Rings tile the region without overlap.
    const int C = 24, depth = 8, slot = 14352;
    std::set<int64_t> starts;
    for (int ch = 0; ch < C; ++ch)
      for (int s = 0; s < R; ++s) starts.insert(l.ring(ch, s, depth, slot));
    CHECK_EQ(int(starts.size()), C * R);
    CHECK_EQ(*starts.rbegin() + int64_t(depth) * slot, int64_t(C) * R * depth * slot);
    CHECK(ring_region_bytes(R, C, depth, slot) >= int64_t(C) * R * depth * slot);
  }
  // The RDMA region: data first, then the header peers of other domains write through NVSHMEM.
  for (int64_t bytes : {int64_t(0), int64_t(1), int64_t(1) << 30}) {
    const RdmaLayout r = make_rdma_layout(bytes);
    CHECK(r.header_offset >= bytes && r.header_offset % 128 == 0);
    CHECK(r.abort_word() == r.header_offset && r.check_signal(0) >= r.abort_word() + 8);
    CHECK(r.check_signal(0) % 8 == 0 && r.check_signal(kMaxRanks - 1) + 8 <= r.bytes());
  }
}

static void test_wrap_safe_counters() {
  // Reached / not reached across the signed (2^31) and unsigned (2^32) wrap points.
  for (uint32_t base : {0u, 5u, 0x7FFFFFF0u, 0x7FFFFFFFu, 0xFFFFFFF0u, 0xFFFFFFFFu}) {
    for (uint32_t step : {0u, 1u, 2u, 100u, 0x10000u}) {
      const uint32_t later = base + step;
      CHECK(seq_reached(later, base));
      CHECK_EQ(seq_distance(later, base), int32_t(step));
      if (step > 0) CHECK(!seq_reached(base, later));
    }
  }
  // What the old signed `>=` got wrong: epoch 0x80000000 awaited, a peer still at 0x7FFFFFFF.
  CHECK(!seq_reached(0x7FFFFFFFu, 0x80000000u));
  CHECK(seq_reached(0x80000000u, 0x7FFFFFFFu));
  CHECK(seq_reached64(1ull << 63, (1ull << 63) - 1) && !seq_reached64((1ull << 63) - 1, 1ull << 63));
  CHECK(seq_reached64(0, ~0ull));
  // Expert counts rounded up in 64 bits: no overflow at the largest alignment.
  CHECK_EQ(aligned_count(0, 128), int64_t(0));
  CHECK_EQ(aligned_count(1, 128), int64_t(128));
  CHECK_EQ(aligned_count(INT32_MAX, kMaxExpertAlignment), (int64_t(INT32_MAX) / kMaxExpertAlignment + 1) * kMaxExpertAlignment);
  CHECK(aligned_count(INT32_MAX, INT32_MAX) == INT32_MAX);
  CHECK(aligned_count(INT32_MAX - 5, INT32_MAX) == INT32_MAX);
}

static void test_call_info_mismatch() {
  // A combine of 7168-wide rows with top-8 weights (top-k stored + 1, dtype as DType + 1).
  const CallInfo mine{static_cast<int>(CallOp::kCombine), 48, 32, 7168, 1, 9, 0};
  CallInfo theirs = mine;
  auto mismatch = [&] {
    return call_info_mismatch(reinterpret_cast<const int*>(&mine), reinterpret_cast<const int*>(&theirs));
  };
  CHECK_EQ(int(sizeof(CallInfo)), kCallInfoInts * 4);
  CHECK_EQ(mismatch(), -1);
  theirs.op = static_cast<int>(CallOp::kDispatch);
  CHECK_EQ(mismatch(), 0);
  theirs = mine;
  theirs.num_channels = 24;
  CHECK_EQ(mismatch(), 1);
  theirs = mine;
  theirs.ring_depth = 64;
  CHECK_EQ(mismatch(), 2);
  theirs = mine;
  theirs.hidden = 7176;  // same 128-byte-padded slot as 7168: the field itself is compared
  CHECK_EQ(mismatch(), 3);
  theirs = mine;
  theirs.dtype = 2;
  CHECK_EQ(mismatch(), 4);
  theirs = mine;
  theirs.num_topk = 1;  // no weights on that rank
  CHECK_EQ(mismatch(), 5);
  theirs = mine;
  theirs.hidden = theirs.dtype = theirs.num_topk = 0;  // shape not known on one side: not compared
  CHECK_EQ(mismatch(), -1);
  theirs.num_experts = 256;  // known on one side only
  CHECK_EQ(mismatch(), -1);
}

static void test_kernel_instances() {
  // Whatever the debug knob asks for, the chosen instantiation handles the domain and its launch
  // bound admits the block (a block over the bound would not launch).
  for (int R = 1; R <= kMaxNvlRanks; ++R) {
    const int G = block_channel_count(R);
    CHECK_EQ(kernel_instance(R, 0, dispatch_block_threads(G, R), dispatch_launch_bound), kernel_instance_for(R));
    for (int requested : {0, 2, 4, 8, 16}) {
      const int d = kernel_instance(R, requested, dispatch_block_threads(G, R), dispatch_launch_bound);
      CHECK(d >= R && d >= kernel_instance_for(R));
      CHECK(dispatch_block_threads(G, R) <= dispatch_launch_bound(d));
      const int threads = combine_block_threads(G, R);
      const int c = kernel_instance(R, requested, threads, combine_launch_bound);
      CHECK(c >= R);
      CHECK(threads <= combine_launch_bound(c));
      CHECK(threads <= 1024);
    }
  }
  // The case a review caught: 16-rank kernels on 8 ranks fall back to the 8-rank ones.
  CHECK_EQ(kernel_instance(8, 16, dispatch_block_threads(2, 8), dispatch_launch_bound), 8);
  CHECK_EQ(kernel_instance(4, 16, dispatch_block_threads(2, 4), dispatch_launch_bound), 16);
}

static void test_send_head_encoding() {
  for (int before : {0, 1, 5, 1000}) {
    CHECK_EQ(slots_before(encode_send_head(true, before)), before);
    CHECK_EQ(slots_before(encode_send_head(false, before)), before);
    CHECK(encode_send_head(true, before) >= 0);
    CHECK(encode_send_head(false, before) < 0);
  }
  CHECK_EQ(local_expert_index(17, 2, 8), 1);
  CHECK_EQ(local_expert_index(15, 2, 8), -1);
  CHECK_EQ(local_expert_index(-1, 0, 8), -1);
  CHECK_EQ(local_expert_index(24, 2, 8), -1);
}

static void test_bulk_stages() {
  // Every supported row fits at least one stage per dispatch sender, and blocks stay within the
  // 227 KB of shared memory H100/H200 allow.
  constexpr int kMaxBlockSmem = 227 * 1024;
  for (int hidden : {128, 2048, 4096, 7168, 8192, 16384}) {
    for (int topk : {0, 1, 8, kMaxTopk}) {
      for (bool fp8 : {false, true}) {
        const DispatchSlotLayout d = make_dispatch_slot(hidden, fp8 ? 1 : 2, fp8, topk);
        const int ds = dispatch_stages(kMaxChannelsPerBlock, d.slot_bytes);
        CHECK(ds >= 1 && ds <= kMaxBulkStages);
        CHECK(dispatch_smem_bytes(kMaxChannelsPerBlock, ds, d.slot_bytes) <= kMaxBlockSmem);
      }
    }
  }
  // The DeepEP workload: 7 BF16 stages, 8 FP8 stages per dispatch sender.
  CHECK_EQ(dispatch_stages(2, make_dispatch_slot(7168, 2, false, 8).slot_bytes), 7);
  CHECK_EQ(dispatch_stages(2, make_dispatch_slot(7168, 1, true, 8).slot_bytes), 8);
  // Stages never exceed the cap for tiny rows.
  CHECK_EQ(bulk_stages(4, 128), kMaxBulkStages);
}

static void test_config() {
  Config config;  // DeepEP's defaults
  CHECK_EQ(config.num_sms, 20);
  CHECK_EQ(config.num_max_nvl_chunked_send_tokens, 6);
  CHECK_EQ(config.num_max_nvl_chunked_recv_tokens, 256);
  for (int R : {1, 2, 4, 8}) CHECK_EQ(channels_per_block(R), kMaxChannelsPerBlock);
  CHECK_EQ(channels_per_block(16), 1);
  CHECK(dispatch_block_threads(channels_per_block(16), 16) <= 1024);
  CHECK(dispatch_block_threads(channels_per_block(8), 8) <= 1024);
  for (int R : {2, 4, 8, 16}) CHECK(combine_block_threads(channels_per_block(R), R) <= 1024);
  CHECK_EQ(num_channels(24, 8), 48);
  CHECK_EQ(num_channels(24, 2), 48);
  for (int R : {2, 4, 8}) {
    for (int sms : {2, 8, 24, 32}) {
      const Config c = default_dispatch_config(R, sms);
      CHECK_EQ(c.num_sms, sms);
      const size_t hint = c.get_nvl_buffer_size_hint(7168 * 2, R);
      CHECK_EQ(hint % 128, size_t(0));
      // Enough for the largest slot of any dispatch/combine of that hidden size.
      const int biggest = std::max(make_dispatch_slot(7168, 2, false, kMaxTopk).slot_bytes,
                                   make_combine_slot(7168, kMaxTopk).slot_bytes);
      CHECK(int64_t(hint) >= ring_region_bytes(R, num_channels(sms, R), c.num_max_nvl_chunked_recv_tokens, biggest));
      CHECK_EQ(c.get_rdma_buffer_size_hint(7168 * 2, R, 8), size_t(0));
      CHECK(c.get_rdma_buffer_size_hint(7168 * 2, 16, 8) > 0);
    }
  }
  CHECK_THROWS((Config{0, 6, 256, 6, 256}.validate()), std::invalid_argument);
  CHECK_THROWS((Config{20, 8, 4, 6, 256}.validate()), std::invalid_argument);
  CHECK_THROWS((Config{20, 0, 4, 6, 256}.validate()), std::invalid_argument);
}

static void test_error_messages() {
  DeviceErrorRecord r{};
  r.seq = 2;
  r.rank = 3;
  r.phase = static_cast<int>(Phase::kNotifyBarrier);
  r.peer = 5;
  r.channel = -1;
  r.expected = 7;
  r.observed = 6;
  const std::string message = describe(r, 10.0);
  CHECK(message.find("rank 3") != std::string::npos);
  CHECK(message.find("notify_dispatch") != std::string::npos);
  CHECK(message.find("timed out") != std::string::npos);
  CHECK(message.find("rank 5") != std::string::npos);
  r.phase = static_cast<int>(Phase::kLayoutInvalidExpert);
  r.peer = 256;
  r.expected = 12;
  r.observed = 300;
  CHECK(describe(r, 10.0).find("expert id 300") != std::string::npos);
  // A sender's own row load: names the channel, and does not blame a peer.
  r.phase = static_cast<int>(Phase::kSendWaitRowLoad);
  r.peer = -1;
  r.channel = 9;
  const std::string load_message = describe(r, 10.0);
  CHECK(load_message.find("channel 9") != std::string::npos);
  CHECK(load_message.find("waiting for a row to load") != std::string::npos);
  CHECK(load_message.find("peer") == std::string::npos);
  // Ranks that disagree on a call: names the field, both values and the other rank.
  r.phase = static_cast<int>(Phase::kCallMismatch);
  r.peer = 1;
  r.channel = 3;
  r.expected = 7168;
  r.observed = 4096;
  const std::string mismatch_message = describe(r, 10.0);
  CHECK(mismatch_message.find("disagree") != std::string::npos);
  CHECK(mismatch_message.find("hidden size is 7168 here and 4096 on rank 1") != std::string::npos);
  CHECK(mismatch_message.find("timed out") == std::string::npos);
  r.channel = 5;  // top-k, stored + 1
  r.expected = 9;
  r.observed = 1;
  CHECK(describe(r, 10.0).find("top-k width is 8 here and 0 on rank 1") != std::string::npos);
  r.channel = 0;
  r.expected = 3;
  r.observed = 2;
  CHECK(describe(r, 10.0).find("operation is combine here and cached dispatch on rank 1") != std::string::npos);
  // A combine handle that points past x.
  r.phase = static_cast<int>(Phase::kCombineBadHandle);
  r.channel = 2;
  r.expected = 100;
  r.observed = 412;
  const std::string handle_message = describe(r, 10.0);
  CHECK(handle_message.find("rows up to 412 of x to rank 1 on channel 2, but x has 100 rows") != std::string::npos);
  CHECK(handle_message.find("timed out") == std::string::npos);
  CHECK(kind_of(r) == ErrorKind::kDeviceFault);
  // A cached dispatch handle with negative or decreasing prefix entries.
  r.phase = static_cast<int>(Phase::kDispatchBadHandle);
  r.expected = 100;
  r.observed = -7;
  r.block = 3;
  const std::string dispatch_handle_message = describe(r, 10.0);
  CHECK(dispatch_handle_message.find("decode to [-7, +3) but the output has 100 rows") != std::string::npos);
  CHECK(dispatch_handle_message.find("Nothing was written") != std::string::npos);
  // Counts that disagree with the routing name the rank/expert and both counts.
  r.phase = static_cast<int>(Phase::kNotifyBadRankCount);
  r.peer = 1;
  r.expected = 40;
  r.observed = 41;
  CHECK(describe(r, 10.0).find("num_tokens_per_rank[1] is 41 but is_token_in_rank routes 40 tokens to rank 1") !=
        std::string::npos);
  CHECK(kind_of(r) == ErrorKind::kDeviceFault);
  r.phase = static_cast<int>(Phase::kNotifyBadExpertCount);
  r.channel = 17;
  r.expected = 5;
  r.observed = 4;
  CHECK(describe(r, 10.0).find("num_tokens_per_expert[17] is 4 but topk_idx names expert 17 5 times") !=
        std::string::npos);
  r.phase = static_cast<int>(Phase::kDispatchInvalidExpert);
  r.peer = 64;
  r.expected = 9;
  r.observed = 64;
  CHECK(describe(r, 10.0).find("token 9 has expert id 64 (num_experts 64)") != std::string::npos);
  // A rank that stopped because a peer aborted names the peer and points at its error.
  r.phase = static_cast<int>(Phase::kDispatchRecvWaitData);
  r.cause = static_cast<int>(Cause::kPeerAbort);
  r.peer = 0;
  const std::string abort_message = describe(r, 10.0);
  CHECK(abort_message.find("rank 3: stopped in dispatch receive") != std::string::npos);
  CHECK(abort_message.find("because rank 0 failed") != std::string::npos);
  CHECK(kind_of(r) == ErrorKind::kPeerFailed);
  r.cause = static_cast<int>(Cause::kOwn);
  CHECK(kind_of(r) == ErrorKind::kTimeout);
  r.phase = static_cast<int>(Phase::kCallMismatch);
  CHECK(kind_of(r) == ErrorKind::kPeerMismatch);
  CHECK(std::string(error_kind_name(ErrorKind::kPoisoned)) == "poisoned");
}

int main() {
  test_channel_ranges();
  test_slot_layouts();
  test_buffer_layout();
  test_wrap_safe_counters();
  test_send_head_encoding();
  test_call_info_mismatch();
  test_kernel_instances();
  test_bulk_stages();
  test_config();
  test_error_messages();
  return check::summary("test_layouts");
}
