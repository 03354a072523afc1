// Tests of the low-latency oracle (src/oracle/low_latency_oracle.hpp): the e4m3 encoding against an
// independent nearest-value search over all 256 codes, the scale rules (round_scale, UE8M0), the
// cast of whole rows, the routing with masked slots and masked ranks, and the weighted combine.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "oracle/low_latency_oracle.hpp"
#include "oracle/oracle.hpp"

using namespace flashep::oracle;
using namespace flashep::oracle::low_latency;

namespace {

/// Independent e4m3 reference: the finite code nearest to v, ties to the even code (even mantissa),
/// saturating at +-448.
uint8_t nearest_e4m3(float v) {
  if (std::isnan(v)) return 0x7f;
  const double m = std::fabs(static_cast<double>(v));
  int best = 0;
  double best_distance = std::numeric_limits<double>::infinity();
  for (int code = 0; code < 0x7f; ++code) {  // positive finite codes 0x00..0x7e
    const double distance = std::fabs(static_cast<double>(e4m3_to_float(static_cast<uint8_t>(code))) - m);
    if (distance < best_distance || (distance == best_distance && (code & 1) == 0)) {
      best = code;
      best_distance = distance;
    }
  }
  return static_cast<uint8_t>(best | (std::signbit(v) ? 0x80 : 0));
}

void test_e4m3() {
  // Every finite code round-trips; NaN codes decode to NaN.
  for (int code = 0; code < 256; ++code) {
    const float value = e4m3_to_float(static_cast<uint8_t>(code));
    if ((code & 0x7f) == 0x7f) {
      CHECK(std::isnan(value));
      continue;
    }
    CHECK_EQ(int(float_to_e4m3(value)), code == 0x80 ? 0x80 : code);
  }
  CHECK_EQ(e4m3_to_float(0x7e), 448.0f);
  CHECK_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  // Midpoints between neighbours, and random values, against the nearest-value search.
  for (int code = 0; code < 0x7e; ++code) {
    const float low = e4m3_to_float(static_cast<uint8_t>(code)), high = e4m3_to_float(static_cast<uint8_t>(code + 1));
    const float mid = static_cast<float>((static_cast<double>(low) + high) / 2);
    CHECK_EQ(int(float_to_e4m3(mid)), int(nearest_e4m3(mid)));
    CHECK_EQ(int(float_to_e4m3(-mid)), int(nearest_e4m3(-mid)));
    CHECK_EQ(int(float_to_e4m3(std::nextafter(mid, 0.0f))), int(nearest_e4m3(std::nextafter(mid, 0.0f))));
    CHECK_EQ(int(float_to_e4m3(std::nextafter(mid, 1e9f))), int(nearest_e4m3(std::nextafter(mid, 1e9f))));
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> exponent(-14.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) {
    const float v = std::exp2(exponent(rng)) * ((rng() & 1) ? -1.0f : 1.0f);
    CHECK_EQ(int(float_to_e4m3(v)), int(nearest_e4m3(v)));
  }
  // Saturation, zeros, NaN.
  CHECK_EQ(int(float_to_e4m3(1e9f)), 0x7e);
  CHECK_EQ(int(float_to_e4m3(-1e9f)), 0xfe);
  CHECK_EQ(int(float_to_e4m3(std::numeric_limits<float>::infinity())), 0x7e);
  CHECK_EQ(int(float_to_e4m3(464.0f)), 0x7e);
  CHECK_EQ(int(float_to_e4m3(0.0f)), 0x00);
  CHECK_EQ(int(float_to_e4m3(-0.0f)), 0x80);
  CHECK_EQ(int(float_to_e4m3(std::nanf(""))), 0x7f);
}

void test_scales() {
  // amax / 448 as float32; round_scale gives the smallest power of two >= it.
  CHECK_EQ(scale_inv_of(448.0f, false), 1.0f);
  CHECK_EQ(scale_inv_of(448.0f, true), 1.0f);
  CHECK_EQ(scale_inv_of(449.0f, true), 2.0f);
  CHECK_EQ(scale_inv_of(224.0f, true), 0.5f);
  CHECK_EQ(scale_inv_of(300.0f, true), 1.0f);
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> amax(1e-4f, 1e4f);
  for (int i = 0; i < 10000; ++i) {
    const float a = amax(rng);
    const float s = scale_inv_of(a, false), p = scale_inv_of(a, true);
    CHECK_EQ(s, a / 448.0f);
    CHECK((std::bit_cast<uint32_t>(p) & 0x7fffff) == 0);  // a power of two
    CHECK(p >= s && p / 2 < s);
    CHECK_EQ(std::ldexp(1.0f, int(ue8m0_of(p)) - 127), p);
  }
}

std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t count, float spread) {
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<uint16_t> out(count);
  for (auto& v : out) v = float_to_bf16(normal(rng));
  return out;
}

void test_cast_rows() {
  std::mt19937 rng(11);
  const int n = 5, H = 1024;
  std::vector<uint16_t> x = random_bf16(rng, size_t(n) * H, 3.0f);
  // A group of zeros (amax floor), a group with a huge value, a group of one sign.
  for (int j = 0; j < 128; ++j) x[128 + j] = float_to_bf16(0.0f);
  x[2 * 128 + 5] = float_to_bf16(30000.0f);
  for (bool round_scale : {false, true}) {
    for (bool ue8m0 : {false, true}) {
      if (ue8m0 && !round_scale) {
        CHECK_THROWS(cast_fp8(x.data(), n, H, round_scale, ue8m0), std::invalid_argument);
        continue;
      }
      const Fp8Rows rows = cast_fp8(x.data(), n, H, round_scale, ue8m0);
      CHECK_EQ(rows.data.size(), size_t(n) * H);
      for (int t = 0; t < n; ++t) {
        for (int g = 0; g < H / 128; ++g) {
          float amax = 0;
          for (int j = 0; j < 128; ++j) amax = std::fmax(amax, std::fabs(bf16_to_float(x[size_t(t) * H + g * 128 + j])));
          const float scale = scale_inv_of(std::fmax(amax, 1e-4f), round_scale);
          if (ue8m0) {
            const uint32_t word = static_cast<uint32_t>(rows.packed_scales[size_t(t) * (H / 512) + g / 4]);
            CHECK_EQ(int((word >> (8 * (g % 4))) & 0xff), int(ue8m0_of(scale)));
          } else {
            CHECK_EQ(rows.scales[size_t(t) * (H / 128) + g], scale);
          }
          for (int j = 0; j < 128; ++j) {
            const size_t i = size_t(t) * H + g * 128 + j;
            CHECK_EQ(int(rows.data[i]), int(nearest_e4m3(bf16_to_float(x[i]) / scale)));
            // Dequantized values stay within half an e4m3 step (relative 1/16) of the input.
            const float back = e4m3_to_float(rows.data[i]) * scale, in = bf16_to_float(x[i]);
            CHECK(std::fabs(back - in) <= std::fabs(in) / 16 + scale * std::ldexp(1.0f, -10));
          }
        }
      }
      CHECK_EQ(int(rows.data[128]), 0);  // the zero group: 0 / (1e-4 / 448) is 0
    }
  }
  CHECK_THROWS(cast_fp8(x.data(), 1, 100, false, false), std::invalid_argument);
  CHECK_THROWS(cast_fp8(x.data(), 1, 384, true, true), std::invalid_argument);
}

void test_routing() {
  // 3 ranks, 6 experts (L = 2): rank r's experts are 2r, 2r + 1.
  // K = 2: rank 0 t0 {0, 3}, t1 {-1, 5}, t2 {1, 1}; rank 1 t0 {2, -1}, t1 {4, 0}; rank 2 no tokens.
  const std::vector<std::vector<int64_t>> topk = {{0, 3, -1, 5, 1, 1}, {2, -1, 4, 0}, {}};
  const std::vector<int> n = {3, 2, 0};
  const auto out = dispatch_routing(topk, n, 2, 3, 6, 4, {});
  CHECK_EQ(out[0].recv_count, (std::vector<int>{2, 2}));  // expert 0: r0 t0, r1 t1; expert 1: r0 t2 twice
  CHECK_EQ(out[0].rows[0][0], (std::vector<int>{0}));
  CHECK_EQ(out[0].rows[0][1], (std::vector<int>{1}));
  CHECK_EQ(out[0].rows[1][0], (std::vector<int>{2, 2}));
  CHECK_EQ(out[1].recv_count, (std::vector<int>{1, 1}));  // expert 2: r1 t0; expert 3: r0 t0
  CHECK_EQ(out[2].recv_count, (std::vector<int>{1, 1}));  // expert 4: r1 t1; expert 5: r0 t1
  // Masking rank 1: nothing to or from it.
  const auto masked = dispatch_routing(topk, n, 2, 3, 6, 4, {0, 1, 0});
  CHECK_EQ(masked[0].recv_count, (std::vector<int>{1, 2}));
  CHECK_EQ(masked[1].recv_count, (std::vector<int>{0, 0}));
  CHECK_EQ(masked[2].recv_count, (std::vector<int>{0, 1}));
  // Bad input.
  CHECK_THROWS(dispatch_routing({{6, 0}, {}, {}}, {1, 0, 0}, 2, 3, 6, 4, {}), std::invalid_argument);
  CHECK_THROWS(dispatch_routing({{0, 0}, {}, {}}, {5, 0, 0}, 2, 3, 6, 4, {}), std::invalid_argument);
  CHECK_THROWS(dispatch_routing({{}, {}, {}}, {0, 0, 0}, 2, 3, 7, 4, {}), std::invalid_argument);
  // Random worlds: every delivered pair counted once, segments sorted.
  std::mt19937 rng(3);
  for (int round = 0; round < 50; ++round) {
    const int R = 1 + rng() % 8, L = 1 + rng() % 5, E = R * L, K = 1 + rng() % 8, T = 16;
    std::vector<std::vector<int64_t>> idx(R);
    std::vector<int> tokens(R);
    std::vector<uint8_t> mask(R, 0);
    if (R > 1 && rng() % 3 == 0) mask[rng() % R] = 1;
    int64_t expected = 0;
    for (int r = 0; r < R; ++r) {
      tokens[r] = rng() % (T + 1);
      for (int i = 0; i < tokens[r] * K; ++i) {
        const int64_t e = (rng() % 5 == 0) ? -1 : int64_t(rng() % E);
        idx[r].push_back(e);
        expected += e >= 0 && !mask[r] && !mask[e / L];
      }
    }
    const auto world = dispatch_routing(idx, tokens, K, R, E, T, mask);
    int64_t delivered = 0;
    for (int d = 0; d < R; ++d) {
      for (int l = 0; l < L; ++l) {
        int64_t segments = 0;
        for (int s = 0; s < R; ++s) {
          const auto& rows = world[d].rows[l][s];
          for (size_t i = 1; i < rows.size(); ++i) CHECK(rows[i - 1] <= rows[i]);
          segments += rows.size();
        }
        CHECK_EQ(segments, int64_t(world[d].recv_count[l]));
        delivered += world[d].recv_count[l];
      }
    }
    CHECK_EQ(delivered, expected);
  }
}

void test_combine() {
  // One token, K = 3, H = 2: 0.5 * y0 + (masked / -1 slots skipped) + 2 * y2.
  const int64_t idx[3] = {1, -1, 4};
  const float w[3] = {0.5f, 9.0f, 2.0f};
  const std::vector<uint16_t> y = {float_to_bf16(2.0f), float_to_bf16(-4.0f), float_to_bf16(7.0f),
                                   float_to_bf16(7.0f), float_to_bf16(1.0f),  float_to_bf16(0.25f)};
  const auto out = combine(idx, w, y.data(), 1, 3, 2, 3, 6, {});
  CHECK_EQ(bf16_to_float(out[0]), 3.0f);   // 0.5 * 2 + 2 * 1
  CHECK_EQ(bf16_to_float(out[1]), -1.5f);  // 0.5 * -4 + 2 * 0.25
  const auto masked = combine(idx, w, y.data(), 1, 3, 2, 3, 6, {0, 0, 1});  // expert 4 lives on rank 2
  CHECK_EQ(bf16_to_float(masked[0]), 1.0f);
  CHECK_EQ(bf16_to_float(masked[1]), -2.0f);
  // calc_diff: 0 for equal inputs, small for close ones, large for unrelated ones.
  const float a[4] = {1, 2, 3, 4}, b[4] = {1, 2, 3, 4.001f}, c[4] = {-4, 3, -2, 1};
  CHECK_EQ(calc_diff(a, a, 4), 0.0);
  CHECK(calc_diff(a, b, 4) < 9e-4);
  CHECK(calc_diff(a, c, 4) > 0.1);
}

}  // namespace

int main() {
  test_e4m3();
  test_scales();
  test_cast_rows();
  test_routing();
  test_combine();
  return check::summary("test_low_latency_oracle");
}
