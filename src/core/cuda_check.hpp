// Throwing flashep::Error from host code, and CUDA error checking: every CUDA failure becomes a
// kDeviceFault error naming the call.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "flashep/errors.hpp"

namespace flashep {

[[noreturn]] inline void throw_error(ErrorKind kind, const std::string& message) {
  throw Error(kind, "flashep: " + message);
}
/// Bad input found on the host, before anything was enqueued.
[[noreturn]] inline void throw_invalid(const std::string& message) { throw_error(ErrorKind::kInvalidArgument, message); }


inline void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::kDeviceFault, std::string("flashep: CUDA error '") + cudaGetErrorString(status) + "' in " +
                                             call + " at " + file + ":" + std::to_string(line));
}

}  // namespace flashep

/// Throws kInvalidArgument with `message` when `condition` is false. A macro so that the message
/// (string concatenations, to_string) is built only when the check fails: the checks run on every
/// call, and a low-latency call's ~15 messages cost microseconds of host time before its launch.
#define FLASHEP_REQUIRE(condition, message)                   \
  do {                                                        \
    if (!(condition)) ::flashep::throw_invalid(message);      \
  } while (0)

#define FLASHEP_CUDA_CHECK(call) ::flashep::cuda_check((call), #call, __FILE__, __LINE__)
