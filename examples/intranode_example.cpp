// A torch-free, MPI-free use of the flashep C++ API: one process per local GPU (fork), an
// all-gather through shared memory, then layout -> notify -> dispatch -> combine on random routing,
// checking that combine(dispatch(x)) == x * (number of ranks each token went to); then the same
// routing through the low-latency mode (dispatch with the receive hook split in two launches,
// identity experts, weighted combine), checking combine == x * (sum of the token's weights).
//
//   flashep_example [num_ranks] [num_tokens] [hidden]
//
// Exits 0 with "skipped" when there are fewer GPUs than ranks (e.g. on a CI machine without GPU).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "flashep/buffer.hpp"

namespace {

#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    cudaError_t status_ = (call);                                                           \
    if (status_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(status_));          \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

/// Shared-memory all-gather for processes forked from one parent.
struct SharedExchange {
  std::atomic<int> arrived[2];
  std::atomic<int> generation;
  unsigned char data[16][1024];
};

struct ShmAllGather {
  SharedExchange* shm;
  int rank, num_ranks;
  void operator()(const void* mine, size_t bytes, void* all) const {
    if (bytes > sizeof(shm->data[0])) throw std::runtime_error("example all-gather: payload too large");
    std::memcpy(shm->data[rank], mine, bytes);
    barrier();
    for (int r = 0; r < num_ranks; ++r) std::memcpy(static_cast<char*>(all) + r * bytes, shm->data[r], bytes);
    barrier();
  }
  void barrier() const {
    const int gen = shm->generation.load();
    if (shm->arrived[gen & 1].fetch_add(1) + 1 == num_ranks) {
      shm->arrived[gen & 1].store(0);
      shm->generation.fetch_add(1);
    } else {
      // Bounded: a sibling that died must not freeze the others.
      for (int waited_ms = 0; shm->generation.load() == gen; waited_ms += 1) {
        if (waited_ms > 120000) throw std::runtime_error("example all-gather: timed out waiting for the other ranks");
        usleep(1000);
      }
    }
  }
};

void* device_alloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  return p;
}

