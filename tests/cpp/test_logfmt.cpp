// CPU tests of LogFMT-10 (src/core/logfmt.hpp), the functions the combine kernels run: the bit
// packing round-trips every code and sign, the error of a cast value stays within its bound, the
// groups that must travel as BF16 do, and a combine-like row stays within DeepEP's calc_diff bound.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.hpp"
#include "core/logfmt.hpp"
#include "oracle/low_latency_oracle.hpp"

using namespace flashep;

namespace {

/// Encodes and decodes one group of 128 values with the group's own parameters.
std::vector<float> round_trip(const std::vector<float>& group, LogfmtParams* params_out) {
  float amax = 0.0f, amin = INFINITY;
  for (float v : group) {
    amax = std::fmax(amax, std::fabs(v));
    if (v != 0.0f) amin = std::fmin(amin, std::fabs(v));
  }
  const LogfmtParams p = logfmt_params(amax, amin);
  *params_out = p;
  std::vector<float> out(group.size());
  if (p.step < 0.0f) return group;  // BF16 group (exactness of BF16 is not this test's subject)
  for (size_t i = 0; i < group.size(); i += 8) {
    uint16_t words[5];
    logfmt_encode8(group.data() + i, p, words);
    logfmt_decode8(words, p, out.data() + i);
  }
  return out;
}

void test_packing_round_trips_codes_and_signs() {
  // Values placed exactly on levels: decode(encode(v)) == v for every code and sign pattern.
  const LogfmtParams p{-20.0f, 19.0f / 510.0f};
  std::mt19937 rng(7);
  for (int trial = 0; trial < 20000; ++trial) {
    float v[8], back[8];
    uint32_t codes[8];
    for (int i = 0; i < 8; ++i) {
      codes[i] = trial < 512 ? (trial + i * 61) % 512 : rng() % 512;
      v[i] = logfmt_value(codes[i], (rng() & 1u) != 0u, p);
    }
    uint16_t words[5];
    logfmt_encode8(v, p, words);
    logfmt_decode8(words, p, back);
    for (int i = 0; i < 8; ++i) {
      CHECK_EQ(logfmt_code(back[i], p), codes[i]);
      CHECK(back[i] == v[i]);
    }
  }
}

void test_error_bound_and_special_groups() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<float> group(kLogfmtGroup);
    for (float& v : group) v = normal(rng);
    if (trial % 7 == 0) group[trial % kLogfmtGroup] = 0.0f;
    LogfmtParams p{};
    const std::vector<float> back = round_trip(group, &p);
    CHECK(p.step > 0.0f);  // |v| < 1 and not constant: cast
    const double bound = std::exp2(p.step / 2.0) - 1.0 + 1e-5;
    for (int i = 0; i < kLogfmtGroup; ++i) {
      if (group[i] == 0.0f) {
        CHECK(back[i] == 0.0f);
        continue;
      }
      CHECK(std::signbit(back[i]) == std::signbit(group[i]));
      CHECK(std::fabs(back[i] - group[i]) <= bound * std::fabs(group[i]));
    }
  }
  LogfmtParams p{};
  round_trip(std::vector<float>(kLogfmtGroup, 0.0f), &p);
  CHECK(p.step == 0.0f);  // all zeros: cast, every code 0
  std::vector<float> big(kLogfmtGroup, 0.25f);
  big[3] = 1.5f;
  round_trip(big, &p);
  CHECK(p.step < 0.0f);  // a magnitude >= 1: BF16
  round_trip(std::vector<float>(kLogfmtGroup, -0.125f), &p);
  CHECK(p.step < 0.0f);  // one magnitude only: BF16
  // A range wider than 32 octaves is clipped: the smallest values may become 0, never wrong-signed.
  std::vector<float> wide(kLogfmtGroup, 0.5f);
  wide[0] = 1e-20f;
  wide[1] = -1e-20f;
  const std::vector<float> back = round_trip(wide, &p);
  CHECK(p.step > 0.0f);
  CHECK(back[0] == 0.0f && back[1] == 0.0f);
  CHECK(std::fabs(back[2] - 0.5f) <= 0.02f);
}

void test_calc_diff_of_a_combine_like_row() {
  // Sums of weighted expert outputs (magnitudes well below 1): DeepEP accepts calc_diff < 9e-4.
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  const int hidden = 7168, tokens = 64;
  std::vector<float> exact, lossy;
  for (int t = 0; t < tokens; ++t) {
    for (int g = 0; g < hidden / kLogfmtGroup; ++g) {
      std::vector<float> group(kLogfmtGroup);
      for (float& v : group) v = normal(rng);
      LogfmtParams p{};
      const std::vector<float> back = round_trip(group, &p);
      exact.insert(exact.end(), group.begin(), group.end());
      lossy.insert(lossy.end(), back.begin(), back.end());
    }
  }
  const double diff = oracle::low_latency::calc_diff(exact.data(), lossy.data(), static_cast<int64_t>(exact.size()));
  CHECK(diff < 9e-4);
  CHECK(diff > 0.0);  // it is lossy
  CHECK_EQ(logfmt_row_bytes(7168), int64_t(7168 * 2 + 56 * 8));
}

}  // namespace

int main() {
  test_packing_round_trips_codes_and_signs();
  test_error_bound_and_special_groups();
  test_calc_diff_of_a_combine_like_row();
  return check::summary("test_logfmt");
}
