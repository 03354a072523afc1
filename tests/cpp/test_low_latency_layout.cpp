// CPU tests of the low-latency region's arithmetic (src/core/low_latency_layout.hpp): the areas do
// not overlap and stay aligned, the signals and state sit where no (T, H, E) moves them, the signal
// encoding tells calls apart across the 32-bit wrap, the plan indexing is dense, and the public
// size hint rejects what the kernels cannot run.
#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

#include "check.hpp"
#include "core/low_latency_layout.hpp"
#include "flashep/errors.hpp"
#include "flashep/low_latency.hpp"

using namespace flashep;

namespace {

/// Every area [begin, end) of a layout, in address order, with the bytes it must hold.
std::vector<std::pair<int64_t, int64_t>> areas(const LowLatencyLayout& l) {
  const int64_t R = l.num_ranks;
  return {
      {0, l.signal(kLowLatencySignalKinds, 0, 0)},
      {l.state_offset, l.state_offset + int64_t(sizeof(LowLatencyState))},
      {l.msg_counter_offset, l.msg_counter_offset + 2 * R * 4},
      {l.expert_counter_offset, l.expert_counter_offset + 2 * int64_t(kMaxLowLatencyExperts) * 4},
      {l.mask_offset, l.mask_offset + R * 4},
      {l.credits_offset, l.credit(0, kLowLatencyWires, 0)},
      {l.counts_offset, l.counts(2, 0)},
      {l.dispatch_flags_offset, l.dispatch_flag(0, int(R), 0)},  // halves interleaved: the end is source R
      {l.combine_flags_offset, l.combine_flag(2, 0, 0)},
      {l.combine_slot_flags_offset, l.combine_slot_flag(2, 0, 0)},
      {l.weights_offset, l.weights(2, 0)},
      {l.dispatch_in_offset, l.dispatch_in(2, 0, 0)},
      {l.combine_in_offset, l.combine_in(2, 0, 0, true)},
      {l.combine_slot_in_offset, l.combine_slot_in(2, 0, 0, true)},
      {l.dispatch_stage_offset, l.dispatch_stage(2, 0)},
      {l.counts_stage_offset, l.counts_stage(2, 0)},
      {l.weights_stage_offset, l.weights_stage(2)},
      {l.combine_stage_offset, l.combine_stage(2, 0, 0, true)},
      {l.zero_copy_offset, l.zero_copy(2)},
  };
}

void test_areas_disjoint_and_aligned() {
  for (int R : {1, 2, 8, 64, 1024})
    for (int T : {1, 32, 128, 256, 4096})
      for (int H : {128, 2048, 7168, 8192})
        for (int E : {R, 2 * R, 288 / R * R}) {
          if (E < R || E > kMaxLowLatencyExperts || E % R != 0 || E / R > kMaxLocalExperts) continue;
          const LowLatencyLayout l = make_low_latency_layout(T, H, R, E);
          const auto a = areas(l);
          for (size_t i = 0; i < a.size(); ++i) {
            CHECK(a[i].first % 128 == 0);
            CHECK(a[i].second >= a[i].first);
            if (i + 1 < a.size()) CHECK(a[i].second <= a[i + 1].first);
          }
          CHECK(a.back().second <= l.end);
          CHECK(l.end % 128 == 0);
          CHECK_EQ(l.end, low_latency_region_bytes(T, H, R, E));
          // Messages and rows stay 16-byte aligned (the kernels move 16-byte words).
          CHECK(l.msg.stride % 128 == 0);
          CHECK(l.dispatch_in(1, R - 1, T - 1) % 16 == 0);
          CHECK(l.combine_in(1, R - 1, T - 1, true) % 16 == 0);
          CHECK(l.combine_in(1, R - 1, T - 1, false) % 16 == 0);
          CHECK(l.combine_in(1, R - 1, T - 1, false) + l.row_bytes_bf16() <= l.combine_in(2, 0, 0, true));
          // A half's last row, of either stride, ends before the next half's first row of either
          // stride (a LogFMT call and a BF16 call may be in flight in the two halves).
          for (bool a : {false, true})
            for (bool b : {false, true}) {
              CHECK(l.combine_in(0, R - 1, T - 1, a) + l.combine_stride(a) <= l.combine_in(1, 0, 0, b));
              CHECK(l.combine_slot_in(0, T - 1, kLowLatencyTopkSlots - 1, a) + l.combine_stride(a) <=
                    l.combine_slot_in(1, 0, 0, b));
            }
          CHECK(l.combine_slot_in(1, T - 1, kLowLatencyTopkSlots - 1, true) % 16 == 0);
          CHECK(l.combine_slot_in(1, T - 1, kLowLatencyTopkSlots - 1, false) % 16 == 0);
          CHECK(l.combine_stage(1, R - 1, T - 1, false) + l.row_bytes_bf16() <= l.combine_stage(2, 0, 0, true));
          CHECK(l.zero_copy(1) % 16 == 0);
        }
}

void test_fixed_part_does_not_move() {
  // Signals, state, mask and counts depend on R only: calls of other (T, H, E) never reinterpret them.
  static_assert(sizeof(LowLatencyState) <= kLowLatencyStateBytes, "the state header fits its bytes");
  for (int R : {1, 2, 8, 16}) {
    const LowLatencyLayout a = make_low_latency_layout(1, 128, R, R);
    const LowLatencyLayout b = make_low_latency_layout(256, 7168, R, 288 / R * R > 0 ? 288 / R * R : R);
    CHECK_EQ(a.state_offset, b.state_offset);
    CHECK_EQ(a.mask_offset, b.mask_offset);
    CHECK_EQ(a.counts_offset, b.counts_offset);
    CHECK_EQ(a.credit(R - 1, kWireCombineSlots, 1), b.credit(R - 1, kWireCombineSlots, 1));
    CHECK_EQ(a.credit(R - 1, kWireDispatch, 0) % 16, 0);  // a (source, wire)'s halves: one 16-byte load
    CHECK_EQ(a.credit(R - 1, kWireDispatch, 1), a.credit(R - 1, kWireDispatch, 0) + 8);
    // The layout id tells layouts apart (a change makes the send wait for every credit) and is never
    // 0 (the state's "none since the last clean").
    CHECK(a.layout_id != 0 && b.layout_id != 0 && a.layout_id != b.layout_id);
    CHECK_EQ(a.layout_id, make_low_latency_layout(1, 128, R, R).layout_id);
    CHECK_EQ(a.dispatch_flag(1, R - 1, 7), b.dispatch_flag(1, R - 1, 7));
    CHECK_EQ(a.combine_flag(1, R - 1, 7), b.combine_flag(1, R - 1, 7));
    CHECK_EQ(a.combine_slot_flag(1, 7, 3), b.combine_slot_flag(1, 7, 3));
    CHECK_EQ(a.weights_offset, b.weights_offset);
    CHECK_EQ(a.dispatch_total(1, R - 1), b.dispatch_total(1, R - 1));
    CHECK_EQ(a.combine_weights(1, R - 1), b.combine_weights(1, R - 1));
    CHECK_EQ(a.combine_flag(1, R - 1, 7), b.combine_flag(1, R - 1, 7));
    CHECK_EQ(ll_fixed_bytes(R), a.weights_offset);
    // The counts block holds the call hash and L counts for every E this R allows.
    CHECK(ll_count_words(R) >= kCountWordRows + std::min(kMaxLocalExperts, kMaxLowLatencyExperts / R));
  }
}

void test_dispatch_flag_pairs() {
  // A hook's receive loads both halves' flags of one (source, slot) with one 16-byte acquire.
  for (int R : {1, 2, 8}) {
    const LowLatencyLayout l = make_low_latency_layout(128, 7168, R, 288 / R * R);
    for (int src : {0, R - 1})
      for (int slot : {0, 1, 127, kMaxLowLatencyTokens - 1}) {
        CHECK_EQ(l.dispatch_flag(0, src, slot) % 16, 0);
        CHECK_EQ(l.dispatch_flag(1, src, slot), l.dispatch_flag(0, src, slot) + 8);
      }
  }
}

void test_messages() {
  for (int H : {128, 2048, 7168, 8192}) {
    const LowLatencyMessage f = make_ll_message(H, true), b = make_ll_message(H, false);
    CHECK_EQ(f.stride, b.stride);  // one stride for both dtypes
    CHECK_EQ(f.row_bytes, H);
    CHECK_EQ(b.row_bytes, 2 * H);
    CHECK(f.scale_offset >= f.row_bytes && f.meta_offset >= f.scale_offset + H / 128 * 4);
    CHECK(b.meta_offset >= b.row_bytes);
    CHECK(f.bytes <= f.stride && b.bytes <= b.stride);
    CHECK(f.bytes < b.bytes);  // FP8 sends fewer bytes
    CHECK(f.meta_offset % 16 == 0 && b.meta_offset % 16 == 0);
  }
}

void test_signals() {
  for (uint32_t seq : {0u, 1u, 2u, 0x7fffffffu, 0xfffffffeu, 0xffffffffu}) {
    for (int count : {0, 1, 255, 0x7fffffff}) {
      const uint64_t v = ll_signal(seq, count);
      CHECK(ll_signal_is(v, seq));
      CHECK_EQ(ll_signal_count(v), count);
      CHECK(!ll_signal_is(v, seq + 1));
      CHECK(!ll_signal_is(v, seq - 2));  // the same half, two calls apart
      CHECK(!ll_signal_is_ahead(v, seq));
      CHECK(ll_signal_is_ahead(v, seq - 2));  // a peer two calls ahead, across the wrap too
      CHECK(!ll_signal_is_ahead(v, seq + 2));
    }
    CHECK(!ll_signal_is(0, seq));  // a cleaned word is never a call's signal
    CHECK(!ll_signal_is_ahead(0, seq));
  }
}

void test_plan() {
  for (int R : {1, 2, 8})
    for (int T : {1, 128})
      for (int K : {1, 8}) {
        int64_t expected = R;
        for (int s = 0; s < R; ++s)
          for (int j = 0; j < T; ++j) {
            CHECK_EQ(ll_plan_entry(R, T, K, s, j), expected);
            expected += K + 1;
          }
        CHECK_EQ(ll_plan_ints(R, T, K), expected);
      }
}

void test_hint_and_blocks() {
  // DeepEP's test shape: no larger than DeepEP's 2147 MB.
  CHECK(low_latency_region_bytes_hint(128, 7168, 2, 288) < size_t(2147) * 1000 * 1000);
  CHECK(low_latency_region_bytes_hint(128, 7168, 8, 288) < size_t(2147) * 1000 * 1000);
  CHECK(low_latency_region_bytes_hint(256, 7168, 8, 288) > low_latency_region_bytes_hint(128, 7168, 8, 288));
  CHECK_THROWS(low_latency_region_bytes_hint(0, 7168, 2, 288), flashep::Error);
  CHECK_THROWS(low_latency_region_bytes_hint(128, 100, 2, 288), flashep::Error);
  CHECK_THROWS(low_latency_region_bytes_hint(128, 8192 + 128, 2, 288), flashep::Error);
  CHECK_THROWS(low_latency_region_bytes_hint(128, 7168, 2, 289), flashep::Error);
  CHECK_THROWS(low_latency_region_bytes_hint(128, 7168, 2, kMaxLowLatencyExperts + 2), flashep::Error);
  CHECK_THROWS(low_latency_region_bytes_hint(kMaxLowLatencyTokens + 1, 7168, 2, 288), flashep::Error);
  CHECK_EQ(low_latency_plan_ints(2, 128, 8), size_t(2 + 2 * 128 * 9));
  CHECK_EQ(ll_num_blocks(2, 128, 132), 132);
  CHECK_EQ(ll_num_blocks(2, 1, 132), 2);
  CHECK_EQ(ll_num_blocks(1, 0, 132), 1);
  // Call hashes tell the operations and shapes apart.
  CHECK(ll_call_hash(1, 128, 7168, 288, 8, 1) != ll_call_hash(2, 128, 7168, 288, 8, 0));
  CHECK(ll_call_hash(1, 128, 7168, 288, 8, 1) != ll_call_hash(1, 128, 7168, 288, 8, 0));
  CHECK(ll_call_hash(1, 128, 7168, 288, 8, 1) != ll_call_hash(1, 64, 7168, 288, 8, 1));
  CHECK(ll_call_hash(1, 128, 7168, 288, 8, 1) != 0);
}

/// The combine receive's split: every word of every token in exactly one (token, chunk) item,
/// chunks of whole warps (and so whole LogFMT groups), no more items than blocks when the tokens
/// are fewer, one chunk per token otherwise.
void test_receive_split() {
  for (int hidden = 128; hidden <= kMaxLowLatencyHidden; hidden += 128) {
    const int words = hidden / 8;
    for (int tokens : {0, 1, 2, 3, 5, 32, 127, 128, 131, 132, 256}) {
      for (int blocks : {1, 2, 7, 28, 64, 132}) {
        const LowLatencyReceiveSplit split = ll_combine_receive_split(tokens, blocks, words);
        CHECK(split.chunks >= 1);
        CHECK(split.chunk_words >= 1);
        CHECK(split.chunk_words == words || split.chunk_words % kLowLatencyMinChunkWords == 0);
        // Exactly covered: the last chunk is non-empty and ends at or past the row's end.
        CHECK(int64_t(split.chunks) * split.chunk_words >= words);
        CHECK(int64_t(split.chunks - 1) * split.chunk_words < words);
        if (tokens >= 1 && blocks > tokens) CHECK(int64_t(tokens) * split.chunks <= blocks);
        if (blocks <= tokens) CHECK_EQ(split.chunks, 1);
      }
    }
  }
  // DeepEP's hidden: one token over 28 blocks of 32 words; 128 tokens on 132 blocks stay whole.
  CHECK_EQ(ll_combine_receive_split(1, 132, 896).chunks, 28);
  CHECK_EQ(ll_combine_receive_split(1, 132, 896).chunk_words, 32);
  CHECK_EQ(ll_combine_receive_split(128, 132, 896).chunks, 1);
  CHECK_EQ(ll_combine_receive_split(32, 132, 896).chunks, 4);
  CHECK_EQ(ll_combine_receive_split(32, 132, 896).chunk_words, 224);
  // The hook's block count: one per item of the split the launch computes again from that count.
  for (int hidden = 128; hidden <= kMaxLowLatencyHidden; hidden += 128) {
    for (int tokens = 0; tokens <= 256; ++tokens) {
      for (bool shrink : {false, true}) {
        const int blocks = ll_combine_receive_blocks(tokens, hidden, 132, shrink);
        CHECK(blocks >= 1 && blocks <= 132);
        if (shrink) {
          CHECK_EQ(blocks, tokens < 1 ? 1 : (tokens > 132 ? 132 : tokens));
          continue;
        }
        const LowLatencyReceiveSplit split = ll_combine_receive_split(tokens, blocks, hidden / 8);
        if (tokens >= 1 && tokens < 132) CHECK_EQ(blocks, tokens * split.chunks);  // no block without an item
        if (tokens >= 132) CHECK_EQ(blocks, 132);
        const LowLatencyReceiveSplit on_sms = ll_combine_receive_split(tokens, 132, hidden / 8);
        CHECK_EQ(split.chunks, on_sms.chunks);  // the launch's split is the one the count was made for
        CHECK_EQ(split.chunk_words, on_sms.chunk_words);
        if (hidden / 8 <= kLowLatencyMinChunkWords) CHECK_EQ(split.chunks, 1);
      }
    }
  }
  // The item -> (token, chunk) mapping of the kernel (FastDivmod by the chunks).
  for (int chunks = 1; chunks <= 32; ++chunks) {
    const FastDivmod div = FastDivmod::of(chunks);
    CHECK_EQ(int(div.divisor), chunks);
    for (int item = 0; item < 132 * 8; ++item) CHECK_EQ(div.div(item), item / chunks);
  }
  CHECK_EQ(ll_combine_receive_blocks(1, 7168, 132, false), 28);
  CHECK_EQ(ll_combine_receive_blocks(5, 7168, 132, false), 70);  // 14 chunks of 64 words each
  CHECK_EQ(ll_combine_receive_blocks(1, 7168, 132, true), 1);
  CHECK_EQ(ll_combine_receive_blocks(128, 7168, 132, false), 128);
  CHECK_EQ(ll_combine_receive_blocks(0, 7168, 132, false), 1);
}

}  // namespace

int main() {
  test_areas_disjoint_and_aligned();
  test_fixed_part_does_not_move();
  test_dispatch_flag_pairs();
  test_messages();
  test_signals();
  test_plan();
  test_hint_and_blocks();
  test_receive_split();
  return check::summary("test_low_latency_layout");
}
