// Bindings of the multi-node stages: module functions that take the Runtime (flashep::Buffer) and
// raw device pointers / streams as Python ints. So far the rail stage, for its tests.
#include <nanobind/nanobind.h>

#include <cstdint>

#include "flashep/buffer.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using flashep::Buffer;

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void rail_exchange(Buffer& b, uintptr_t x, bool fp8, int hidden, uintptr_t x_scales, int64_t scale_token_stride,
                   int64_t scale_hidden_stride, uintptr_t topk_idx, uintptr_t topk_weights, int num_topk,
                   int num_experts, uintptr_t is_token_in_rank, int num_tokens, int max_tokens, uintptr_t rail_slot,
                   uintptr_t rail_count, uintptr_t fwd_x, uintptr_t fwd_scales, uintptr_t fwd_topk_idx,
                   uintptr_t fwd_topk_weights, uintptr_t fwd_in_rank, uintptr_t fwd_source, uintptr_t fwd_counts,
                   int num_sms, uintptr_t stream) {
  flashep::RailExchangeArgs a;
  a.x = as_ptr<const void>(x);
  a.dtype = fp8 ? flashep::DType::kFloat8E4M3 : flashep::DType::kBFloat16;
  a.hidden = hidden;
  a.x_scales = as_ptr<const float>(x_scales);
  a.scale_token_stride = scale_token_stride;
  a.scale_hidden_stride = scale_hidden_stride;
  a.topk_idx = as_ptr<const int64_t>(topk_idx);
  a.topk_weights = as_ptr<const float>(topk_weights);
  a.num_topk = num_topk;
  a.num_experts = num_experts;
  a.is_token_in_rank = as_ptr<const bool>(is_token_in_rank);
  a.num_tokens = num_tokens;
  a.max_tokens = max_tokens;
  a.rail_slot = as_ptr<int>(rail_slot);
  a.rail_count = as_ptr<int>(rail_count);
  a.fwd_x = as_ptr<void>(fwd_x);
  a.fwd_scales = as_ptr<float>(fwd_scales);
  a.fwd_topk_idx = as_ptr<int64_t>(fwd_topk_idx);
  a.fwd_topk_weights = as_ptr<float>(fwd_topk_weights);
  a.fwd_in_rank = as_ptr<bool>(fwd_in_rank);
  a.fwd_source = as_ptr<int>(fwd_source);
  a.fwd_counts = as_ptr<int>(fwd_counts);
  a.num_sms = num_sms;
  b.internode_rail_exchange(a, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

void bind_internode(nb::module_& m) {
  using release_gil = nb::call_guard<nb::gil_scoped_release>;
  m.def("rail_exchange", &rail_exchange, "runtime"_a, "x"_a, "fp8"_a, "hidden"_a, "x_scales"_a,
        "scale_token_stride"_a, "scale_hidden_stride"_a, "topk_idx"_a, "topk_weights"_a, "num_topk"_a,
        "num_experts"_a, "is_token_in_rank"_a, "num_tokens"_a, "max_tokens"_a, "rail_slot"_a, "rail_count"_a,
        "fwd_x"_a, "fwd_scales"_a, "fwd_topk_idx"_a, "fwd_topk_weights"_a, "fwd_in_rank"_a, "fwd_source"_a,
        "fwd_counts"_a, "num_sms"_a, "stream"_a, release_gil(),
        "The multi-node rail stage (Buffer::internode_rail_exchange), for its tests.");
  m.def(
      "internode_rail_bytes",
      [](int num_ranks, int nvl_domain_size, int max_tokens, int hidden, bool fp8, int num_topk) {
        return Buffer::internode_rail_bytes(num_ranks, nvl_domain_size, max_tokens, hidden,
                                            fp8 ? flashep::DType::kFloat8E4M3 : flashep::DType::kBFloat16, num_topk);
      },
      "num_ranks"_a, "nvl_domain_size"_a, "max_tokens"_a, "hidden"_a, "fp8"_a, "num_topk"_a,
      "Bytes of the NVSHMEM region the rail stage needs.");
}
