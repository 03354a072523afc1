// numpy arrays in and out of the CPU oracle bindings (copies, any strides in, C order out).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace flashep::bindings {

namespace nb = nanobind;


/// A host array copied out of a numpy array (any strides), in C order.
template <typename T>
struct HostArray {
  std::vector<T> data;
  std::vector<size_t> shape;
  size_t dim(size_t i) const { return shape[i]; }
};

template <typename T>
const char* dtype_name() {
  if constexpr (std::is_same_v<T, uint8_t>) return "uint8";
  if constexpr (std::is_same_v<T, uint16_t>) return "uint16";
  if constexpr (std::is_same_v<T, int32_t>) return "int32";
  if constexpr (std::is_same_v<T, int64_t>) return "int64";
  if constexpr (std::is_same_v<T, float>) return "float32";
  return "?";
}

/// Copies `obj` (a CPU array of exactly dtype T and `ndim` dimensions, any strides) into a vector.
/// No implicit dtype conversion: a wrong dtype is a TypeError naming `name`.
template <typename T>
HostArray<T> read_array(nb::handle obj, const std::string& name, size_t ndim) {
  nb::ndarray<const T, nb::device::cpu> array;
  if (obj.is_none() || !nb::try_cast(obj, array, /*convert=*/false)) {
    throw nb::type_error(("oracle: " + name + " must be a CPU numpy array of dtype " + dtype_name<T>()).c_str());
  }
  if (array.ndim() != ndim) {
    throw nb::value_error(("oracle: " + name + " must have " + std::to_string(ndim) + " dimensions, got " +
                           std::to_string(array.ndim()))
                              .c_str());
  }
  HostArray<T> out;
  size_t count = 1;
  for (size_t i = 0; i < ndim; ++i) {
    out.shape.push_back(array.shape(i));
    count *= array.shape(i);
  }
  out.data.resize(count);
  const T* base = array.data();
  if (ndim == 1) {
    for (size_t i = 0; i < out.shape[0]; ++i) out.data[i] = base[static_cast<int64_t>(i) * array.stride(0)];
  } else if (ndim == 2) {
    const size_t cols = out.shape[1];
    for (size_t i = 0; i < out.shape[0]; ++i) {
      for (size_t j = 0; j < cols; ++j) {
        out.data[i * cols + j] =
            base[static_cast<int64_t>(i) * array.stride(0) + static_cast<int64_t>(j) * array.stride(1)];
      }
    }
  } else {
    throw nb::value_error("oracle: only 1-D and 2-D arrays are supported");
  }
  return out;
}

/// Requires `array` to have exactly `expected` shape.
template <typename T>
void require_shape(const HostArray<T>& array, const std::vector<size_t>& expected, const std::string& name) {
  if (array.shape == expected) return;
  auto text = [](const std::vector<size_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  };
  throw nb::value_error(("oracle: " + name + " has shape " + text(array.shape) + ", expected " + text(expected)).c_str());
}

/// Moves `values` into a new numpy array of `shape` (C order) that owns them. `Scalar` is the numpy
/// dtype (bool is written from a uint8_t vector of 0/1).
template <typename Scalar, typename T>
nb::object to_numpy(std::vector<T>&& values, std::vector<size_t> shape) {
  size_t count = 1;
  for (size_t d : shape) count *= d;
  if (values.size() != count) {
    throw std::runtime_error("oracle binding: array of " + std::to_string(values.size()) +
                             " elements does not match its shape");
  }
  auto* heap = new std::vector<T>(std::move(values));
  heap->reserve(1);  // a non-null data pointer even for empty arrays
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, Scalar>(static_cast<void*>(heap->data()), shape.size(), shape.data(), owner).cast();
}

}  // namespace flashep::bindings
