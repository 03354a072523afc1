// The multi-node stages of flashep::Buffer (docs/design.md, "Multi-node: the first version"):
// validate -> params -> launch: the rail stage (exchange and return) and the reordering, which the
// Python package composes with the single-node operations (python/flashep/internode.py).
#include <string>

#include "core/buffer_impl.hpp"
#include "core/cuda_check.hpp"
#include "core/internode_compose.hpp"
#include "kernels/compose_launch.hpp"
#include "kernels/rail_launch.hpp"

namespace flashep {

namespace {

RailRegion rail_region_for(int num_ranks, int nvl_domain_size, int max_tokens, int hidden, DType dtype, int num_topk) {
  return make_rail_region(num_ranks / nvl_domain_size, max_tokens, hidden, num_topk, dtype == DType::kFloat8E4M3,
                          num_ranks);
}

/// What both rail calls (the exchange and the combine's return) check, derive and set up the same way: a
/// multi-node, non-low-latency buffer with an NVSHMEM region; the call's shape; the rail region of
/// the dispatch's (dtype, top-k), which must fit in num_rdma_bytes; the launch's blocks.
struct RailCall {
  RailRegion region;
  NodeShape shape;
  int blocks;
};
RailCall prepare_rail_call(BufferImpl& b, const std::string& o, int hidden, int max_tokens, int num_tokens,
                         DType dispatch_dtype, int dispatch_num_topk, int num_sms) {
  const int R = b.options_.num_ranks, M = b.nvl_domain_size_;
  if (b.num_nodes_ < 2 || !b.sym_)
    throw_error(ErrorKind::kUnsupported, o + ": needs several NVLink domains (num_ranks " + str(R) + ", domains of " +
                                             str(M) + ") and an NVSHMEM region (num_rdma_bytes > 0, a build with NVSHMEM)");
  if (b.options_.low_latency_mode)  // the low-latency region starts where the rail region does
    throw_error(ErrorKind::kUnsupported, o + ": not on a low-latency buffer (low_latency_mode=True): use a separate Buffer");
  FLASHEP_REQUIRE(b.num_nodes_ <= kMaxNodes, o + ": more than " + str(kMaxNodes) + " nodes");
  FLASHEP_REQUIRE(hidden > 0 && hidden % 128 == 0, o + ": hidden must be a positive multiple of 128, got " + str(hidden));
  FLASHEP_REQUIRE(max_tokens >= 1 && max_tokens <= kMaxRailTokens,
          o + ": max_tokens must be in [1, " + str(kMaxRailTokens) + "], got " + str(max_tokens));
  FLASHEP_REQUIRE(num_tokens >= 0 && num_tokens <= max_tokens,
          o + ": num_tokens " + str(num_tokens) + " is not in [0, max_tokens " + str(max_tokens) + "]");
  FLASHEP_REQUIRE(dispatch_num_topk >= 0 && dispatch_num_topk <= kMaxTopk, o + ": num_topk must be in [0, " + str(kMaxTopk) + "]");
  FLASHEP_REQUIRE(num_sms >= 0 && num_sms <= b.num_device_sms_, o + ": num_sms must be in [0, the device's SMs]");
  const RailRegion region = rail_region_for(R, M, max_tokens, hidden, dispatch_dtype, dispatch_num_topk);
  FLASHEP_REQUIRE(region.end <= b.rdma_layout_.data_bytes,
          o + ": num_rdma_bytes " + str(b.rdma_layout_.data_bytes) + " is too small (" + str(region.end) +
              " bytes needed; Buffer::internode_rail_bytes)");
  FLASHEP_CUDA_CHECK(cudaSetDevice(b.device_));
  return RailCall{region, NodeShape{R, M}, num_sms > 0 ? num_sms : b.num_device_sms_};
}

}  // namespace

void BufferImpl::internode_rail_exchange(const RailExchangeArgs& a, cudaStream_t stream) {
  const char* op = "internode_rail_exchange";
  require_usable(op);
  const std::string o(op);
  const RailCall call = prepare_rail_call(*this, o, a.hidden, a.max_tokens, a.num_tokens, a.dtype, a.num_topk, a.num_sms);
  FLASHEP_REQUIRE(a.num_experts >= options_.num_ranks && a.num_experts % options_.num_ranks == 0,
          o + ": num_experts must be a positive multiple of num_ranks");
  FLASHEP_REQUIRE(a.num_tokens == 0 || (a.x != nullptr && a.is_token_in_rank != nullptr), o + ": x or is_token_in_rank is null");
  FLASHEP_REQUIRE(a.num_topk == 0 || a.num_tokens == 0 || a.topk_idx != nullptr, o + ": topk_idx is null with num_topk > 0");
  FLASHEP_REQUIRE(a.dtype == DType::kBFloat16 || a.num_tokens == 0 || a.x_scales != nullptr, o + ": fp8 x needs x_scales");
  FLASHEP_REQUIRE(a.rail_slot != nullptr && a.rail_count != nullptr, o + ": the scratch rail_slot / rail_count is null");
  FLASHEP_REQUIRE(a.fwd_x && a.fwd_in_rank && a.fwd_source && a.fwd_counts && (a.num_topk == 0 || a.fwd_topk_idx) &&
              (a.dtype == DType::kBFloat16 || a.fwd_scales),
          o + ": an output pointer is null");
  const RailRegion& region = call.region;
  const NodeShape& shape = call.shape;
  const int blocks = call.blocks;

  kernels::RailPlanParams plan{};
  plan.comm = device_comm();
  plan.shape = shape;
  plan.is_token_in_rank = a.is_token_in_rank;
  plan.num_tokens = a.num_tokens;
  plan.topk_idx = a.num_topk > 0 ? a.topk_idx : nullptr;
  plan.num_topk = a.num_topk;
  plan.num_experts = a.num_experts;
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
  send.call_hash = rail_call_hash(1, a.max_tokens, a.hidden, send.fp8, a.num_topk);
  launch_check(kernels::launch_rail_send(send, blocks, stream), op);

  kernels::RailReceiveParams receive{};
  receive.comm = plan.comm;
  receive.shape = shape;
  receive.region = region;
  receive.hidden = a.hidden;
  receive.num_topk = a.num_topk;
  receive.num_local_experts = a.num_experts / options_.num_ranks;
  receive.fp8 = send.fp8;
  receive.call_hash = send.call_hash;
  receive.fwd_x = a.fwd_x;
  receive.fwd_scales = a.fwd_scales;
  receive.fwd_topk_idx = a.fwd_topk_idx;
  receive.fwd_topk_weights = a.fwd_topk_weights;
  receive.fwd_in_rank = a.fwd_in_rank;
  receive.fwd_source = a.fwd_source;
  receive.fwd_counts = a.fwd_counts;
  launch_check(kernels::launch_rail_receive(receive, blocks, stream), op);
}

void BufferImpl::internode_reorder_plan(const InternodeReorderPlanArgs& a, cudaStream_t stream) {
  const char* op = "internode_reorder_plan";
  require_usable(op);
  const std::string o(op);
  FLASHEP_REQUIRE(num_nodes_ <= kMaxNodes, o + ": more than " + str(kMaxNodes) + " nodes");
  FLASHEP_REQUIRE(a.max_tokens >= 1 && a.max_tokens <= kMaxRailTokens, o + ": max_tokens out of range");
  FLASHEP_REQUIRE(a.rows >= 0, o + ": rows must be >= 0");
  // (A rank that receives nothing has rows == 0 and empty tensors, whose pointers may be null.)
  FLASHEP_REQUIRE(a.rank_prefix_matrix && a.recv_gbl_rank_prefix_sum && (a.rows == 0 || (a.final_row && a.recv_src_idx)),
          o + ": a pointer is null");
  kernels::ComposePlanParams p{};
  p.comm = device_comm();
  p.rank_prefix_matrix = a.rank_prefix_matrix;
  p.recv_src_idx = a.recv_src_idx;
  p.nvl_rank = options_.rank % nvl_domain_size_;
  p.nvl_size = nvl_domain_size_;
  p.num_nodes = num_nodes_;
  p.max_tokens = a.max_tokens;
  p.rows = a.rows;
  p.final_row = a.final_row;
  p.recv_gbl_rank_prefix_sum = a.recv_gbl_rank_prefix_sum;
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  launch_check(kernels::launch_compose_plan(p, stream), op);
}

void BufferImpl::internode_reorder_copy(const InternodeReorderCopyArgs& a, cudaStream_t stream) {
  const char* op = "internode_reorder_copy";
  require_usable(op);
  const std::string o(op);
  const bool fp8 = a.dtype == DType::kFloat8E4M3;
  FLASHEP_REQUIRE(a.rows >= 0 && a.hidden > 0 && a.hidden * dtype_size(a.dtype) % 16 == 0 && (!fp8 || a.hidden % 128 == 0),
          o + ": bad rows or hidden");
  FLASHEP_REQUIRE(a.num_topk >= 0 && a.num_topk <= kMaxTopk, o + ": num_topk out of range");
  FLASHEP_REQUIRE(a.rows == 0 || (a.final_row && a.src_x && a.dst_x), o + ": a pointer is null");
  FLASHEP_REQUIRE(!fp8 || a.rows == 0 || (a.src_scales && a.dst_scales), o + ": fp8 rows need scales");
  FLASHEP_REQUIRE((a.src_topk_idx == nullptr) == (a.dst_topk_idx == nullptr) &&
              (a.src_topk_weights == nullptr) == (a.dst_topk_weights == nullptr),
          o + ": top-k sources and destinations come in pairs");
  kernels::ComposeCopyParams p{};
  p.final_row = a.final_row;
  p.rows = a.rows;
  p.row_bytes = a.hidden * dtype_size(a.dtype);
  p.num_scales = fp8 ? a.hidden / 128 : 0;
  p.num_topk = a.num_topk;
  p.forward = a.forward;
  p.src_x = a.src_x;
  p.dst_x = a.dst_x;
  p.src_scales = a.src_scales;
  p.dst_scales = a.dst_scales;
  p.src_topk_idx = a.src_topk_idx;
  p.dst_topk_idx = a.dst_topk_idx;
  p.src_topk_weights = a.src_topk_weights;
  p.dst_topk_weights = a.dst_topk_weights;
  FLASHEP_CUDA_CHECK(cudaSetDevice(device_));
  launch_check(kernels::launch_compose_copy(p, num_device_sms_, stream), op);
}

void BufferImpl::internode_rail_return(const RailReturnArgs& a, cudaStream_t stream) {
  const char* op = "internode_rail_return";
  require_usable(op);
  const std::string o(op);
  const RailCall call = prepare_rail_call(*this, o, a.hidden, a.max_tokens, a.num_tokens, a.dispatch_dtype,
                                        a.dispatch_num_topk, a.num_sms);
  FLASHEP_REQUIRE(a.num_topk == 0 || a.num_topk == a.dispatch_num_topk, o + ": num_topk must be 0 or the dispatch's");
  FLASHEP_REQUIRE(a.combined_x && a.fwd_counts && a.rail_slot && (a.num_tokens == 0 || a.out_x), o + ": a pointer is null");
  const RailRegion& region = call.region;
  const NodeShape& shape = call.shape;
  const int blocks = call.blocks;

  kernels::RailReturnSendParams send{};
  send.comm = device_comm();
  send.shape = shape;
  send.region = region;
  send.combined_x = a.combined_x;
  send.combined_weights = a.num_topk > 0 ? a.combined_weights : nullptr;
  send.fwd_counts = a.fwd_counts;
  send.hidden = a.hidden;
  send.num_topk = a.dispatch_num_topk;
  launch_check(kernels::launch_rail_return_send(send, blocks, stream), op);

  kernels::RailReturnReceiveParams receive{};
  receive.comm = send.comm;
  receive.shape = shape;
  receive.region = region;
  receive.rail_slot = a.rail_slot;
  receive.num_tokens = a.num_tokens;
  receive.hidden = a.hidden;
  receive.num_topk = a.dispatch_num_topk;
  receive.bias0 = a.bias0;
  receive.bias1 = a.bias1;
  receive.combined_x = a.out_x;
  receive.combined_weights = a.num_topk > 0 ? a.out_weights : nullptr;
  launch_check(kernels::launch_rail_return_receive(receive, blocks, stream), op);
}

// ---- Buffer forwarding ---------------------------------------------------------------------------

void Buffer::internode_rail_exchange(const RailExchangeArgs& args, cudaStream_t stream) {
  impl_->internode_rail_exchange(args, stream);
}

void Buffer::internode_reorder_plan(const InternodeReorderPlanArgs& args, cudaStream_t stream) {
  impl_->internode_reorder_plan(args, stream);
}
void Buffer::internode_reorder_copy(const InternodeReorderCopyArgs& args, cudaStream_t stream) {
  impl_->internode_reorder_copy(args, stream);
}
void Buffer::internode_rail_return(const RailReturnArgs& args, cudaStream_t stream) {
  impl_->internode_rail_return(args, stream);
}

size_t Buffer::internode_rail_bytes(int num_ranks, int nvl_domain_size, int max_tokens, int hidden, DType dtype,
                                    int num_topk) {
  if (num_ranks < 1 || nvl_domain_size < 1 || num_ranks % nvl_domain_size != 0 || max_tokens < 1 || hidden < 1 ||
      num_topk < 0 || num_topk > kMaxTopk)
    throw_error(ErrorKind::kInvalidArgument, "internode_rail_bytes: bad arguments");
  return static_cast<size_t>(rail_region_for(num_ranks, nvl_domain_size, max_tokens, hidden, dtype, num_topk).end);
}

}  // namespace flashep
