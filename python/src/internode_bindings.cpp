// Bindings of the multi-node stages: module functions that take the Runtime (flashep::Buffer) and
// raw device pointers / streams as Python ints. So far the rail stage, for its tests.
#include <nanobind/nanobind.h>

#include <cstdint>

#include "core/internode_compose.hpp"
#include "flashep/buffer.hpp"
#include "raw_pointers.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using flashep::Buffer;

using flashep::bindings::as_ptr;
using flashep::bindings::as_stream;

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
  b.internode_rail_exchange(a, as_stream(stream));
}

void reorder_plan(Buffer& b, uintptr_t rank_prefix_matrix, uintptr_t recv_src_idx, int max_tokens, int rows,
                  uintptr_t final_row, uintptr_t recv_gbl_rank_prefix_sum, uintptr_t stream) {
  flashep::InternodeReorderPlanArgs a;
  a.rank_prefix_matrix = as_ptr<const int>(rank_prefix_matrix);
  a.recv_src_idx = as_ptr<const int>(recv_src_idx);
  a.max_tokens = max_tokens;
  a.rows = rows;
  a.final_row = as_ptr<int>(final_row);
  a.recv_gbl_rank_prefix_sum = as_ptr<int>(recv_gbl_rank_prefix_sum);
  b.internode_reorder_plan(a, as_stream(stream));
}

void reorder_copy(Buffer& b, uintptr_t final_row, int rows, int hidden, bool fp8, int num_topk, bool forward,
                  uintptr_t src_x, uintptr_t dst_x, uintptr_t src_scales, uintptr_t dst_scales, uintptr_t src_topk_idx,
                  uintptr_t dst_topk_idx, uintptr_t src_topk_weights, uintptr_t dst_topk_weights, uintptr_t stream) {
  flashep::InternodeReorderCopyArgs a;
  a.final_row = as_ptr<const int>(final_row);
  a.rows = rows;
  a.hidden = hidden;
  a.dtype = fp8 ? flashep::DType::kFloat8E4M3 : flashep::DType::kBFloat16;
  a.num_topk = num_topk;
  a.forward = forward;
  a.src_x = as_ptr<const void>(src_x);
  a.dst_x = as_ptr<void>(dst_x);
  a.src_scales = as_ptr<const float>(src_scales);
  a.dst_scales = as_ptr<float>(dst_scales);
  a.src_topk_idx = as_ptr<const int64_t>(src_topk_idx);
  a.dst_topk_idx = as_ptr<int64_t>(dst_topk_idx);
  a.src_topk_weights = as_ptr<const float>(src_topk_weights);
  a.dst_topk_weights = as_ptr<float>(dst_topk_weights);
  b.internode_reorder_copy(a, as_stream(stream));
}

void rail_return(Buffer& b, uintptr_t combined_x, uintptr_t combined_weights, uintptr_t fwd_counts, uintptr_t rail_slot,
                 int num_tokens, uintptr_t bias0, uintptr_t bias1, uintptr_t out_x, uintptr_t out_weights, int hidden,
                 int num_topk, int max_tokens, bool dispatch_fp8, int dispatch_num_topk, int num_sms, uintptr_t stream) {
  flashep::RailReturnArgs a;
  a.combined_x = as_ptr<const void>(combined_x);
  a.combined_weights = as_ptr<const float>(combined_weights);
  a.fwd_counts = as_ptr<const int>(fwd_counts);
  a.rail_slot = as_ptr<const int>(rail_slot);
  a.num_tokens = num_tokens;
  a.bias0 = as_ptr<const void>(bias0);
  a.bias1 = as_ptr<const void>(bias1);
  a.out_x = as_ptr<void>(out_x);
  a.out_weights = as_ptr<float>(out_weights);
  a.hidden = hidden;
  a.num_topk = num_topk;
  a.max_tokens = max_tokens;
  a.dispatch_dtype = dispatch_fp8 ? flashep::DType::kFloat8E4M3 : flashep::DType::kBFloat16;
  a.dispatch_num_topk = dispatch_num_topk;
  a.num_sms = num_sms;
  b.internode_rail_return(a, as_stream(stream));
}

}  // namespace

void bind_internode(nb::module_& m) {
  using release_gil = nb::call_guard<nb::gil_scoped_release>;
  m.attr("kMaxRailTokens") = flashep::kMaxRailTokens;
  m.def("rail_exchange", &rail_exchange, "runtime"_a, "x"_a, "fp8"_a, "hidden"_a, "x_scales"_a,
        "scale_token_stride"_a, "scale_hidden_stride"_a, "topk_idx"_a, "topk_weights"_a, "num_topk"_a,
        "num_experts"_a, "is_token_in_rank"_a, "num_tokens"_a, "max_tokens"_a, "rail_slot"_a, "rail_count"_a,
        "fwd_x"_a, "fwd_scales"_a, "fwd_topk_idx"_a, "fwd_topk_weights"_a, "fwd_in_rank"_a, "fwd_source"_a,
        "fwd_counts"_a, "num_sms"_a, "stream"_a, release_gil(),
        "The multi-node rail stage (Buffer::internode_rail_exchange), for its tests.");
  m.def("reorder_plan", &reorder_plan, "runtime"_a, "rank_prefix_matrix"_a, "recv_src_idx"_a, "max_tokens"_a, "rows"_a,
        "final_row"_a, "recv_gbl_rank_prefix_sum"_a, "stream"_a, release_gil(),
        "The composed multi-node dispatch's reordering plan (Buffer::internode_reorder_plan).");
  m.def("reorder_copy", &reorder_copy, "runtime"_a, "final_row"_a, "rows"_a, "hidden"_a, "fp8"_a, "num_topk"_a,
        "forward"_a, "src_x"_a, "dst_x"_a, "src_scales"_a, "dst_scales"_a, "src_topk_idx"_a, "dst_topk_idx"_a,
        "src_topk_weights"_a, "dst_topk_weights"_a, "stream"_a, release_gil(),
        "Moves rows between the NVLink stage's order and the contract's (Buffer::internode_reorder_copy).");
  m.def("rail_return", &rail_return, "runtime"_a, "combined_x"_a, "combined_weights"_a, "fwd_counts"_a, "rail_slot"_a,
        "num_tokens"_a, "bias0"_a, "bias1"_a, "out_x"_a, "out_weights"_a, "hidden"_a, "num_topk"_a, "max_tokens"_a,
        "dispatch_fp8"_a, "dispatch_num_topk"_a, "num_sms"_a, "stream"_a, release_gil(),
        "The combine's rail stage (Buffer::internode_rail_return).");
  m.def(
      "internode_rail_bytes",
      [](int num_ranks, int nvl_domain_size, int max_tokens, int hidden, bool fp8, int num_topk) {
        return Buffer::internode_rail_bytes(num_ranks, nvl_domain_size, max_tokens, hidden,
                                            fp8 ? flashep::DType::kFloat8E4M3 : flashep::DType::kBFloat16, num_topk);
      },
      "num_ranks"_a, "nvl_domain_size"_a, "max_tokens"_a, "hidden"_a, "fp8"_a, "num_topk"_a,
      "Bytes of the NVSHMEM region the rail stage needs.");
}
