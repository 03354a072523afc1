// flashep._C: nanobind bindings of the torch-free C++ API.
//
// What is bound:
//   Config, DType, num_channels(), default_dispatch_config(), default_combine_config()
//   Runtime            flashep::Buffer with its stepwise bootstrap (bootstrap_message / _receive)
//   errors             flashep::Error by kind: ValueError (invalid argument) or a FlashepError
//                      (RuntimeError) subclass per runtime kind (bind_errors)
//   oracle_*           the CPU oracle of src/oracle, over numpy arrays, for the tests
//
// torch does not appear here: device pointers are Python ints (uintptr_t, 0 = nullptr) and CUDA
// streams are ints (the cudaStream_t value, e.g. torch.cuda.Stream.cuda_stream). The operations take
// the fields of their Args struct as keyword-only arguments of the same names, plus `stream`.
// The GIL is released around every launch and around the host poll of wait_recv_counts().
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "flashep/buffer.hpp"
#include "flashep/config.hpp"
#include "core/layouts.hpp"
#include "numpy_io.hpp"
#include "raw_pointers.hpp"
#include "oracle/oracle.hpp"

namespace nb = nanobind;
using namespace nb::literals;
using namespace flashep::bindings;

namespace {

using flashep::Buffer;
using flashep::Config;
using flashep::DType;

using release_gil = nb::call_guard<nb::gil_scoped_release>;

// ---- pointers and streams as Python ints ---------------------------------------------------------

using flashep::bindings::as_ptr;
using flashep::bindings::as_stream;

template <typename T>
uintptr_t as_int(T* pointer) {
  return reinterpret_cast<uintptr_t>(pointer);
}

std::string config_repr(const Config& c) {
  return "Config(num_sms=" + std::to_string(c.num_sms) +
         ", num_max_nvl_chunked_send_tokens=" + std::to_string(c.num_max_nvl_chunked_send_tokens) +
         ", num_max_nvl_chunked_recv_tokens=" + std::to_string(c.num_max_nvl_chunked_recv_tokens) +
         ", num_max_rdma_chunked_send_tokens=" + std::to_string(c.num_max_rdma_chunked_send_tokens) +
         ", num_max_rdma_chunked_recv_tokens=" + std::to_string(c.num_max_rdma_chunked_recv_tokens) + ")";
}

/// dict[key], or None when the key is absent.
nb::object get_item(nb::dict d, const char* key) {
  return d.contains(key) ? nb::object(d[key]) : nb::object(nb::none());
}

nb::dict as_dict(nb::handle obj, const std::string& what) {
  if (!nb::isinstance<nb::dict>(obj)) throw nb::type_error(("oracle: " + what + " must be a dict").c_str());
  return nb::borrow<nb::dict>(obj);
}

std::string rank_key(size_t rank, const char* key) {
  return "inputs[" + std::to_string(rank) + "]['" + key + "']";
}

/// Parses one rank's dispatch input dict (see oracle_dispatch's docstring).
flashep::oracle::RankInput read_rank_input(nb::handle obj, size_t rank, const flashep::oracle::Shape& shape) {
  nb::dict d = as_dict(obj, "inputs[" + std::to_string(rank) + "]");
  flashep::oracle::RankInput in;
  auto x = read_array<uint8_t>(get_item(d, "x"), rank_key(rank, "x"), 2);
  const size_t n = x.dim(0);
  const size_t row_bytes = static_cast<size_t>(shape.hidden) * shape.elem_size;
  require_shape(x, {n, row_bytes}, rank_key(rank, "x"));
  in.num_tokens = static_cast<int>(n);
  in.x = std::move(x.data);

  nb::object scales = get_item(d, "x_scales");
  if (shape.has_scales) {
    auto s = read_array<float>(scales, rank_key(rank, "x_scales"), 2);
    require_shape(s, {n, static_cast<size_t>(shape.hidden / 128)}, rank_key(rank, "x_scales"));
    in.x_scales = std::move(s.data);
  } else if (!scales.is_none()) {
    throw nb::value_error(("oracle: " + rank_key(rank, "x_scales") + " given but has_scales is False").c_str());
  }

  const size_t topk = static_cast<size_t>(shape.num_topk);
  auto idx = read_array<int64_t>(get_item(d, "topk_idx"), rank_key(rank, "topk_idx"), 2);
  require_shape(idx, {n, topk}, rank_key(rank, "topk_idx"));
  in.topk_idx = std::move(idx.data);

  nb::object weights = get_item(d, "topk_weights");
  if (!weights.is_none()) {
    auto w = read_array<float>(weights, rank_key(rank, "topk_weights"), 2);
    require_shape(w, {n, topk}, rank_key(rank, "topk_weights"));
    in.topk_weights = std::move(w.data);
  }
  return in;
}

std::vector<flashep::oracle::RankInput> read_rank_inputs(nb::handle list, const flashep::oracle::Shape& shape) {
  if (!nb::isinstance<nb::list>(list) && !nb::isinstance<nb::tuple>(list)) {
    throw nb::type_error("oracle: inputs must be a list of dicts, one per rank");
  }
  std::vector<flashep::oracle::RankInput> inputs;
  size_t rank = 0;
  for (nb::handle item : list) inputs.push_back(read_rank_input(item, rank++, shape));
  return inputs;
}

/// Parses the fields of a dispatch output dict that combine needs (num_recv_tokens,
/// rank_prefix_matrix, recv_src_idx, num_recv_tokens_per_expert).
flashep::oracle::RankOutput read_rank_output(nb::handle obj, size_t rank, int num_ranks) {
  const std::string label = "dispatch_outputs[" + std::to_string(rank) + "]";
  nb::dict d = as_dict(obj, label);
  flashep::oracle::RankOutput out;
  out.num_recv_tokens = nb::cast<int>(d["num_recv_tokens"]);
  auto matrix = read_array<int32_t>(get_item(d, "rank_prefix_matrix"), label + "['rank_prefix_matrix']", 2);
  require_shape(matrix, {static_cast<size_t>(num_ranks), static_cast<size_t>(num_ranks)},
                label + "['rank_prefix_matrix']");
  out.rank_prefix_matrix = std::move(matrix.data);
  nb::object src_idx = get_item(d, "recv_src_idx");
  if (!src_idx.is_none()) out.recv_src_idx = read_array<int32_t>(src_idx, label + "['recv_src_idx']", 1).data;
  nb::object per_expert = get_item(d, "num_recv_tokens_per_expert");
  if (!per_expert.is_none()) out.num_recv_tokens_per_expert = nb::cast<std::vector<int>>(per_expert);
  return out;
}

nb::dict write_rank_output(flashep::oracle::RankOutput&& out, const flashep::oracle::Shape& shape, bool has_weights) {
  const size_t rows = static_cast<size_t>(out.num_recv_tokens);
  const size_t topk = static_cast<size_t>(shape.num_topk);
  const size_t ranks = static_cast<size_t>(shape.num_ranks);
  nb::dict d;
  d["num_recv_tokens"] = out.num_recv_tokens;
  d["recv_x"] = to_numpy<uint8_t>(std::move(out.recv_x), {rows, static_cast<size_t>(shape.hidden) * shape.elem_size});
  d["recv_x_scales"] = shape.has_scales
                           ? to_numpy<float>(std::move(out.recv_x_scales), {rows, static_cast<size_t>(shape.hidden / 128)})
                           : nb::none();
  d["recv_topk_idx"] = to_numpy<int64_t>(std::move(out.recv_topk_idx), {rows, topk});
  if (has_weights && out.recv_topk_weights.empty()) out.recv_topk_weights.assign(rows * topk, 0.0f);
  d["recv_topk_weights"] = has_weights ? to_numpy<float>(std::move(out.recv_topk_weights), {rows, topk}) : nb::none();
  d["recv_src_idx"] = to_numpy<int32_t>(std::move(out.recv_src_idx), {rows});
  d["num_recv_tokens_per_expert"] = nb::cast(out.num_recv_tokens_per_expert);
  d["rank_prefix_matrix"] = to_numpy<int32_t>(std::move(out.rank_prefix_matrix), {ranks, ranks});
  return d;
}

/// Whether any rank's dispatch input dict carries topk_weights.
bool any_has(nb::handle list, const char* key) {
  for (nb::handle item : list) {
    if (nb::isinstance<nb::dict>(item) && !get_item(nb::borrow<nb::dict>(item), key).is_none()) return true;
  }
  return false;
}

// ---- oracle entry points -------------------------------------------------------------------------

nb::tuple oracle_get_dispatch_layout(nb::handle topk_idx, int num_experts, int num_ranks, int nvl_domain_size) {
  auto idx = read_array<int64_t>(topk_idx, "topk_idx", 2);
  const int n = static_cast<int>(idx.dim(0));
  const int topk = static_cast<int>(idx.dim(1));
  auto layout = flashep::oracle::get_dispatch_layout(idx.data.data(), n, topk, num_experts, num_ranks,
                                                     nvl_domain_size);
  const size_t nodes = layout.num_tokens_per_rdma_rank.size();
  return nb::make_tuple(
      to_numpy<int32_t>(std::move(layout.num_tokens_per_rank), {static_cast<size_t>(num_ranks)}),
      to_numpy<int32_t>(std::move(layout.num_tokens_per_rdma_rank), {nodes}),
      to_numpy<int32_t>(std::move(layout.num_tokens_per_expert), {static_cast<size_t>(num_experts)}),
      to_numpy<bool>(std::move(layout.is_token_in_rank), {static_cast<size_t>(n), static_cast<size_t>(num_ranks)}));
}

nb::list oracle_dispatch(int num_ranks, int hidden, int elem_size, bool has_scales, int num_topk, int num_experts,
                         int expert_alignment, nb::handle inputs) {
  flashep::oracle::Shape shape;
  shape.num_ranks = num_ranks;
  shape.hidden = hidden;
  shape.elem_size = elem_size;
  shape.has_scales = has_scales;
  shape.num_topk = num_topk;
  shape.num_experts = num_experts;
  shape.expert_alignment = expert_alignment;
  auto rank_inputs = read_rank_inputs(inputs, shape);
  const bool has_weights = num_topk > 0 && any_has(inputs, "topk_weights");
  auto outputs = flashep::oracle::dispatch(shape, rank_inputs);
  nb::list result;
  for (auto& out : outputs) result.append(write_rank_output(std::move(out), shape, has_weights));
  return result;
}

nb::list oracle_combine(int num_ranks, int hidden, int num_topk, nb::handle dispatch_inputs,
                        nb::handle dispatch_outputs, nb::handle combine_inputs, int num_experts) {
  if (num_ranks <= 0) throw nb::value_error("oracle: num_ranks must be positive");
  if (!nb::isinstance<nb::list>(dispatch_outputs) && !nb::isinstance<nb::tuple>(dispatch_outputs)) {
    throw nb::type_error("oracle: dispatch_outputs must be a list of dicts, one per rank");
  }
  if (!nb::isinstance<nb::list>(combine_inputs) && !nb::isinstance<nb::tuple>(combine_inputs)) {
    throw nb::type_error("oracle: combine_inputs must be a list of dicts, one per rank");
  }
  std::vector<flashep::oracle::RankOutput> routed;
  size_t rank = 0;
  for (nb::handle item : dispatch_outputs) routed.push_back(read_rank_output(item, rank++, num_ranks));

  // The dispatch shape: the element size and scales from the dispatch inputs, the number of experts
  // from the dispatch outputs (L entries per rank) unless given.
  flashep::oracle::Shape shape;
  shape.num_ranks = num_ranks;
  shape.hidden = hidden;
  shape.num_topk = num_topk;
  shape.has_scales = any_has(dispatch_inputs, "x_scales");
  if (num_experts <= 0) {
    if (routed.empty()) throw nb::value_error("oracle: dispatch_outputs is empty");
    num_experts = static_cast<int>(routed[0].num_recv_tokens_per_expert.size()) * num_ranks;
    if (num_experts <= 0) {
      throw nb::value_error("oracle: num_experts cannot be inferred from dispatch_outputs; pass num_experts=");
    }
  }
  shape.num_experts = num_experts;
  shape.elem_size = 2;
  if (hidden > 0) {
    for (nb::handle item : dispatch_inputs) {
      nb::object x = nb::isinstance<nb::dict>(item) ? get_item(nb::borrow<nb::dict>(item), "x") : nb::object(nb::none());
      nb::ndarray<const uint8_t, nb::device::cpu> array;
      if (!x.is_none() && nb::try_cast(x, array, false) && array.ndim() == 2) {
        shape.elem_size = static_cast<int>(array.shape(1)) / hidden;
        break;
      }
    }
  }
  auto rank_inputs = read_rank_inputs(dispatch_inputs, shape);

  std::vector<flashep::oracle::CombineRankInput> inputs;
  rank = 0;
  for (nb::handle item : combine_inputs) {
    const std::string label = "combine_inputs[" + std::to_string(rank) + "]";
    nb::dict d = as_dict(item, label);
    flashep::oracle::CombineRankInput in;
    const size_t rows = rank < routed.size() ? static_cast<size_t>(routed[rank].num_recv_tokens) : 0;
    const size_t n = rank < rank_inputs.size() ? static_cast<size_t>(rank_inputs[rank].num_tokens) : 0;
    auto x = read_array<uint16_t>(get_item(d, "x"), label + "['x']", 2);
    require_shape(x, {rows, static_cast<size_t>(hidden)}, label + "['x']");
    in.x = std::move(x.data);
    nb::object weights = get_item(d, "topk_weights");
    if (!weights.is_none()) {
      auto w = read_array<float>(weights, label + "['topk_weights']", 2);
      require_shape(w, {rows, static_cast<size_t>(num_topk)}, label + "['topk_weights']");
      in.topk_weights = std::move(w.data);
    }
    for (const char* key : {"bias0", "bias1"}) {
      nb::object bias = get_item(d, key);
      if (bias.is_none()) continue;
      auto b = read_array<uint16_t>(bias, label + "['" + key + "']", 2);
      require_shape(b, {n, static_cast<size_t>(hidden)}, label + "['" + key + "']");
      (key[4] == '0' ? in.bias0 : in.bias1) = std::move(b.data);
    }
    inputs.push_back(std::move(in));
    ++rank;
  }
  const bool has_weights = num_topk > 0 && any_has(combine_inputs, "topk_weights");

  auto outputs = flashep::oracle::combine(shape, rank_inputs, routed, inputs);
  nb::list result;
  for (size_t r = 0; r < outputs.size(); ++r) {
    const size_t n = static_cast<size_t>(rank_inputs[r].num_tokens);
    auto& out = outputs[r];
    nb::dict d;
    d["combined_x"] = to_numpy<uint16_t>(std::move(out.combined_x), {n, static_cast<size_t>(hidden)});
    if (has_weights && out.combined_topk_weights.empty()) out.combined_topk_weights.assign(n * num_topk, 0.0f);
    d["combined_topk_weights"] =
        has_weights ? to_numpy<float>(std::move(out.combined_topk_weights), {n, static_cast<size_t>(num_topk)})
                    : nb::none();
    result.append(d);
  }
  return result;
}

// ---- Runtime (flashep::Buffer) -------------------------------------------------------------------

void runtime_init(Buffer* self, int rank, int num_ranks, int nvl_domain_size, size_t num_nvl_bytes,
                  size_t num_rdma_bytes, int device, double timeout_s, uint32_t initial_counter,
                  bool low_latency_mode, bool allow_nvlink_for_low_latency, bool enable_shrink) {
  flashep::BufferOptions options;
  options.rank = rank;
  options.num_ranks = num_ranks;
  options.nvl_domain_size = nvl_domain_size;
  options.num_nvl_bytes = num_nvl_bytes;
  options.num_rdma_bytes = num_rdma_bytes;
  options.device = device;
  options.timeout_s = timeout_s;
  options.initial_counter = initial_counter;
  options.low_latency_mode = low_latency_mode;
  options.allow_nvlink_for_low_latency = allow_nvlink_for_low_latency;
  options.enable_shrink = enable_shrink;
  nb::gil_scoped_release release;
  new (self) Buffer(options);
}

nb::bytes runtime_bootstrap_message(const Buffer& self) {
  const std::vector<uint8_t> message = self.bootstrap_message();
  return nb::bytes(message.data(), message.size());
}

bool runtime_bootstrap_receive(Buffer& self, const std::vector<nb::bytes>& messages) {
  std::vector<std::vector<uint8_t>> all;
  all.reserve(messages.size());
  for (const nb::bytes& m : messages) {
    const auto* begin = static_cast<const uint8_t*>(m.data());
    all.emplace_back(begin, begin + m.size());
  }
  nb::gil_scoped_release release;
  return self.bootstrap_receive(all);
}

std::pair<int, std::vector<int>> runtime_wait_recv_counts(Buffer& self) {
  flashep::RecvCounts counts = self.wait_recv_counts();
  return {counts.num_recv_tokens, std::move(counts.num_recv_tokens_per_expert)};
}

/// The handle of a Python dispatch (tensor pointers and their sizes). Python's handle is DeepEP's
/// tuple of tensors and carries no buffer id: the Python layer checks shapes and devices, and a
/// handle it passes belongs to this buffer by construction.
flashep::DispatchHandle make_handle(const Buffer& self, uintptr_t rank_prefix_matrix, uintptr_t channel_prefix_matrix,
                                    uintptr_t recv_channel_prefix_matrix, uintptr_t recv_src_idx,
                                    uintptr_t is_token_in_rank, uintptr_t send_head, int num_channels, int num_tokens,
                                    int num_recv_tokens) {
  flashep::DispatchHandle h;
  h.rank_prefix_matrix = as_ptr<int>(rank_prefix_matrix);
  h.channel_prefix_matrix = as_ptr<int>(channel_prefix_matrix);
  h.recv_channel_prefix_matrix = as_ptr<int>(recv_channel_prefix_matrix);
  h.recv_src_idx = as_ptr<int>(recv_src_idx);
  h.is_token_in_rank = as_ptr<const bool>(is_token_in_rank);
  h.send_head = as_ptr<int>(send_head);
  h.num_ranks = self.nvl_domain_size();
  h.num_channels = num_channels;
  h.num_tokens = num_tokens;
  h.num_recv_tokens = num_recv_tokens;
  h.buffer_id = self.id();
  return h;
}

void runtime_get_dispatch_layout(Buffer& self, uintptr_t topk_idx, int num_tokens, int num_topk, int num_experts,
                                 uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_rdma_rank,
                                 uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank, uintptr_t stream) {
  flashep::LayoutArgs a;
  a.topk_idx = as_ptr<const int64_t>(topk_idx);
  a.num_tokens = num_tokens;
  a.num_topk = num_topk;
  a.num_experts = num_experts;
  a.num_tokens_per_rank = as_ptr<int>(num_tokens_per_rank);
  a.num_tokens_per_rdma_rank = as_ptr<int>(num_tokens_per_rdma_rank);
  a.num_tokens_per_expert = as_ptr<int>(num_tokens_per_expert);
  a.is_token_in_rank = as_ptr<bool>(is_token_in_rank);
  self.get_dispatch_layout(a, as_stream(stream));
}

void runtime_notify_dispatch(Buffer& self, uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_expert,
                             uintptr_t is_token_in_rank, uintptr_t topk_idx, int num_tokens, int num_experts,
                             int expert_alignment, int num_worst_tokens, uintptr_t rank_prefix_matrix,
                             uintptr_t channel_prefix_matrix, uintptr_t recv_channel_prefix_matrix,
                             const Config& config, int hidden, DType dtype, int num_topk, uintptr_t stream) {
  flashep::DispatchHandle handle = make_handle(self, rank_prefix_matrix, channel_prefix_matrix,
                                               recv_channel_prefix_matrix, 0, is_token_in_rank, 0,
                                               self.num_channels(config), num_tokens, 0);
  flashep::NotifyDispatchArgs a;
  a.num_tokens_per_rank = as_ptr<const int>(num_tokens_per_rank);
  a.num_tokens_per_expert = as_ptr<const int>(num_tokens_per_expert);
  a.topk_idx = as_ptr<const int64_t>(topk_idx);
  a.num_tokens = num_tokens;
  a.num_experts = num_experts;
  a.expert_alignment = expert_alignment;
  a.num_worst_tokens = num_worst_tokens;
  a.hidden = hidden;
  a.dtype = dtype;
  a.num_topk = num_topk;
  a.config = config;
  a.handle = &handle;
  self.notify_dispatch(a, as_stream(stream));
}

void runtime_dispatch(Buffer& self, uintptr_t x, DType dtype, int num_tokens, int hidden, uintptr_t x_scales,
                      int64_t scale_token_stride, int64_t scale_hidden_stride, uintptr_t topk_idx,
                      uintptr_t topk_weights, int num_topk, int num_experts, uintptr_t is_token_in_rank,
                      uintptr_t rank_prefix_matrix, uintptr_t channel_prefix_matrix,
                      uintptr_t recv_channel_prefix_matrix, int num_output_rows, bool worst_case_mode, bool cached,
                      uintptr_t recv_x, uintptr_t recv_x_scales, uintptr_t recv_topk_idx,
                      uintptr_t recv_topk_weights, uintptr_t recv_src_idx, uintptr_t send_head,
                      const Config& config, uintptr_t stream) {
  flashep::DispatchHandle handle =
      make_handle(self, rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank, send_head, self.num_channels(config), num_tokens, num_output_rows);
  flashep::DispatchArgs a;
  a.x = as_ptr<const void>(x);
  a.dtype = dtype;
  a.num_tokens = num_tokens;
  a.hidden = hidden;
  a.x_scales = as_ptr<const float>(x_scales);
  a.scale_token_stride = scale_token_stride;
  a.scale_hidden_stride = scale_hidden_stride;
  a.topk_idx = as_ptr<const int64_t>(topk_idx);
  a.topk_weights = as_ptr<const float>(topk_weights);
  a.num_topk = num_topk;
  a.num_experts = num_experts;
  a.num_output_rows = num_output_rows;
  a.worst_case_mode = worst_case_mode;
  a.cached = cached;
  a.handle = &handle;
  a.recv_x = as_ptr<void>(recv_x);
  a.recv_x_scales = as_ptr<float>(recv_x_scales);
  a.recv_topk_idx = as_ptr<int64_t>(recv_topk_idx);
  a.recv_topk_weights = as_ptr<float>(recv_topk_weights);
  a.config = config;
  self.dispatch(a, as_stream(stream));
}

void runtime_combine(Buffer& self, uintptr_t x, int num_recv_tokens, int hidden, uintptr_t topk_weights,
                     int num_topk, uintptr_t bias0, uintptr_t bias1, uintptr_t rank_prefix_matrix,
                     uintptr_t channel_prefix_matrix, uintptr_t recv_channel_prefix_matrix,
                     uintptr_t is_token_in_rank, uintptr_t send_head, int num_tokens, int num_channels,
                     uintptr_t combined_x, uintptr_t combined_topk_weights, const Config& config, uintptr_t stream) {
  const flashep::DispatchHandle handle =
      make_handle(self, rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, 0, is_token_in_rank,
                  send_head, num_channels, num_tokens, num_recv_tokens);
  flashep::CombineArgs a;
  a.x = as_ptr<const void>(x);
  a.hidden = hidden;
  a.topk_weights = as_ptr<const float>(topk_weights);
  a.num_topk = num_topk;
  a.bias0 = as_ptr<const void>(bias0);
  a.bias1 = as_ptr<const void>(bias1);
  a.handle = &handle;
  a.combined_x = as_ptr<void>(combined_x);
  a.combined_topk_weights = as_ptr<float>(combined_topk_weights);
  a.config = config;
  self.combine(a, as_stream(stream));
}

const char* transport_name(flashep::PeerTransport t) {
  switch (t) {
    case flashep::PeerTransport::kSelf: return "self";
    case flashep::PeerTransport::kNvlink: return "nvlink";
    case flashep::PeerTransport::kNvshmem: return "nvshmem";
  }
  return "?";
}

nb::list runtime_check_transports(Buffer& self, size_t bytes_per_peer) {
  std::vector<flashep::PeerCheck> checks;
  {
    nb::gil_scoped_release release;
    checks = self.check_transports(bytes_per_peer);
  }
  nb::list out;
  for (const auto& c : checks) out.append(nb::make_tuple(c.peer, transport_name(c.transport), c.mismatched_words));
  return out;
}

// ---- module pieces -------------------------------------------------------------------------------

void bind_config(nb::module_& m) {
  nb::class_<Config>(m, "Config",
                     "Tuning of a high-throughput dispatch or combine (DeepEP V1 field names and defaults).\n"
                     "num_sms is the number of SMs the kernels occupy.")
      .def(nb::init<int, int, int, int, int>(), "num_sms"_a = 20, "num_max_nvl_chunked_send_tokens"_a = 6,
           "num_max_nvl_chunked_recv_tokens"_a = 256, "num_max_rdma_chunked_send_tokens"_a = 6,
           "num_max_rdma_chunked_recv_tokens"_a = 256)
      .def_rw("num_sms", &Config::num_sms)
      .def_rw("num_max_nvl_chunked_send_tokens", &Config::num_max_nvl_chunked_send_tokens)
      .def_rw("num_max_nvl_chunked_recv_tokens", &Config::num_max_nvl_chunked_recv_tokens)
      .def_rw("num_max_rdma_chunked_send_tokens", &Config::num_max_rdma_chunked_send_tokens)
      .def_rw("num_max_rdma_chunked_recv_tokens", &Config::num_max_rdma_chunked_recv_tokens)
      .def("get_nvl_buffer_size_hint", &Config::get_nvl_buffer_size_hint, "hidden_bytes"_a, "num_ranks"_a,
           "Bytes of NVLink buffer needed for rows of hidden_bytes (= H * max(element size, 2)) and num_ranks "
           "ranks in one NVLink domain.")
      .def("get_rdma_buffer_size_hint", &Config::get_rdma_buffer_size_hint, "hidden_bytes"_a, "num_ranks"_a,
           "nvl_domain_size"_a = 8, "Bytes of RDMA buffer needed; 0 when all ranks fit in one NVLink domain.")
      .def("validate", &Config::validate, "Raises ValueError when a field is out of range.")
      .def("__repr__", &config_repr);

  nb::enum_<DType>(m, "DType", "Element type of a dispatched payload.")
      .value("bfloat16", DType::kBFloat16)
      .value("float8_e4m3", DType::kFloat8E4M3);

  m.def("num_channels", &flashep::num_channels, "num_sms"_a, "num_nvl_ranks"_a,
        "Number of channels C of a dispatch/combine (the second dimension of the channel prefix matrices).");
  m.def("default_dispatch_config", &flashep::default_dispatch_config, "num_ranks"_a, "num_sms"_a);
  m.def("default_combine_config", &flashep::default_combine_config, "num_ranks"_a, "num_sms"_a);
}

void bind_runtime(nb::module_& m) {
  nb::class_<Buffer>(m, "Runtime",
                     "flashep::Buffer: one rank's communication buffer. Construct it, then repeat "
                     "done = bootstrap_receive(all-gather(bootstrap_message())) until done. Pointers are ints "
                     "(0 = null), streams are cudaStream_t values as ints.")
      .def("__init__", &runtime_init, "rank"_a, "num_ranks"_a, "nvl_domain_size"_a = 0, "num_nvl_bytes"_a = 0,
           "num_rdma_bytes"_a = 0, "device"_a = -1, "timeout_s"_a = 0.0, "initial_counter"_a = 0,
           "low_latency_mode"_a = false, "allow_nvlink_for_low_latency"_a = true, "enable_shrink"_a = false)
      .def("bootstrap_message", &runtime_bootstrap_message,
           "This rank's message (bytes) of the current bootstrap round, to be all-gathered.")
      .def("bootstrap_receive", &runtime_bootstrap_receive, "messages"_a,
           "Takes every rank's message of the round (rank order); True once connected.")
      .def("is_available", &Buffer::is_available)
      .def("destroy", &Buffer::destroy, "collective"_a = false, release_gil(),
           "Frees everything (idempotent). collective=True (every rank destroys together) also frees the "
           "NVSHMEM region.")
      .def_prop_ro("rank", &Buffer::rank)
      .def_prop_ro("num_ranks", &Buffer::num_ranks)
      .def_prop_ro("nvl_domain_size", &Buffer::nvl_domain_size)
      .def_prop_ro("device", &Buffer::device)
      .def_prop_ro("num_nvl_bytes", &Buffer::num_nvl_bytes)
      .def_prop_ro("num_rdma_bytes", &Buffer::num_rdma_bytes)
      .def_prop_ro("timeout_s", &Buffer::timeout_s)
      .def_prop_ro("id", &Buffer::id)
      .def_prop_ro("comm_stream", [](const Buffer& b) { return as_int(b.comm_stream()); },
                   "The buffer's own non-blocking stream (cudaStream_t as int).")
      .def_prop_ro("local_nvl_buffer", [](const Buffer& b) { return as_int(b.local_nvl_buffer()); },
                   "Device pointer (int) of this rank's NVLink buffer of num_nvl_bytes bytes.")
      .def("peer_transport", [](const Buffer& b, int peer) { return transport_name(b.peer_transport(peer)); },
           "peer"_a, "'self', 'nvlink' or 'nvshmem': how this rank reaches `peer`.")
      .def("num_channels", &Buffer::num_channels, "config"_a)
      .def("get_dispatch_layout", &runtime_get_dispatch_layout, nb::kw_only(), "topk_idx"_a = 0, "num_tokens"_a,
           "num_topk"_a, "num_experts"_a, "num_tokens_per_rank"_a = 0, "num_tokens_per_rdma_rank"_a = 0,
           "num_tokens_per_expert"_a = 0, "is_token_in_rank"_a = 0, "stream"_a, release_gil())
      .def("notify_dispatch", &runtime_notify_dispatch, nb::kw_only(), "num_tokens_per_rank"_a = 0,
           "num_tokens_per_expert"_a = 0, "is_token_in_rank"_a = 0, "topk_idx"_a = 0, "num_tokens"_a,
           "num_experts"_a, "expert_alignment"_a = 1, "num_worst_tokens"_a = 0, "rank_prefix_matrix"_a = 0,
           "channel_prefix_matrix"_a = 0, "recv_channel_prefix_matrix"_a = 0, "config"_a, "hidden"_a,
           "dtype"_a = DType::kBFloat16, "num_topk"_a = 0, "stream"_a, release_gil())
      .def("wait_recv_counts", &runtime_wait_recv_counts, release_gil(),
           "Bounded host poll for the counts of the last notify_dispatch: (num_recv_tokens, "
           "num_recv_tokens_per_expert list).")
      .def("dispatch", &runtime_dispatch, nb::kw_only(), "x"_a = 0, "dtype"_a = DType::kBFloat16, "num_tokens"_a,
           "hidden"_a, "x_scales"_a = 0, "scale_token_stride"_a = 0, "scale_hidden_stride"_a = 0,
           "topk_idx"_a = 0, "topk_weights"_a = 0, "num_topk"_a = 0, "num_experts"_a = 0,
           "is_token_in_rank"_a = 0, "rank_prefix_matrix"_a = 0, "channel_prefix_matrix"_a = 0,
           "recv_channel_prefix_matrix"_a = 0, "num_output_rows"_a, "worst_case_mode"_a = false,
           "cached"_a = false, "recv_x"_a = 0, "recv_x_scales"_a = 0, "recv_topk_idx"_a = 0,
           "recv_topk_weights"_a = 0, "recv_src_idx"_a = 0, "send_head"_a = 0, "config"_a, "stream"_a,
           release_gil())
      .def("combine", &runtime_combine, nb::kw_only(), "x"_a = 0, "num_recv_tokens"_a, "hidden"_a,
           "topk_weights"_a = 0, "num_topk"_a = 0, "bias0"_a = 0, "bias1"_a = 0, "rank_prefix_matrix"_a = 0,
           "channel_prefix_matrix"_a = 0, "recv_channel_prefix_matrix"_a = 0, "is_token_in_rank"_a = 0,
           "send_head"_a = 0, "num_tokens"_a, "num_channels"_a, "combined_x"_a = 0, "combined_topk_weights"_a = 0,
           "config"_a, "stream"_a, release_gil())
      .def("check_transports", &runtime_check_transports, "bytes_per_peer"_a = 1 << 20,
           "Collective: exchanges a pattern with every peer through its transport; returns a list of (peer, "
           "transport, mismatched 32-bit words).")
      .def("probe_put_bandwidth",
           [](Buffer& self, int peer, size_t bytes, int num_blocks, uintptr_t stream) {
             self.probe_put_bandwidth(peer, bytes, num_blocks, as_stream(stream));
           },
           "peer"_a, "bytes"_a, "num_blocks"_a, "stream"_a, release_gil(),
           "Benchmark diagnostic: the last `bytes` of this rank's NVSHMEM region put into `peer`'s (enqueued).")
      .def("check", &Buffer::check, "Raises if a kernel recorded an error (or the buffer is poisoned).");
  m.def("nvshmem_built", &Buffer::nvshmem_built, "Whether this build has the NVSHMEM transport.");
}

}  // namespace

