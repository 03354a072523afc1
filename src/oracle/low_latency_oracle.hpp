// flashep CPU oracle of the low-latency (decode) mode: the semantics of ../shared/docs/interface.md
// ("Low-latency mode"), written plainly, for the GPU tests to compare against.
//
// Dispatch: each (token t, slot k) of source rank r with expert e = topk_idx[t][k] >= 0, whose rank
// e / L is not masked, is delivered to local expert i = e % L of rank e / L. Per local expert the
// received rows form one contiguous segment per source; the order of segments and of rows inside
// a segment is the implementation's (tests compare segment by segment, rows by their source token).
// The row is x[t] cast to FP8 per 128 channels (cast_fp8 below) or x[t] as BF16.
//
// The FP8 cast, per group of 128 channels of one token (all arithmetic float32, IEEE):
//   amax      = max(max_j |x_j|, 1e-4f)
//   scale_inv = amax / 448.0f; with round_scale: the smallest power of two >= that
//   value_j   = e4m3(x_j / scale_inv)   (round to nearest even, saturated to +-448)
//   UE8M0 (requires round_scale): the exponent byte of scale_inv (its float bits >> 23), the bytes
//   of 4 consecutive groups packed little-endian in one int32.
//
// Combine: combined[t] = bf16(sum over k ascending with topk_idx[t][k] >= 0 on an unmasked rank of
// weight[t][k] * y[t][k]) with the products and the sum in float32; weighted, unlike the
// high-throughput combine. Kernels may sum in another order: they are compared within a bound.
#pragma once

#include <cstdint>
#include <vector>

namespace flashep::oracle::low_latency {

inline constexpr float kFp8Max = 448.0f;
inline constexpr float kAmaxFloor = 1e-4f;
inline constexpr int kGroup = 128;

/// e4m3 (fn) encode with round to nearest even and saturation to +-448; NaN stays NaN (0x7f).
uint8_t float_to_e4m3(float value);
/// e4m3 (fn) decode (0x7f and 0xff are NaN).
float e4m3_to_float(uint8_t bits);
/// The scale of one 128-channel group: amax / 448, or the smallest power of two >= it.
float scale_inv_of(float amax, bool round_scale);
/// The UE8M0 byte of a power-of-two scale (its float exponent bits).
uint8_t ue8m0_of(float power_of_two_scale);

/// Rows cast to FP8: data [n, H] e4m3 bytes, and either float32 scales [n, H/128] or, with UE8M0,
/// int32 packed scales [n, H/512].
struct Fp8Rows {
  std::vector<uint8_t> data;
  std::vector<float> scales;
  std::vector<int32_t> packed_scales;
};
/// Throws std::invalid_argument on H % 128 != 0, ue8m0 without round_scale, or ue8m0 with H % 512 != 0.
Fp8Rows cast_fp8(const uint16_t* x_bf16, int num_tokens, int hidden, bool round_scale, bool ue8m0);

/// What one rank receives: per local expert, the count and, per source rank, the sorted source
/// token indices of its segment.
struct RankReceive {
  std::vector<int> recv_count;                     // [L]
  std::vector<std::vector<std::vector<int>>> rows;  // [L][R] sorted token indices
};
/// The dispatch routing of the whole world: topk_idx[r] is rank r's [num_tokens[r], K] (-1 = empty);
/// masked[r] != 0 masks rank r (nothing goes to or comes from it). Throws on ids outside [-1, E),
/// E % R != 0, or a rank with more than max_tokens_per_rank tokens.
std::vector<RankReceive> dispatch_routing(const std::vector<std::vector<int64_t>>& topk_idx,
                                          const std::vector<int>& num_tokens, int num_topk, int num_ranks,
                                          int num_experts, int max_tokens_per_rank,
                                          const std::vector<uint8_t>& masked);

/// Combine of one rank: y [n, K, H] bf16 holds, for each (t, k), the output of expert topk_idx[t][k]
/// for token t (rows of empty or masked slots are ignored). Returns bf16 [n, H].
std::vector<uint16_t> combine(const int64_t* topk_idx, const float* topk_weights, const uint16_t* y, int num_tokens,
                              int num_topk, int hidden, int num_ranks, int num_experts,
                              const std::vector<uint8_t>& masked);

/// DeepEP's check of a lossy combine (LogFMT): 1 - 2 sum((x+1)(y+1)) / sum((x+1)^2 + (y+1)^2), in
/// float64; DeepEP accepts < 9e-4.
double calc_diff(const float* x, const float* y, int64_t count);

}  // namespace flashep::oracle::low_latency
