// Bindings of the low-latency operations: module functions that take the Runtime (flashep::Buffer)
// and raw device pointers / streams as Python ints. The Python layer (flashep/low_latency.py)
// checks tensors and keeps the handle.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>

#include "flashep/buffer.hpp"
#include "flashep/low_latency.hpp"
#include "kernels/low_latency_launch.hpp"
#include "raw_pointers.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using flashep::Buffer;

using flashep::bindings::as_ptr;
using flashep::bindings::as_stream;

flashep::LowLatencyHandle make_handle(uintptr_t src_info, uintptr_t layout_range, uintptr_t plan, int max_tokens,
                                      int hidden, int num_experts, int num_topk, uint64_t buffer_id) {
  flashep::LowLatencyHandle h;
  h.src_info = as_ptr<int>(src_info);
  h.layout_range = as_ptr<int64_t>(layout_range);
  h.plan = as_ptr<int>(plan);
  h.max_tokens = max_tokens;
  h.hidden = hidden;
  h.num_experts = num_experts;
  h.num_topk = num_topk;
  h.buffer_id = buffer_id;
  return h;
}

void ll_dispatch(Buffer& b, uintptr_t x, uintptr_t topk_idx, int num_tokens, int hidden, int num_topk, int max_tokens,
                 int num_experts, bool use_fp8, bool round_scale, bool use_ue8m0, int phases, int call_slot, uintptr_t recv_x,
                 uintptr_t recv_scales, uintptr_t recv_count, uintptr_t recv_stats, uintptr_t wait_stats,
                 uintptr_t src_info, uintptr_t layout_range, uintptr_t plan, uintptr_t stream) {
  flashep::LowLatencyHandle h = make_handle(src_info, layout_range, plan, max_tokens, hidden, num_experts, num_topk, 0);
  flashep::LowLatencyDispatchArgs a;
  a.x = as_ptr<const void>(x);
  a.topk_idx = as_ptr<const int64_t>(topk_idx);
  a.num_tokens = num_tokens;
  a.hidden = hidden;
  a.num_topk = num_topk;
  a.max_tokens = max_tokens;
  a.num_experts = num_experts;
  a.use_fp8 = use_fp8;
  a.round_scale = round_scale;
  a.use_ue8m0 = use_ue8m0;
  a.phases = phases;
  a.call_slot = call_slot;
  a.recv_x = as_ptr<void>(recv_x);
  a.recv_scales = as_ptr<void>(recv_scales);
  a.recv_count = as_ptr<int>(recv_count);
  a.cumulative_local_expert_recv_stats = as_ptr<int>(recv_stats);
  a.dispatch_wait_recv_cost_stats = as_ptr<int64_t>(wait_stats);
  a.handle = &h;
  b.low_latency_dispatch(a, as_stream(stream));
}

void ll_combine(Buffer& b, uintptr_t x, bool zero_copy, bool use_logfmt, uintptr_t topk_idx, uintptr_t topk_weights, int num_tokens,
                uintptr_t src_info, uintptr_t layout_range, uintptr_t plan, int max_tokens, int hidden,
                int num_experts, int num_topk, int phases, int call_slot, uintptr_t out, uintptr_t wait_stats,
                uintptr_t stream) {
  const flashep::LowLatencyHandle h =
      make_handle(src_info, layout_range, plan, max_tokens, hidden, num_experts, num_topk, b.id());
  flashep::LowLatencyCombineArgs a;
  a.x = as_ptr<const void>(x);
  a.zero_copy = zero_copy;
  a.use_logfmt = use_logfmt;
  a.topk_idx = as_ptr<const int64_t>(topk_idx);
  a.topk_weights = as_ptr<const float>(topk_weights);
  a.num_tokens = num_tokens;
  a.handle = &h;
  a.phases = phases;
  a.call_slot = call_slot;
  a.out = as_ptr<void>(out);
  a.combine_wait_recv_cost_stats = as_ptr<int64_t>(wait_stats);
  b.low_latency_combine(a, as_stream(stream));
}

uintptr_t ll_combine_buffer(Buffer& b, int max_tokens, int hidden, int num_experts, int num_topk) {
  const flashep::LowLatencyHandle h = make_handle(1, 1, 1, max_tokens, hidden, num_experts, num_topk, b.id());
  return reinterpret_cast<uintptr_t>(b.low_latency_combine_buffer(h));
}

}  // namespace