void bind_low_latency_oracle(nb::module_& m);  // oracle_low_latency.cpp
void bind_low_latency(nb::module_& m);         // low_latency_bindings.cpp
void bind_internode(nb::module_& m);           // internode_bindings.cpp

namespace {

void bind_oracle(nb::module_& m) {
  m.def("oracle_bf16_to_float", &flashep::oracle::bf16_to_float, "value"_a);
  m.def("oracle_float_to_bf16", &flashep::oracle::float_to_bf16, "value"_a);
  m.def("oracle_get_dispatch_layout", &oracle_get_dispatch_layout, "topk_idx"_a, "num_experts"_a, "num_ranks"_a,
        "nvl_domain_size"_a,
        "CPU layout of one rank: topk_idx int64[n, K] -> (num_tokens_per_rank int32[R], num_tokens_per_rdma_rank "
        "int32[R / nvl_domain_size], num_tokens_per_expert int32[E], is_token_in_rank bool[n, R]).");
  m.def("oracle_dispatch", &oracle_dispatch, "num_ranks"_a, "hidden"_a, "elem_size"_a, "has_scales"_a,
        "num_topk"_a, "num_experts"_a, "expert_alignment"_a, "inputs"_a,
        "CPU dispatch of the whole world. inputs[r] is a dict of rank r: 'x' uint8[n, H*elem_size], 'x_scales' "
        "float32[n, H/128] or None, 'topk_idx' int64[n, K], 'topk_weights' float32[n, K] or None. Returns one "
        "dict per rank: 'num_recv_tokens', 'recv_x' uint8, 'recv_x_scales' float32 or None, 'recv_topk_idx' "
        "int64, 'recv_topk_weights' float32 or None, 'recv_src_idx' int32, 'num_recv_tokens_per_expert' list, "
        "'rank_prefix_matrix' int32[R, R].");
  m.def("oracle_combine", &oracle_combine, "num_ranks"_a, "hidden"_a, "num_topk"_a, "dispatch_inputs"_a,
        "dispatch_outputs"_a, "combine_inputs"_a, nb::kw_only(), "num_experts"_a = 0,
        "CPU combine of the whole world. combine_inputs[r]: 'x' uint16 (bf16 bits)[num_recv, H], 'topk_weights' "
        "float32[num_recv, K] or None, 'bias0'/'bias1' uint16[n, H] or None. Returns one dict per rank: "
        "'combined_x' uint16[n, H], 'combined_topk_weights' float32[n, K] or None. num_experts=0 infers E from "
        "the length of dispatch_outputs[0]['num_recv_tokens_per_expert'] times num_ranks.");
}

/// Python exceptions of flashep::Error's kinds: ValueError for invalid arguments, a FlashepError
/// (RuntimeError) subclass for every runtime kind; FlashepUnsupportedError is a NotImplementedError too.
struct ErrorTypes {
  PyObject* base = nullptr;
  PyObject* by_kind[8] = {};
};
ErrorTypes& error_types() {
  static ErrorTypes types;
  return types;
}

void bind_errors(nb::module_& m) {
  ErrorTypes& t = error_types();
  t.base = PyErr_NewExceptionWithDoc("flashep._C.FlashepError",
                                     "Every runtime error of flashep (a RuntimeError).", PyExc_RuntimeError, nullptr);
  m.attr("FlashepError") = nb::handle(t.base);
  auto sub = [&](flashep::ErrorKind kind, const char* name, const char* doc, PyObject* extra_base) {
    PyObject* bases = extra_base ? PyTuple_Pack(2, t.base, extra_base) : PyTuple_Pack(1, t.base);
    const std::string qualified = std::string("flashep._C.") + name;
    PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
    Py_DECREF(bases);
    t.by_kind[static_cast<int>(kind)] = type;
    m.attr(name) = nb::handle(type);
  };
  sub(flashep::ErrorKind::kTimeout, "FlashepTimeoutError", "A bounded wait (GPU or host) expired.", nullptr);
  sub(flashep::ErrorKind::kPeerMismatch, "FlashepPeerMismatchError",
      "The ranks disagree on a call or on the buffer.", nullptr);
  sub(flashep::ErrorKind::kPeerFailed, "FlashepPeerFailedError",
      "Another rank failed and aborted the buffer (its own error says why).", nullptr);
  sub(flashep::ErrorKind::kDeviceFault, "FlashepDeviceFaultError",
      "Bad input found on the GPU, or a CUDA error.", nullptr);
  sub(flashep::ErrorKind::kPoisoned, "FlashepPoisonedError",
      "The buffer failed earlier; destroy it and create a new one.", nullptr);
  sub(flashep::ErrorKind::kUnsupported, "FlashepUnsupportedError",
      "Not built in (e.g. NVSHMEM) or not implemented yet.", PyExc_NotImplementedError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const flashep::Error& e) {
      const int kind = static_cast<int>(e.kind());
      PyObject* type = e.kind() == flashep::ErrorKind::kInvalidArgument ? PyExc_ValueError
                       : (kind > 0 && kind < 8 && error_types().by_kind[kind]) ? error_types().by_kind[kind]
                                                                               : error_types().base;
      PyErr_SetString(type, e.what());
    }
  });
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "flashep C++ core (torch-free): Config, Runtime (flashep::Buffer), errors and the CPU oracle.";
  bind_errors(m);
  bind_config(m);
  bind_runtime(m);
  bind_oracle(m);
  bind_low_latency_oracle(m);
  bind_low_latency(m);
  bind_internode(m);
  m.attr("kMaxNvlRanks") = flashep::kMaxNvlRanks;
  m.attr("kMaxTopk") = flashep::kMaxTopk;
  m.attr("kMaxLocalExperts") = flashep::kMaxLocalExperts;
  m.attr("kMaxChannels") = flashep::kMaxChannels;
  m.attr("kMaxExpertAlignment") = flashep::kMaxExpertAlignment;
}