/// The low-latency mode on the first `num_tokens` tokens of the same routing (weights 1 and 0.5 by
/// slot, so combine's weighting shows): every call here is graph-capturable.
int run_low_latency(int rank, int num_ranks, int num_tokens, int hidden, int num_experts, int num_topk,
                    const std::vector<int64_t>& topk_idx, const std::vector<__nv_bfloat16>& x, SharedExchange* shm) {
  const int R = num_ranks, T = num_tokens, L = num_experts / R, rows = R * T;
  flashep::BufferOptions options;
  options.rank = rank;
  options.num_ranks = R;
  options.low_latency_mode = true;
  options.num_rdma_bytes = flashep::low_latency_region_bytes_hint(T, hidden, R, num_experts);
  flashep::Buffer buffer(options, ShmAllGather{shm, rank, R});
  cudaStream_t stream = buffer.comm_stream();
  std::vector<float> weights(size_t(T) * num_topk);
  for (size_t i = 0; i < weights.size(); ++i) weights[i] = (i % 2 == 0) ? 1.0f : 0.5f;
  auto* d_x = static_cast<__nv_bfloat16*>(device_alloc(size_t(T) * hidden * 2));
  auto* d_topk_idx = static_cast<int64_t*>(device_alloc(size_t(T) * num_topk * 8));
  auto* d_weights = static_cast<float*>(device_alloc(weights.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_x, x.data(), size_t(T) * hidden * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_topk_idx, topk_idx.data(), size_t(T) * num_topk * 8, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_weights, weights.data(), weights.size() * 4, cudaMemcpyHostToDevice));
  // Outputs and the handle (DeepEP's src_info and layout_range, plus the combine plan).
  auto* d_recv_x = device_alloc(size_t(L) * rows * hidden * 2);
  auto* d_recv_count = static_cast<int*>(device_alloc(size_t(L) * 4));
  flashep::LowLatencyHandle handle;
  handle.src_info = static_cast<int*>(device_alloc(size_t(L) * rows * 4));
  handle.layout_range = static_cast<int64_t*>(device_alloc(size_t(L) * R * 8));
  handle.plan = static_cast<int*>(device_alloc(flashep::low_latency_plan_ints(R, T, num_topk) * 4));

  flashep::LowLatencyDispatchArgs dispatch;
  dispatch.x = d_x;
  dispatch.topk_idx = d_topk_idx;
  dispatch.num_tokens = T;
  dispatch.hidden = hidden;
  dispatch.num_topk = num_topk;
  dispatch.max_tokens = T;
  dispatch.num_experts = num_experts;
  dispatch.use_fp8 = false;  // BF16 rows: the check below is exact
  dispatch.recv_x = d_recv_x;
  dispatch.recv_count = d_recv_count;
  dispatch.handle = &handle;
  dispatch.call_slot = 0;
  dispatch.phases = flashep::kLowLatencySend;  // posts the data, holds no SM afterwards...
  buffer.low_latency_dispatch(dispatch, stream);
  dispatch.phases = flashep::kLowLatencyReceive;  // ...the "hook": finishes the receive
  buffer.low_latency_dispatch(dispatch, stream);

  auto* d_out = static_cast<__nv_bfloat16*>(device_alloc(size_t(T) * hidden * 2));
  flashep::LowLatencyCombineArgs combine;
  combine.x = d_recv_x;  // identity experts: their outputs are their inputs
  combine.topk_idx = d_topk_idx;
  combine.topk_weights = d_weights;
  combine.num_tokens = T;
  combine.handle = &handle;
  combine.call_slot = 1;
  combine.out = d_out;
  buffer.low_latency_combine(combine, stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  buffer.check();

  std::vector<__nv_bfloat16> out(size_t(T) * hidden);
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, out.size() * 2, cudaMemcpyDeviceToHost));
  long mismatches = 0;
  for (int t = 0; t < T; ++t) {
    float weight = 0.0f;
    for (int k = 0; k < num_topk; ++k)
      if (topk_idx[size_t(t) * num_topk + k] >= 0) weight += weights[size_t(t) * num_topk + k];
    for (int h = 0; h < hidden; ++h) {
      const size_t i = size_t(t) * hidden + h;
      mismatches += __bfloat162float(out[i]) != __bfloat162float(x[i]) * weight;  // small values: exact
    }
  }
  std::printf("rank %d: low-latency combine(dispatch(x)) %s (%ld mismatches)\n", rank,
              mismatches == 0 ? "OK" : "WRONG", mismatches);
  buffer.destroy();
  return mismatches == 0 ? 0 : 1;
}

