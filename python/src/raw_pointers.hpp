// The bindings take device pointers and CUDA streams as Python ints (tensor.data_ptr(),
// stream.cuda_stream): these turn them back into C++ types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace flashep::bindings {

template <typename T>
inline T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace flashep::bindings
