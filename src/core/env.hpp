// The FLASHEP_* environment variables read by the C++ core. The one documented table of all of
// them (C++ and Python) is docs/env.md; keep the two in step.
#pragma once

#include <cstdlib>
#include <string>

namespace flashep::env {

/// FLASHEP_TIMEOUT_S (default 100): bound of every GPU spin-wait and host poll, seconds.
inline double timeout_s() {
  const char* value = std::getenv("FLASHEP_TIMEOUT_S");
  if (value == nullptr || *value == '\0') return 100.0;
  const double parsed = std::atof(value);
  return parsed > 0 ? parsed : 100.0;
}

}  // namespace flashep::env
