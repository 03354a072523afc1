// CUDA error checking for host code: every failure becomes a flashep::Error naming the call.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "flashep/buffer.hpp"

namespace flashep {

[[noreturn]] inline void throw_error(const std::string& message) { throw Error("flashep: " + message); }

inline void cuda_check(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess)
    throw Error(std::string("flashep: CUDA error '") + cudaGetErrorString(status) + "' in " + call + " at " + file +
                ":" + std::to_string(line));
}

}  // namespace flashep

#define FLASHEP_CUDA_CHECK(call) ::flashep::cuda_check((call), #call, __FILE__, __LINE__)
