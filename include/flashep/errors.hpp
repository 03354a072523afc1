// flashep: the errors the C++ API throws. Every one is a flashep::Error with a kind; the Python
// package maps the kinds to its own exceptions (ValueError for invalid arguments, a FlashepError
// subclass for each runtime kind).
#pragma once

#include <stdexcept>
#include <string>

namespace flashep {

enum class ErrorKind : int {
  kInvalidArgument = 1,  ///< bad input found on the host, before anything was enqueued
  kTimeout = 2,          ///< a bounded wait (GPU spin or host poll) expired
  kPeerMismatch = 3,     ///< the ranks disagree on a call or on the buffer (sizes, config, shapes)
  kPeerFailed = 4,       ///< another rank failed and aborted the buffer; its own error says why
  kDeviceFault = 5,      ///< bad input found on the GPU, or a CUDA error
  kPoisoned = 6,         ///< the buffer failed earlier; destroy it and create a new one
  kUnsupported = 7,      ///< not built in (e.g. NVSHMEM) or not implemented yet
};

/// Name of a kind ("invalid argument", "timeout", ...).
inline const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "invalid argument";
    case ErrorKind::kTimeout: return "timeout";
    case ErrorKind::kPeerMismatch: return "peer mismatch";
    case ErrorKind::kPeerFailed: return "peer failed";
    case ErrorKind::kDeviceFault: return "device fault";
    case ErrorKind::kPoisoned: return "poisoned";
    case ErrorKind::kUnsupported: return "unsupported";
  }
  return "error";
}

/// Every error flashep raises. After any kind but kInvalidArgument and kUnsupported the Buffer is
/// poisoned: later calls throw kPoisoned naming the first error.
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace flashep
