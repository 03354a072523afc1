// LogFMT-10: the lossy wire format of low-latency combine's partial sums (`use_logfmt`), after
// DeepEP's idea (interface.md): per group of 128 channels, each value as a sign bit and a 9-bit
// code of its magnitude on a logarithmic scale between the group's smallest and largest magnitude;
// a group that does not suit the format travels as plain BF16. Host+device, so the CPU tests check
// exactly the functions the kernels run.
//
// A group is cast when its largest magnitude is below 1 and it has at least two distinct nonzero
// magnitudes (DeepEP's rule), or when it is all zeros. Then, with L_max = log2(max |v|) and
// L_min = max(log2(min nonzero |v|), L_max - 32):
//   step = (L_max - L_min) / 510                    (levels 1..511 span [L_min, L_max])
//   code = 0 for v == 0 or |v| < 2^(L_min - 1); else round((log2|v| - L_min) / step) + 1
//   value = 0 for code 0; else sign * 2^(L_min + (code - 1) * step)
// The relative error of a nonzero value is at most 2^(step / 2) - 1 (2.2% at the widest range of 32
// octaves, 0.35% at 4 octaves); DeepEP accepts a combine within calc_diff < 9e-4 of the exact one.
//
// Wire layout of one row of H channels: H/128 groups of 256 bytes, then H/128 metas of 8 bytes
// (float L_min, float step; step < 0 marks a BF16 group). A cast group uses the first 160 bytes of
// its 256: 16 runs of 10 bytes, run j holding channels 8j..8j+7 of the group (8 codes of 9 bits,
// then 8 sign bits). A BF16 group is the 128 values as BF16.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/hd.hpp"

namespace flashep {

inline constexpr int kLogfmtGroup = 128;
inline constexpr int kLogfmtGroupBytes = 256;  // wire room per group (a BF16 group fills it)
inline constexpr int kLogfmtCastBytes = 160;   // what a cast group uses
inline constexpr int kLogfmtRunBytes = 10;     // 8 channels
inline constexpr float kLogfmtMaxOctaves = 32.0f;
inline constexpr int kLogfmtLevels = 511;      // nonzero codes

struct LogfmtParams {
  float log_min;  // L_min
  float step;     // < 0: the group travels as BF16
};

/// The parameters of a group from its largest magnitude and its smallest nonzero magnitude
/// (`amin_nonzero` = +inf or anything when there is none; `amax` == 0 means all zeros).
FLASHEP_HD LogfmtParams logfmt_params(float amax, float amin_nonzero) {
  if (amax == 0.0f) return LogfmtParams{0.0f, 0.0f};  // all zeros: every code 0
  if (!(amax < 1.0f) || !(amin_nonzero < amax)) return LogfmtParams{0.0f, -1.0f};
  const float log_max = log2f(amax);
  const float log_min = fmaxf(log2f(amin_nonzero), log_max - kLogfmtMaxOctaves);
  if (!(log_min < log_max)) return LogfmtParams{0.0f, -1.0f};
  return LogfmtParams{log_min, (log_max - log_min) / float(kLogfmtLevels - 1)};
}

FLASHEP_HD uint32_t logfmt_code(float v, const LogfmtParams& p) {
  const float magnitude = fabsf(v);
  if (magnitude == 0.0f || p.step == 0.0f) return 0u;
  const float log_v = log2f(magnitude);
  if (log_v < p.log_min - 1.0f) return 0u;
  float t = floorf((log_v - p.log_min) / p.step + 0.5f);
  t = fminf(fmaxf(t, 0.0f), float(kLogfmtLevels - 1));
  return static_cast<uint32_t>(t) + 1u;
}

FLASHEP_HD float logfmt_value(uint32_t code, bool negative, const LogfmtParams& p) {
  if (code == 0u) return 0.0f;
  const float magnitude = exp2f(p.log_min + float(code - 1u) * p.step);
  return negative ? -magnitude : magnitude;
}

/// 8 values -> 10 bytes (as 5 little-endian 16-bit words): codes at bits 9i, signs at bits 72 + i.
FLASHEP_HD void logfmt_encode8(const float* v, const LogfmtParams& p, uint16_t* out) {
  uint64_t low = 0;  // bits 0..63
  uint32_t high = 0;  // bits 64..79
  for (int i = 0; i < 8; ++i) {
    const uint64_t code = logfmt_code(v[i], p);
    const int bit = 9 * i;
    low |= code << bit;                                   // bits past 63 fall off here...
    if (bit + 9 > 64) high |= static_cast<uint32_t>(code >> (64 - bit));  // ...and land here
    if (v[i] < 0.0f && code != 0u) high |= 1u << (72 + i - 64);
  }
  out[0] = static_cast<uint16_t>(low);
  out[1] = static_cast<uint16_t>(low >> 16);
  out[2] = static_cast<uint16_t>(low >> 32);
  out[3] = static_cast<uint16_t>(low >> 48);
  out[4] = static_cast<uint16_t>(high);
}

FLASHEP_HD void logfmt_decode8(const uint16_t* in, const LogfmtParams& p, float* v) {
  const uint64_t low = uint64_t(in[0]) | (uint64_t(in[1]) << 16) | (uint64_t(in[2]) << 32) | (uint64_t(in[3]) << 48);
  const uint32_t high = in[4];
  for (int i = 0; i < 8; ++i) {
    const int bit = 9 * i;
    uint32_t code = static_cast<uint32_t>(low >> bit) & 0x1ffu;
    if (bit + 9 > 64) code = (code | (high << (64 - bit))) & 0x1ffu;
    v[i] = logfmt_value(code, ((high >> (72 + i - 64)) & 1u) != 0u, p);
  }
}

/// Bytes of one row on the wire: the groups, then their metas (a multiple of 16).
FLASHEP_HD int64_t logfmt_row_bytes(int hidden) {
  return align_up(int64_t(hidden) * 2 + int64_t(hidden / kLogfmtGroup) * 8, 16);
}

}  // namespace flashep
