// The multi-node stages of flashep::Buffer (docs/design.md, "Multi-node: the first version"):
// validate -> params -> launch. So far the rail stage, exposed for its tests
// (Buffer::internode_rail_exchange) until the multi-node dispatch calls it.
#include <string>

#include "core/buffer_impl.hpp"
#include "core/cuda_check.hpp"
#include "core/internode_compose.hpp"
#include "kernels/rail_launch.hpp"

namespace flashep {

namespace {

RailRegion rail_region_for(int num_ranks, int nvl_domain_size, int max_tokens, int hidden, DType dtype, int num_topk) {
  return make_rail_region(num_ranks / nvl_domain_size, max_tokens, hidden, num_topk, dtype == DType::kFloat8E4M3,
                          num_ranks);
}

}  // namespace

void BufferImpl::internode_rail_exchange(const RailExchangeArgs& a, cudaStream_t stream) {
  const char* op = "internode_rail_exchange";
  require_usable(op);
  const std::string o(op);
  if (num_nodes_ < 2 || !sym_)
    throw_error(ErrorKind::kUnsupported, o + ": needs several NVLink domains (num_ranks " + str(options_.num_ranks) +
                                             ", domains of " + str(nvl_domain_size_) +
                                             ") and an NVSHMEM region (num_rdma_bytes > 0, a build with NVSHMEM)");
  require(num_nodes_ <= kMaxNodes, o + ": more than " + str(kMaxNodes) + " nodes");
  require(a.hidden > 0 && a.hidden % 128 == 0, o + ": hidden must be a positive multiple of 128, got " + str(a.hidden));
  require(a.max_tokens >= 1 && a.max_tokens <= kMaxRailTokens,
          o + ": max_tokens must be in [1, " + str(kMaxRailTokens) + "], got " + str(a.max_tokens));
  require(a.num_tokens >= 0 && a.num_tokens <= a.max_tokens,
          o + ": num_tokens " + str(a.num_tokens) + " is not in [0, max_tokens " + str(a.max_tokens) + "]");
  require(a.num_topk >= 0 && a.num_topk <= kMaxTopk, o + ": num_topk must be in [0, " + str(kMaxTopk) + "]");
  require(a.num_experts >= options_.num_ranks && a.num_experts % options_.num_ranks == 0,
          o + ": num_experts must be a positive multiple of num_ranks");
  require(a.num_tokens == 0 || (a.x != nullptr && a.is_token_in_rank != nullptr), o + ": x or is_token_in_rank is null");
  require(a.num_topk == 0 || a.num_tokens == 0 || a.topk_idx != nullptr, o + ": topk_idx is null with num_topk > 0");
  require(a.dtype == DType::kBFloat16 || a.num_tokens == 0 || a.x_scales != nullptr, o + ": fp8 x needs x_scales");
  require(a.rail_slot != nullptr && a.rail_count != nullptr, o + ": the scratch rail_slot / rail_count is null");
  require(a.fwd_x && a.fwd_in_rank && a.fwd_source && a.fwd_counts && (a.num_topk == 0 || a.fwd_topk_idx) &&
              (a.dtype == DType::kBFloat16 || a.fwd_scales),
          o + ": an output pointer is null");
  require(a.num_sms >= 0 && a.num_sms <= num_device_sms_, o + ": num_sms must be in [0, the device's SMs]");
  const RailRegion region = rail_region_for(options_.num_ranks, nvl_domain_size_, a.max_tokens, a.hidden, a.dtype, a.num_topk);
  require(region.end <= rdma_layout_.data_bytes,
          o + ": num_rdma_bytes " + str(rdma_layout_.data_bytes) + " is too small (" + str(region.end) +
              " bytes needed; Buffer::internode_rail_bytes)");

  const NodeShape shape{options_.num_ranks, nvl_domain_size_};
  const int blocks = a.num_sms > 0 ? a.num_sms : num_device_sms_;
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));

  kernels::RailPlanParams plan{};
  plan.comm = device_comm();
  plan.shape = shape;
  plan.is_token_in_rank = a.is_token_in_rank;
  plan.num_tokens = a.num_tokens;
  plan.rail_slot = a.rail_slot;
  plan.rail_count = a.rail_count;
  launch_check(kernels::launch_rail_plan(plan, stream), op);

  kernels::RailSendParams send{};
  send.comm = plan.comm;
  send.shape = shape;
  send.region = region;
  send.x = a.x;
  send.x_scales = a.x_scales;
  send.scale_token_stride = a.scale_token_stride;
  send.scale_hidden_stride = a.scale_hidden_stride;
  send.topk_idx = a.topk_idx;
  send.topk_weights = a.topk_weights;
  send.is_token_in_rank = a.is_token_in_rank;
  send.rail_slot = a.rail_slot;
  send.rail_count = a.rail_count;
  send.num_tokens = a.num_tokens;
  send.hidden = a.hidden;
  send.num_topk = a.num_topk;
  send.fp8 = a.dtype == DType::kFloat8E4M3 ? 1 : 0;
  launch_check(kernels::launch_rail_send(send, blocks, stream), op);

  kernels::RailReceiveParams receive{};
  receive.comm = plan.comm;
  receive.shape = shape;
  receive.region = region;
  receive.hidden = a.hidden;
  receive.num_topk = a.num_topk;
  receive.num_local_experts = a.num_experts / options_.num_ranks;
  receive.fp8 = send.fp8;
  receive.fwd_x = a.fwd_x;
  receive.fwd_scales = a.fwd_scales;
  receive.fwd_topk_idx = a.fwd_topk_idx;
  receive.fwd_topk_weights = a.fwd_topk_weights;
  receive.fwd_in_rank = a.fwd_in_rank;
  receive.fwd_source = a.fwd_source;
  receive.fwd_counts = a.fwd_counts;
  launch_check(kernels::launch_rail_receive(receive, blocks, stream), op);
}

// ---- Buffer forwarding ---------------------------------------------------------------------------

void Buffer::internode_rail_exchange(const RailExchangeArgs& args, cudaStream_t stream) {
  impl_->internode_rail_exchange(args, stream);
}

size_t Buffer::internode_rail_bytes(int num_ranks, int nvl_domain_size, int max_tokens, int hidden, DType dtype,
                                    int num_topk) {
  if (num_ranks < 1 || nvl_domain_size < 1 || num_ranks % nvl_domain_size != 0 || max_tokens < 1 || hidden < 1 ||
      num_topk < 0 || num_topk > kMaxTopk)
    throw_error(ErrorKind::kInvalidArgument, "internode_rail_bytes: bad arguments");
  return static_cast<size_t>(rail_region_for(num_ranks, nvl_domain_size, max_tokens, hidden, dtype, num_topk).end);
}

}  // namespace flashep
