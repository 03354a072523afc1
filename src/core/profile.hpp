// Host side of FLASHEP_DEBUG_PROFILE (docs/env.md): turns the kernels' per-warp phase clocks
// (src/kernels/profile.cuh) into one line per warp role. Diagnostics only.
#pragma once

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "kernels/launch.hpp"

namespace flashep::profile {

/// A group of warps of every block doing the same job, and the names of their phase counters.
struct WarpRole {
  std::string name;
  int first_warp;  // in the block
  int num_warps;
  std::vector<std::string> phases;  // counter i < kProfileItems
};

/// Mean microseconds per phase over the role's warps, items per warp, and the slowest warp's sum.
inline std::string summarize(const std::vector<unsigned long long>& counters, int num_blocks, int warps_per_block,
                             const std::vector<WarpRole>& roles, int clock_khz) {
  std::string out;
  const double us_per_cycle = 1000.0 / clock_khz;
  for (const WarpRole& role : roles) {
    std::vector<double> phase_us(role.phases.size(), 0.0);
    double items = 0, slowest = 0;
    int warps = 0;
    for (int b = 0; b < num_blocks; ++b) {
      for (int w = role.first_warp; w < role.first_warp + role.num_warps; ++w) {
        const unsigned long long* c = counters.data() + (int64_t(b) * warps_per_block + w) * kernels::kProfileCounters;
        double total = 0;
        for (size_t i = 0; i < role.phases.size(); ++i) {
          phase_us[i] += c[i] * us_per_cycle;
          total += c[i] * us_per_cycle;
        }
        items += c[kernels::kProfileItems];
        slowest = std::max(slowest, total);
        ++warps;
      }
    }
    if (warps == 0) continue;
    char line[256];
    std::snprintf(line, sizeof(line), "  %-10s %4d warps, %7.1f items/warp, slowest %7.1f us |", role.name.c_str(),
                  warps, items / warps, slowest);
    out += line;
    for (size_t i = 0; i < role.phases.size(); ++i) {
      std::snprintf(line, sizeof(line), " %s %.1f", role.phases[i].c_str(), phase_us[i] / warps);
      out += line;
    }
    out += " (mean us)\n";
  }
  return out;
}

}  // namespace flashep::profile
