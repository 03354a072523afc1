// flashep._torch_outputs: the output tensors of the low-latency calls, made in C++.
//
// Why: in a decode loop the host time before a dispatch's launch is GPU idle time, and from Python
// each torch.empty costs ~3.5 us (more on slower hosts) and each view ~1 us: the dispatch's three
// outputs and four views were ~14 us of its ~25 us of host time (docs/performance.md). Made here
// through ATen they cost a few hundred nanoseconds each, as in DeepEP (whose C++ allocates them).
//
// Also the common case of the calls' input checks (check_tensors), for the same reason: from Python
// each tensor's dtype, device, rank, contiguity and alignment cost ~1-2 us.
//
// Only allocation, views and checks: the launches stay in flashep._C, which does not depend on torch. The
// tensors come from torch's caching allocator on the device's current stream, exactly as
// torch.empty would make them (same shapes, strides and dtypes as the Python fallback in
// low_latency.py, which runs when this module was not built or does not import). Built when CMake
// finds torch (FLASHEP_WITH_TORCH); it refuses to import with another torch than that one.
//
// A plain CPython module (METH_FASTCALL, int arguments), no pybind11 or nanobind bindings of its own.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <utility>

namespace {

bool read_ints(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, int64_t* out, const char* name) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "flashep._torch_outputs.%s takes %zd ints, got %zd arguments", name, want, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < want; ++i) {
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

at::TensorOptions options(int64_t device, at::ScalarType dtype) {
  // device < 0: the CPU (the CPU test of this module's shapes and strides).
  return at::TensorOptions().dtype(dtype).device(device < 0 ? at::Device(at::kCPU)
                                                             : at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

int64_t address(const at::Tensor& t) { return t.defined() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0; }

/// A tuple filled item by item; released to the caller when whole, else freed with the items it
/// holds (also when a wrap throws part way: no reference leaks).
class TupleBuilder {
 public:
  explicit TupleBuilder(Py_ssize_t size) : tuple_(PyTuple_New(size)) {}
  TupleBuilder(const TupleBuilder&) = delete;
  TupleBuilder& operator=(const TupleBuilder&) = delete;
  ~TupleBuilder() { Py_XDECREF(tuple_); }
  bool ok() const { return tuple_ != nullptr; }
  /// Steals `item`; false (a Python error set) when it is null.
  bool add(PyObject* item) {
    if (item == nullptr) return false;
    PyTuple_SET_ITEM(tuple_, next_++, item);
    return true;
  }
  PyObject* release() {
    PyObject* tuple = tuple_;
    tuple_ = nullptr;
    return tuple;
  }

 private:
  PyObject* tuple_;
  Py_ssize_t next_ = 0;
};

PyObject* wrap(at::Tensor tensor) {
  if (!tensor.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(tensor));
}

/// dispatch_outputs(device, L, rows, H, fp8, scale_kind, scale_groups, words, ints, R) ->
///   (recv_x, recv_scales or None, words, recv_count, src_info, layout_range,
///    recv_x address, recv_scales address or 0, words address)
/// recv_x [L, rows, H] (FP8 e4m3 or BF16); recv_scales (scale_kind 1: float32, 2: int32) made
/// [L, groups, rows] and transposed to [L, rows, groups]; words int64 [words]; its int32 view
/// holds recv_count [L] at 0 and src_info [L, rows] at L, and layout_range int64 [L, R] starts at
/// int32 word `ints` (even). The same tensors as the fallback in _DispatchShape.allocate (low_latency.py).
PyObject* dispatch_outputs(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[10];
  if (!read_ints(args, nargs, 10, a, "dispatch_outputs")) return nullptr;
  HANDLE_TH_ERRORS
  const int64_t device = a[0], L = a[1], rows = a[2], H = a[3], fp8 = a[4], scale_kind = a[5], groups = a[6],
                num_words = a[7], ints = a[8], R = a[9];
  if (L < 0 || rows < 0 || H < 0 || groups < 0 || num_words < 0 || R <= 0 || ints < L + L * rows || ints % 2 != 0 ||
      ints / 2 + L * R > num_words || scale_kind < 0 || scale_kind > 2) {
    PyErr_SetString(PyExc_ValueError, "flashep._torch_outputs.dispatch_outputs: inconsistent sizes");
    return nullptr;
  }
  at::Tensor recv_x = at::empty({L, rows, H}, options(device, fp8 ? at::kFloat8_e4m3fn : at::kBFloat16));
  at::Tensor recv_scales;
  if (scale_kind != 0)  // [L, groups, rows] memory seen as [L, rows, groups], in one op
    recv_scales = at::empty_strided({L, rows, groups}, {groups * rows, 1, rows},
                                    options(device, scale_kind == 1 ? at::kFloat : at::kInt));
  at::Tensor words = at::empty({num_words}, options(device, at::kLong));
  const at::Tensor as_ints = words.view(at::kInt);
  at::Tensor recv_count = as_ints.as_strided({L}, {1}, 0);
  at::Tensor src_info = as_ints.as_strided({L, rows}, {rows, 1}, L);
  at::Tensor layout_range = words.as_strided({L, R}, {R, 1}, ints / 2);
  const int64_t x_at = address(recv_x), scales_at = address(recv_scales), words_at = address(words);
  TupleBuilder out(9);
  if (!out.ok() || !out.add(wrap(std::move(recv_x))) || !out.add(wrap(std::move(recv_scales))) ||
      !out.add(wrap(std::move(words))) || !out.add(wrap(std::move(recv_count))) || !out.add(wrap(std::move(src_info))) ||
      !out.add(wrap(std::move(layout_range))) || !out.add(PyLong_FromLongLong(x_at)) ||
      !out.add(PyLong_FromLongLong(scales_at)) || !out.add(PyLong_FromLongLong(words_at)))
    return nullptr;
  return out.release();
  END_HANDLE_TH_ERRORS
}

/// bf16_2d(device, rows, cols) -> (bf16 [rows, cols], its address): the combine's output.
PyObject* bf16_2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[3];
  if (!read_ints(args, nargs, 3, a, "bf16_2d")) return nullptr;
  HANDLE_TH_ERRORS
  if (a[1] < 0 || a[2] < 0) {
    PyErr_SetString(PyExc_ValueError, "flashep._torch_outputs.bf16_2d: negative size");
    return nullptr;
  }
  at::Tensor out = at::empty({a[1], a[2]}, options(a[0], at::kBFloat16));
  const int64_t out_at = address(out);
  TupleBuilder result(2);
  if (!result.ok() || !result.add(wrap(std::move(out))) || !result.add(PyLong_FromLongLong(out_at))) return nullptr;
  return result.release();
  END_HANDLE_TH_ERRORS
}

/// The dtypes of check_tensors' codes (code = dtype | dim << 4).
at::ScalarType code_dtype(int64_t code) {
  switch (code & 15) {
    case 1: return at::kBFloat16;
    case 2: return at::kLong;
    case 3: return at::kFloat;
    case 4: return at::kInt;
    default: return at::ScalarType::Undefined;
  }
}

/// check_tensors(device, tensor0, code0, tensor1, code1, ...) -> (address0, *sizes0, address1, ...)
/// or None. The common case of the low-latency calls' input checks, in one call: each tensor is a
/// torch.Tensor (exactly, or a Parameter: THPVariable_CheckExact), of the code's dtype and rank, on CUDA device `device`, contiguous and
/// 16-byte aligned. None when any is not: the caller then runs its full checks, which raise with
/// the argument's name (and accept what this refuses only for speed: a subclass, an 8-byte aligned
/// topk_idx).
PyObject* check_tensors(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs % 2 != 1) {
    PyErr_SetString(PyExc_TypeError, "flashep._torch_outputs.check_tensors(device, tensor, code, ...)");
    return nullptr;
  }
  const long long device = PyLong_AsLongLong(args[0]);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  HANDLE_TH_ERRORS
  int64_t values[64];
  Py_ssize_t count = 0;
  for (Py_ssize_t i = 1; i < nargs; i += 2) {
    const long long code = PyLong_AsLongLong(args[i + 1]);
    if (code == -1 && PyErr_Occurred()) return nullptr;
    if (!THPVariable_CheckExact(args[i])) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(args[i]);
    const int64_t dim = code >> 4;
    if (t.scalar_type() != code_dtype(code) || t.dim() != dim || !t.is_cuda() || t.get_device() != device ||
        !t.is_contiguous() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 ||
        count + 1 + dim > static_cast<Py_ssize_t>(sizeof(values) / sizeof(values[0])))
      Py_RETURN_NONE;
    values[count++] = reinterpret_cast<int64_t>(t.data_ptr());
    for (int64_t d = 0; d < dim; ++d) values[count++] = t.size(d);
  }
  TupleBuilder found(count);
  if (!found.ok()) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i)
    if (!found.add(PyLong_FromLongLong(values[i]))) return nullptr;
  return found.release();
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"check_tensors", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(check_tensors)), METH_FASTCALL,
     "The common case of the low-latency input checks (see torch_outputs.cpp)."},
    {"dispatch_outputs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(dispatch_outputs)), METH_FASTCALL,
     "The low-latency dispatch's outputs and views (see torch_outputs.cpp)."},
    {"bf16_2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bf16_2d)), METH_FASTCALL,
     "An uninitialized bf16 [rows, cols] tensor and its address."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_torch_outputs",
                      "The low-latency calls' output tensors, made in C++ (see torch_outputs.cpp).", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

/// The module inlines torch's tensor internals (sizes, strides, data pointers): imported with
/// another torch than the one it was built against, it could hand wrong addresses to the kernels
/// while every symbol still resolves. So it refuses (ImportError: low_latency.py then warns and
/// makes the outputs from Python). Importing torch here also makes sure its Tensor type exists
/// before any tensor is wrapped.
PyMODINIT_FUNC PyInit__torch_outputs() {
  PyObject* torch = PyImport_ImportModule("torch");
  if (torch == nullptr) return nullptr;
  PyObject* version = PyObject_GetAttrString(torch, "__version__");
  Py_DECREF(torch);
  if (version == nullptr) return nullptr;
  PyObject* text = PyObject_Str(version);
  Py_DECREF(version);
  if (text == nullptr) return nullptr;
  const char* found = PyUnicode_AsUTF8(text);
  if (found == nullptr || std::strcmp(found, FLASHEP_TORCH_VERSION) != 0) {
    if (found != nullptr)
      PyErr_Format(PyExc_ImportError,
                   "flashep._torch_outputs was built against torch %s but this process has torch %s: rebuild flashep",
                   FLASHEP_TORCH_VERSION, found);
    Py_DECREF(text);
    return nullptr;
  }
  Py_DECREF(text);
  return PyModule_Create(&module);
}
