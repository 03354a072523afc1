// The low-latency oracle (low_latency_oracle.hpp): plain loops, exact float32 arithmetic, no tricks
// the GPU would have to reproduce beyond what the contract states.
#include "oracle/low_latency_oracle.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <stdexcept>
#include <string>

#include "oracle/oracle.hpp"

namespace flashep::oracle::low_latency {

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("flashep::oracle::low_latency: " + what);
}
void require(bool condition, const std::string& what) {
  if (!condition) fail(what);
}

/// Round half to even of a non-negative value to an integer (exact for the magnitudes used here).
double round_half_even(double value) {
  const double floor_value = std::floor(value);
  const double fraction = value - floor_value;
  if (fraction > 0.5) return floor_value + 1;
  if (fraction < 0.5) return floor_value;
  return std::fmod(floor_value, 2.0) == 0.0 ? floor_value : floor_value + 1;
}

}  // namespace

uint8_t float_to_e4m3(float value) {
  if (std::isnan(value)) return 0x7f;
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const double magnitude = std::fabs(static_cast<double>(value));
  // Saturation: 448 is the largest finite value; everything from there on (infinity too) is 448.
  if (magnitude >= kFp8Max) return sign | 0x7e;
  // Subnormals: m * 2^-9, m in [0, 7]; m == 8 rounds up into the smallest normal (same encoding).
  if (magnitude < std::ldexp(1.0, -6)) {
    const int m = static_cast<int>(round_half_even(magnitude * 512.0));
    return sign | static_cast<uint8_t>(m);  // m == 8 is exponent field 1, mantissa 0: 2^-6
  }
  int exponent = static_cast<int>(std::floor(std::log2(magnitude)));
  // log2 of an exact power of two is exact; guard the rounding of the others.
  if (std::ldexp(1.0, exponent) > magnitude) --exponent;
  if (std::ldexp(1.0, exponent + 1) <= magnitude) ++exponent;
  int mantissa = static_cast<int>(round_half_even((magnitude / std::ldexp(1.0, exponent) - 1.0) * 8.0));
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  // 448 = 2^8 * 1.75 is the top (exponent field 15, mantissa 6); values that round past it were
  // caught by the saturation above (they are >= 464 > 448).
  return sign | static_cast<uint8_t>(((exponent + 7) << 3) | mantissa);
}

float e4m3_to_float(uint8_t bits) {
  const int exponent_field = (bits >> 3) & 0xf, mantissa = bits & 0x7;
  if (exponent_field == 0xf && mantissa == 0x7) return std::nanf("");
  const double magnitude = exponent_field == 0 ? std::ldexp(static_cast<double>(mantissa), -9)
                                               : std::ldexp(1.0 + mantissa / 8.0, exponent_field - 7);
  return static_cast<float>((bits & 0x80) ? -magnitude : magnitude);
}

float scale_inv_of(float amax, bool round_scale) {
  const float scale_inv = amax / kFp8Max;  // float32 division, round to nearest even
  if (!round_scale) return scale_inv;
  // The smallest power of two >= scale_inv: itself if its mantissa is zero, else the next exponent.
  const uint32_t bits = std::bit_cast<uint32_t>(scale_inv);
  if ((bits & 0x7fffffu) == 0) return scale_inv;
  return std::bit_cast<float>((bits & 0x7f800000u) + 0x800000u);
}

uint8_t ue8m0_of(float power_of_two_scale) {
  return static_cast<uint8_t>((std::bit_cast<uint32_t>(power_of_two_scale) >> 23) & 0xff);
}

Fp8Rows cast_fp8(const uint16_t* x_bf16, int num_tokens, int hidden, bool round_scale, bool ue8m0) {
  require(num_tokens >= 0 && hidden > 0 && hidden % kGroup == 0, "hidden must be a positive multiple of 128");
  require(!ue8m0 || round_scale, "use_ue8m0 requires round_scale");
  require(!ue8m0 || hidden % (4 * kGroup) == 0, "use_ue8m0 needs hidden % 512 == 0 (four scales per int32)");
  const int groups = hidden / kGroup;
  Fp8Rows out;
  out.data.resize(static_cast<size_t>(num_tokens) * hidden);
  if (ue8m0) {
    out.packed_scales.assign(static_cast<size_t>(num_tokens) * (groups / 4), 0);
  } else {
    out.scales.resize(static_cast<size_t>(num_tokens) * groups);
  }
  for (int t = 0; t < num_tokens; ++t) {
    for (int g = 0; g < groups; ++g) {
      const size_t begin = static_cast<size_t>(t) * hidden + static_cast<size_t>(g) * kGroup;
      float amax = 0.0f;
      for (int j = 0; j < kGroup; ++j) amax = std::fmax(amax, std::fabs(bf16_to_float(x_bf16[begin + j])));
      amax = std::fmax(amax, kAmaxFloor);
      const float scale_inv = scale_inv_of(amax, round_scale);
      for (int j = 0; j < kGroup; ++j) out.data[begin + j] = float_to_e4m3(bf16_to_float(x_bf16[begin + j]) / scale_inv);
      if (ue8m0) {
        const size_t word = static_cast<size_t>(t) * (groups / 4) + g / 4;
        out.packed_scales[word] = static_cast<int32_t>(static_cast<uint32_t>(out.packed_scales[word]) |
                                                       (uint32_t(ue8m0_of(scale_inv)) << (8 * (g % 4))));
      } else {
        out.scales[static_cast<size_t>(t) * groups + g] = scale_inv;
      }
    }
  }
  return out;
}