void bind_low_latency(nb::module_& m) {
  m.attr("kLowLatencySend") = static_cast<int>(flashep::kLowLatencySend);
  m.attr("kLowLatencyReceive") = static_cast<int>(flashep::kLowLatencyReceive);
  m.attr("kLowLatencyBoth") = static_cast<int>(flashep::kLowLatencyBoth);
  m.attr("kLowLatencyCallSlots") = 16;
  m.def("low_latency_region_bytes_hint", &flashep::low_latency_region_bytes_hint, "max_tokens"_a, "hidden"_a,
        "num_ranks"_a, "num_experts"_a, "Bytes of the low-latency region (get_low_latency_rdma_size_hint).");
  m.def("low_latency_plan_ints", &flashep::low_latency_plan_ints, "num_ranks"_a, "max_tokens"_a, "num_topk"_a,
        "int32 entries of a low-latency handle's combine plan.");
  // Positional calls are the fast path (the Python layer calls them once per decode step).
  m.def("ll_dispatch", &ll_dispatch, "runtime"_a, "x"_a, "topk_idx"_a, "num_tokens"_a, "hidden"_a,
        "num_topk"_a, "max_tokens"_a, "num_experts"_a, "use_fp8"_a, "round_scale"_a, "use_ue8m0"_a, "phases"_a,
        "call_slot"_a, "recv_x"_a, "recv_scales"_a, "recv_count"_a, "recv_stats"_a, "wait_stats"_a, "src_info"_a, "layout_range"_a,
        "plan"_a, "stream"_a);  // the GIL stays held, as torch does for its launches: releasing it costs ~0.5 us a call (a launch blocks only on a full launch queue)
  m.def("ll_combine", &ll_combine, "runtime"_a, "x"_a, "zero_copy"_a, "use_logfmt"_a, "topk_idx"_a, "topk_weights"_a,
        "num_tokens"_a, "src_info"_a, "layout_range"_a, "plan"_a, "max_tokens"_a, "hidden"_a, "num_experts"_a,
        "num_topk"_a, "phases"_a, "call_slot"_a, "out"_a, "wait_stats"_a, "stream"_a);  // GIL held: as ll_dispatch
  m.def("ll_combine_buffer", &ll_combine_buffer, "runtime"_a, "max_tokens"_a, "hidden"_a, "num_experts"_a,
        "num_topk"_a, "Device pointer of the zero-copy half the next low-latency combine reads.");
  m.def("debug_ll_trace", &flashep::kernels::take_low_latency_trace, "combine"_a,
        "Diagnostics builds: the low-latency dispatch (or combine) kernels' timeline since the last take, then "
        "reset: per point the earliest block's %globaltimer (ns), then the latest block's. Empty otherwise.");
  m.def("debug_ll_trace_points", [](bool combine) {
    std::vector<std::string> names;
    if (combine) for (const char* n : flashep::kernels::kLowLatencyCombineTrace) names.emplace_back(n);
    else for (const char* n : flashep::kernels::kLowLatencyDispatchTrace) names.emplace_back(n);
    return names;
  }, "combine"_a, "Names of the timeline points of debug_ll_trace.");
  m.def("ll_clean", [](Buffer& b, uintptr_t stream) { b.clean_low_latency_buffer(as_stream(stream)); }, "runtime"_a,
        "stream"_a);
  m.def("ll_update_mask", [](Buffer& b, int rank, bool mask, uintptr_t stream) {
    b.low_latency_update_mask(rank, mask, as_stream(stream));
  }, "runtime"_a, "rank"_a, "mask"_a, "stream"_a);
  m.def("ll_query_mask", [](const Buffer& b, uintptr_t out, uintptr_t stream) {
    b.low_latency_query_mask(as_ptr<int>(out), as_stream(stream));
  }, "runtime"_a, "out"_a, "stream"_a);
  m.def("ll_clean_mask", [](Buffer& b, uintptr_t stream) { b.low_latency_clean_mask(as_stream(stream)); }, "runtime"_a,
        "stream"_a);
}
