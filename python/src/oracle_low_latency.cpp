// nanobind bindings of the low-latency CPU oracle (src/oracle/low_latency_oracle.hpp), over numpy
// arrays, for the GPU tests of the low-latency mode and the CPU tests of the oracle itself.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <vector>

#include "numpy_io.hpp"
#include "oracle/low_latency_oracle.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace flashep::bindings;
namespace ll = flashep::oracle::low_latency;

namespace {

std::vector<uint8_t> read_mask(nb::handle masked, int num_ranks) {
  std::vector<uint8_t> out;
  if (masked.is_none()) return out;
  const std::vector<int> values = nb::cast<std::vector<int>>(masked);
  if (static_cast<int>(values.size()) != num_ranks)
    throw nb::value_error(("oracle: masked has " + std::to_string(values.size()) + " entries, expected " +
                           std::to_string(num_ranks))
                              .c_str());
  for (int v : values) out.push_back(v != 0);
  return out;
}

nb::tuple cast_fp8(nb::handle x, bool round_scale, bool use_ue8m0) {
  auto array = read_array<uint16_t>(x, "x (bf16 bits)", 2);
  const int n = static_cast<int>(array.dim(0)), H = static_cast<int>(array.dim(1));
  ll::Fp8Rows rows = ll::cast_fp8(array.data.data(), n, H, round_scale, use_ue8m0);
  nb::object data = to_numpy<uint8_t>(std::move(rows.data), {size_t(n), size_t(H)});
  nb::object scales = use_ue8m0 ? to_numpy<int32_t>(std::move(rows.packed_scales), {size_t(n), size_t(H / 512)})
                                : to_numpy<float>(std::move(rows.scales), {size_t(n), size_t(H / 128)});
  return nb::make_tuple(data, scales);
}

nb::list dispatch_routing(nb::handle topk_list, int num_experts, int max_tokens_per_rank, nb::handle masked) {
  if (!nb::isinstance<nb::list>(topk_list) && !nb::isinstance<nb::tuple>(topk_list))
    throw nb::type_error("oracle: topk_idx must be a list of int64 [n, K] arrays, one per rank");
  std::vector<std::vector<int64_t>> topk;
  std::vector<int> tokens;
  int num_topk = -1;
  for (nb::handle item : topk_list) {
    auto array = read_array<int64_t>(item, "topk_idx[" + std::to_string(topk.size()) + "]", 2);
    if (num_topk >= 0 && static_cast<int>(array.dim(1)) != num_topk)
      throw nb::value_error("oracle: every rank's topk_idx must have the same K");
    num_topk = static_cast<int>(array.dim(1));
    tokens.push_back(static_cast<int>(array.dim(0)));
    topk.push_back(std::move(array.data));
  }
  const int R = static_cast<int>(topk.size());
  const auto world = ll::dispatch_routing(topk, tokens, num_topk < 0 ? 0 : num_topk, R, num_experts,
                                          max_tokens_per_rank, read_mask(masked, R));
  nb::list out;
  for (const ll::RankReceive& rank : world) {
    nb::list experts;
    for (const auto& per_source : rank.rows) {
      nb::list sources;
      for (const auto& rows : per_source) sources.append(nb::cast(rows));
      experts.append(sources);
    }
    out.append(nb::make_tuple(nb::cast(rank.recv_count), experts));
  }
  return out;
}

nb::object combine(nb::handle topk_idx, nb::handle topk_weights, nb::handle y, int num_ranks, int num_experts,
                   nb::handle masked) {
  auto idx = read_array<int64_t>(topk_idx, "topk_idx", 2);
  auto weights = read_array<float>(topk_weights, "topk_weights", 2);
  require_shape(weights, idx.shape, "topk_weights");
  auto rows = read_array<uint16_t>(y, "y (bf16 bits [n * K, H])", 2);
  const int n = static_cast<int>(idx.dim(0)), K = static_cast<int>(idx.dim(1));
  const int H = static_cast<int>(rows.dim(1));
  if (rows.dim(0) != size_t(n) * K) throw nb::value_error("oracle: y must have n * K rows");
  std::vector<uint16_t> out = ll::combine(idx.data.data(), weights.data.data(), rows.data.data(), n, K, H, num_ranks,
                                          num_experts, read_mask(masked, num_ranks));
  return to_numpy<uint16_t>(std::move(out), {size_t(n), size_t(H)});
}

double calc_diff(nb::handle x, nb::handle y) {
  auto a = read_array<float>(x, "x", 1);
  auto b = read_array<float>(y, "y", 1);
  require_shape(b, a.shape, "y");
  return ll::calc_diff(a.data.data(), b.data.data(), static_cast<int64_t>(a.data.size()));
}

}  // namespace

void bind_low_latency_oracle(nb::module_& m) {
  m.def("oracle_ll_float_to_e4m3", &ll::float_to_e4m3, "value"_a,
        "e4m3 (fn) bits of a float: round to nearest even, saturated to +-448.");
  m.def("oracle_ll_e4m3_to_float", &ll::e4m3_to_float, "bits"_a);
  m.def("oracle_ll_scale_inv", &ll::scale_inv_of, "amax"_a, "round_scale"_a,
        "amax / 448 (float32), or the smallest power of two >= it.");
  m.def("oracle_ll_cast_fp8", &cast_fp8, "x"_a, "round_scale"_a = false, "use_ue8m0"_a = false,
        "x: uint16 (bf16 bits) [n, H] -> (e4m3 bytes uint8 [n, H], scales float32 [n, H/128] or, with use_ue8m0, "
        "int32 [n, H/512]): the low-latency dispatch's cast.");
  m.def("oracle_ll_dispatch_routing", &dispatch_routing, "topk_idx"_a, "num_experts"_a,
        "num_max_dispatch_tokens_per_rank"_a, "masked"_a = nb::none(),
        "topk_idx: list of every rank's int64 [n, K]. Returns, per rank, (recv_count list [L], rows) where "
        "rows[i][r] is the sorted list of rank r's token indices received by local expert i.");
  m.def("oracle_ll_combine", &combine, "topk_idx"_a, "topk_weights"_a, "y"_a, "num_ranks"_a, "num_experts"_a,
        "masked"_a = nb::none(),
        "One rank's weighted combine: y uint16 (bf16 bits) [n * K, H], row t * K + k the output of expert "
        "topk_idx[t][k] for token t. Returns uint16 [n, H].");
  m.def("oracle_calc_diff", &calc_diff, "x"_a, "y"_a,
        "DeepEP's calc_diff of two float32 1-D arrays (float64 sums); DeepEP accepts LogFMT below 9e-4.");
}