std::vector<RankReceive> dispatch_routing(const std::vector<std::vector<int64_t>>& topk_idx,
                                          const std::vector<int>& num_tokens, int num_topk, int num_ranks,
                                          int num_experts, int max_tokens_per_rank,
                                          const std::vector<uint8_t>& masked) {
  require(num_ranks > 0 && num_experts > 0 && num_experts % num_ranks == 0,
          "num_experts must be a positive multiple of num_ranks");
  require(static_cast<int>(topk_idx.size()) == num_ranks && static_cast<int>(num_tokens.size()) == num_ranks,
          "one topk_idx and one token count per rank");
  require(masked.empty() || static_cast<int>(masked.size()) == num_ranks, "masked has one entry per rank");
  const int L = num_experts / num_ranks;
  auto is_masked = [&](int r) { return !masked.empty() && masked[r] != 0; };
  std::vector<RankReceive> out(num_ranks);
  for (auto& rank : out) {
    rank.recv_count.assign(L, 0);
    rank.rows.assign(L, std::vector<std::vector<int>>(num_ranks));
  }
  for (int src = 0; src < num_ranks; ++src) {
    const int n = num_tokens[src];
    require(n >= 0 && n <= max_tokens_per_rank, "rank " + std::to_string(src) + " has " + std::to_string(n) +
                                                    " tokens, more than num_max_dispatch_tokens_per_rank");
    require(topk_idx[src].size() == static_cast<size_t>(n) * num_topk,
            "topk_idx of rank " + std::to_string(src) + " is not [n, K]");
    if (is_masked(src)) continue;  // a masked rank sends nothing
    for (int t = 0; t < n; ++t) {
      for (int k = 0; k < num_topk; ++k) {
        const int64_t e = topk_idx[src][static_cast<size_t>(t) * num_topk + k];
        require(e >= -1 && e < num_experts, "rank " + std::to_string(src) + ": expert id " + std::to_string(e) +
                                                " outside [-1, " + std::to_string(num_experts) + ")");
        if (e < 0) continue;
        const int dst = static_cast<int>(e / L), local = static_cast<int>(e % L);
        if (is_masked(dst)) continue;
        out[dst].rows[local][src].push_back(t);  // ascending t: sorted as built
        ++out[dst].recv_count[local];
      }
    }
  }
  return out;
}

std::vector<uint16_t> combine(const int64_t* topk_idx, const float* topk_weights, const uint16_t* y, int num_tokens,
                              int num_topk, int hidden, int num_ranks, int num_experts,
                              const std::vector<uint8_t>& masked) {
  require(num_ranks > 0 && num_experts > 0 && num_experts % num_ranks == 0,
          "num_experts must be a positive multiple of num_ranks");
  require(masked.empty() || static_cast<int>(masked.size()) == num_ranks, "masked has one entry per rank");
  const int L = num_experts / num_ranks;
  std::vector<uint16_t> out(static_cast<size_t>(num_tokens) * hidden);
  std::vector<float> accumulator(hidden);
  for (int t = 0; t < num_tokens; ++t) {
    std::fill(accumulator.begin(), accumulator.end(), 0.0f);
    for (int k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx[static_cast<size_t>(t) * num_topk + k];
      require(e >= -1 && e < num_experts, "expert id " + std::to_string(e) + " out of range");
      if (e < 0 || (!masked.empty() && masked[e / L] != 0)) continue;
      const float w = topk_weights[static_cast<size_t>(t) * num_topk + k];
      const uint16_t* row = y + (static_cast<size_t>(t) * num_topk + k) * hidden;
      for (int h = 0; h < hidden; ++h) accumulator[h] += w * bf16_to_float(row[h]);
    }
    for (int h = 0; h < hidden; ++h) out[static_cast<size_t>(t) * hidden + h] = float_to_bf16(accumulator[h]);
  }
  return out;
}

double calc_diff(const float* x, const float* y, int64_t count) {
  double cross = 0, squares = 0;
  for (int64_t i = 0; i < count; ++i) {
    const double a = static_cast<double>(x[i]) + 1.0, b = static_cast<double>(y[i]) + 1.0;
    cross += a * b;
    squares += a * a + b * b;
  }
  return squares == 0 ? 0.0 : 1.0 - 2.0 * cross / squares;
}

}  // namespace flashep::oracle::low_latency