int run_rank(int rank, int num_ranks, int num_tokens, int hidden, SharedExchange* shm) {
  CHECK_CUDA(cudaSetDevice(rank));
  const int num_experts = 8 * num_ranks, num_topk = 4;
  flashep::Config config = flashep::default_dispatch_config(num_ranks, 24);
  flashep::BufferOptions options;
  options.rank = rank;
  options.num_ranks = num_ranks;
  options.num_nvl_bytes = config.get_nvl_buffer_size_hint(size_t(hidden) * 2, num_ranks);
  flashep::Buffer buffer(options, ShmAllGather{shm, rank, num_ranks});
  cudaStream_t stream = buffer.comm_stream();
  // Every peer reached through its transport (NVLink here), with a checked pattern.
  for (const flashep::PeerCheck& peer : buffer.check_transports(64 << 10)) {
    if (peer.mismatched_words != 0) {
      std::fprintf(stderr, "rank %d: the transport check with rank %d failed (%lld words)\n", rank, peer.peer,
                   static_cast<long long>(peer.mismatched_words));
      return 1;
    }
  }

  // Random routing (distinct experts per token, some slots masked) and small-integer bf16 x.
  std::mt19937 rng(1234 + rank);
  std::vector<int64_t> topk_idx(size_t(num_tokens) * num_topk);
  std::vector<float> topk_weights(topk_idx.size());
  for (int t = 0; t < num_tokens; ++t)
    for (int k = 0; k < num_topk; ++k) {
      int64_t e;
      bool fresh;
      do {
        e = rng() % num_experts;
        fresh = true;
        for (int j = 0; j < k; ++j) fresh &= topk_idx[size_t(t) * num_topk + j] != e;
      } while (!fresh);
      topk_idx[size_t(t) * num_topk + k] = (rng() % 10 == 0) ? -1 : e;
      topk_weights[size_t(t) * num_topk + k] = 1.0f;
    }
  std::vector<__nv_bfloat16> x(size_t(num_tokens) * hidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = __float2bfloat16(float(int(rng() % 9) - 4));

  const int R = num_ranks, C = buffer.num_channels(config);
  auto* d_x = static_cast<__nv_bfloat16*>(device_alloc(x.size() * 2));
  auto* d_topk_idx = static_cast<int64_t*>(device_alloc(topk_idx.size() * 8));
  auto* d_topk_weights = static_cast<float*>(device_alloc(topk_weights.size() * 4));
  auto* d_tokens_per_rank = static_cast<int*>(device_alloc(R * 4));
  auto* d_tokens_per_expert = static_cast<int*>(device_alloc(num_experts * 4));
  auto* d_in_rank = static_cast<bool*>(device_alloc(size_t(num_tokens) * R));
  auto* d_rank_prefix = static_cast<int*>(device_alloc(R * R * 4));
  auto* d_channel_prefix = static_cast<int*>(device_alloc(R * C * 4));
  auto* d_recv_channel_prefix = static_cast<int*>(device_alloc(R * C * 4));
  auto* d_send_head = static_cast<int*>(device_alloc(size_t(num_tokens) * R * 4));
  CHECK_CUDA(cudaMemcpy(d_x, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_topk_idx, topk_idx.data(), topk_idx.size() * 8, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_topk_weights, topk_weights.data(), topk_weights.size() * 4, cudaMemcpyHostToDevice));

  buffer.get_dispatch_layout({d_topk_idx, num_tokens, num_topk, num_experts, d_tokens_per_rank, nullptr,
                              d_tokens_per_expert, d_in_rank},
                             stream);
  // The handle: caller-allocated tensors that notify/dispatch fill and combine reads.
  flashep::DispatchHandle handle;
  handle.is_token_in_rank = d_in_rank;
  handle.rank_prefix_matrix = d_rank_prefix;
  handle.channel_prefix_matrix = d_channel_prefix;
  handle.recv_channel_prefix_matrix = d_recv_channel_prefix;
  handle.send_head = d_send_head;
  flashep::NotifyDispatchArgs notify;
  notify.num_tokens_per_rank = d_tokens_per_rank;
  notify.num_tokens_per_expert = d_tokens_per_expert;
  notify.topk_idx = d_topk_idx;  // the GPU checks the counts and the expert ids against it
  notify.num_tokens = num_tokens;
  notify.num_experts = num_experts;
  notify.hidden = hidden;  // every rank's row shape is checked at the barrier
  notify.num_topk = num_topk;
  notify.config = config;
  notify.handle = &handle;
  buffer.notify_dispatch(notify, stream);
  const flashep::RecvCounts counts = buffer.wait_recv_counts();  // wait-notify: sized from the GPU's counts

  const int num_recv = counts.num_recv_tokens;
  auto* d_recv_x = static_cast<__nv_bfloat16*>(device_alloc(size_t(num_recv) * hidden * 2));
  auto* d_recv_topk_idx = static_cast<int64_t*>(device_alloc(size_t(num_recv) * num_topk * 8));
  auto* d_recv_topk_weights = static_cast<float*>(device_alloc(size_t(num_recv) * num_topk * 4));
  handle.recv_src_idx = static_cast<int*>(device_alloc(size_t(num_recv) * 4));
  flashep::DispatchArgs dispatch;
  dispatch.x = d_x;
  dispatch.num_tokens = num_tokens;
  dispatch.hidden = hidden;
  dispatch.topk_idx = d_topk_idx;
  dispatch.topk_weights = d_topk_weights;
  dispatch.num_topk = num_topk;
  dispatch.num_experts = num_experts;
  dispatch.num_output_rows = num_recv;
  dispatch.handle = &handle;
  dispatch.recv_x = d_recv_x;
  dispatch.recv_topk_idx = d_recv_topk_idx;
  dispatch.recv_topk_weights = d_recv_topk_weights;
  dispatch.config = config;
  buffer.dispatch(dispatch, stream);

  // The "experts" return their rows unchanged; combine sums them back per token.
  auto* d_combined = static_cast<__nv_bfloat16*>(device_alloc(x.size() * 2));
  flashep::CombineArgs combine;
  combine.x = d_recv_x;
  combine.hidden = hidden;
  combine.handle = &handle;
  combine.combined_x = d_combined;
  combine.config = config;  // the handle's channels come from the dispatch's config
  buffer.combine(combine, stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  buffer.check();

  std::vector<__nv_bfloat16> combined(x.size());
  std::vector<uint8_t> in_rank(size_t(num_tokens) * R);
  CHECK_CUDA(cudaMemcpy(combined.data(), d_combined, combined.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(in_rank.data(), d_in_rank, in_rank.size(), cudaMemcpyDeviceToHost));
  long mismatches = 0;
  for (int t = 0; t < num_tokens; ++t) {
    int copies = 0;
    for (int r = 0; r < R; ++r) copies += in_rank[size_t(t) * R + r];
    for (int h = 0; h < hidden; ++h) {
      const size_t i = size_t(t) * hidden + h;
      mismatches += __bfloat162float(combined[i]) != __bfloat162float(x[i]) * copies;
    }
  }
  std::printf("rank %d: received %d tokens, combine(dispatch(x)) %s (%ld mismatches)\n", rank, num_recv,
              mismatches == 0 ? "OK" : "WRONG", mismatches);
  buffer.destroy();
  if (mismatches != 0) return 1;
  return run_low_latency(rank, num_ranks, std::min(num_tokens, 128), hidden, num_experts, num_topk, topk_idx, x, shm);
}

}  // namespace

int main(int argc, char** argv) {
  // CUDA must not be initialized in a process that forks CUDA users: count devices in a child.
  int num_devices = 0;
  if (const pid_t probe = fork(); probe == 0) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    std::_Exit(count);
  } else {
    int status = 0;
    waitpid(probe, &status, 0);
    num_devices = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  }
  const int num_ranks = argc > 1 ? std::atoi(argv[1]) : num_devices;
  const int num_tokens = argc > 2 ? std::atoi(argv[2]) : 1024;
  const int hidden = argc > 3 ? std::atoi(argv[3]) : 4096;
  if (num_ranks < 1 || num_devices < num_ranks) {
    std::printf("flashep_example: skipped (%d CUDA devices, %d ranks requested)\n", num_devices, num_ranks);
    return 0;
  }
  // Fork before this process touches a GPU context in the children's place.
  auto* shm = static_cast<SharedExchange*>(
      mmap(nullptr, sizeof(SharedExchange), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  new (shm) SharedExchange{};
  std::vector<pid_t> children;
  for (int rank = 0; rank < num_ranks; ++rank) {
    const pid_t pid = fork();
    if (pid == 0) {
      int rc = 1;
      try {
        rc = run_rank(rank, num_ranks, num_tokens, hidden, shm);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
      }
      std::_Exit(rc);
    }
    children.push_back(pid);
  }
  int failures = 0;
  for (pid_t pid : children) {
    int status = 0;
    waitpid(pid, &status, 0);
    failures += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  std::printf("flashep_example: %d ranks, %s\n", num_ranks, failures == 0 ? "all OK" : "FAILED");
  return failures == 0 ? 0 : 1;
}
