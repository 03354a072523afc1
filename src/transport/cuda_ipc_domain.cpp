// NVLink memory domain over CUDA IPC: each rank cudaMallocs its allocation, exports an IPC handle,
// and maps the handles of the other ranks of its NVLink domain. One bootstrap round.
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "core/cuda_check.hpp"
#include "transport/memory_domain.hpp"

namespace flashep::transport {
namespace {

/// What a rank publishes about its allocation. Checked on import so mismatched ranks fail loudly.
struct IpcRecord {
  uint32_t magic;
  int32_t rank;
  int32_t num_ranks;
  int32_t device;
  uint64_t bytes;
  uint64_t host_id;  // hostname hash: IPC works within one host only
  cudaIpcMemHandle_t handle;
};
constexpr uint32_t kIpcMagic = 0x46455032;  // "FEP2"

uint64_t host_id() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  uint64_t h = 1469598103934665603ull;
  for (const char* c = name; *c; ++c) h = (h ^ uint8_t(*c)) * 1099511628211ull;
  return h;
}

class CudaIpcDomain final : public NvlinkDomain {
 public:
  explicit CudaIpcDomain(const DomainSpec& spec) : spec_(spec), peers_(spec.nvl_domain_size, nullptr) {
    FLASHEP_CUDA_CHECK(cudaSetDevice(spec.device));
    void* raw = nullptr;
    FLASHEP_CUDA_CHECK(cudaMalloc(&raw, spec.bytes));
    local_ = static_cast<char*>(raw);
    FLASHEP_CUDA_CHECK(cudaMemset(local_, 0, spec.bytes));
    FLASHEP_CUDA_CHECK(cudaDeviceSynchronize());
    peers_[local_index(spec.rank)] = local_;
  }
  ~CudaIpcDomain() override { close(false); }

  const char* name() const override { return "cuda-ipc"; }
  char* local_base() const override { return local_; }
  size_t bytes() const override { return spec_.bytes; }

  std::vector<uint8_t> bootstrap_message() const override {
    IpcRecord record{};
    record.magic = kIpcMagic;
    record.rank = spec_.rank;
    record.num_ranks = spec_.num_ranks;
    record.device = spec_.device;
    record.bytes = spec_.bytes;
    record.host_id = host_id();
    FLASHEP_CUDA_CHECK(cudaIpcGetMemHandle(&record.handle, local_));
    std::vector<uint8_t> out(sizeof(record));
    std::memcpy(out.data(), &record, sizeof(record));
    return out;
  }

  bool bootstrap_receive(const std::vector<std::vector<uint8_t>>& all) override {
    auto fail = [](ErrorKind kind, const std::string& what) { throw_error(kind, "connect (cuda-ipc): " + what); };
    if (static_cast<int>(all.size()) != spec_.num_ranks)
      fail(ErrorKind::kInvalidArgument,
           "expected " + std::to_string(spec_.num_ranks) + " messages, got " + std::to_string(all.size()));
    FLASHEP_CUDA_CHECK(cudaSetDevice(spec_.device));
    const int first = spec_.rank - local_index(spec_.rank);
    for (int peer = first; peer < first + spec_.nvl_domain_size; ++peer) {
      if (all[peer].size() != sizeof(IpcRecord))
        fail(ErrorKind::kPeerMismatch, "the message of rank " + std::to_string(peer) + " has the wrong size");
      IpcRecord record;
      std::memcpy(&record, all[peer].data(), sizeof(record));
      if (record.magic != kIpcMagic || record.rank != peer || record.num_ranks != spec_.num_ranks)
        fail(ErrorKind::kPeerMismatch, "message " + std::to_string(peer) + " is not rank " + std::to_string(peer) +
                                           " of " + std::to_string(spec_.num_ranks) +
                                           " (ranks out of order, or from another group)");
      if (record.bytes != spec_.bytes)
        fail(ErrorKind::kPeerMismatch, "rank " + std::to_string(peer) + " allocated " + std::to_string(record.bytes) +
                                           " bytes, this rank " + std::to_string(spec_.bytes));
      if (peer == spec_.rank) continue;
      if (record.host_id != host_id())
        fail(ErrorKind::kPeerMismatch, "rank " + std::to_string(peer) +
                                           " is on another host but in this rank's NVLink domain (nvl_domain_size " +
                                           std::to_string(spec_.nvl_domain_size) + ")");
      void* mapped = nullptr;
      FLASHEP_CUDA_CHECK(cudaIpcOpenMemHandle(&mapped, record.handle, cudaIpcMemLazyEnablePeerAccess));
      peers_[local_index(peer)] = static_cast<char*>(mapped);
    }
    return true;
  }

  char* peer_base(int global_rank) const override { return peers_.at(local_index(global_rank)); }

  void close(bool /*collective*/) override {
    if (local_ == nullptr) return;
    cudaSetDevice(spec_.device);  // best effort: the device may be in an error state already
    for (size_t i = 0; i < peers_.size(); ++i) {
      if (peers_[i] != nullptr && peers_[i] != local_) cudaIpcCloseMemHandle(peers_[i]);
      peers_[i] = nullptr;
    }
    cudaFree(local_);
    local_ = nullptr;
  }

 private:
  int local_index(int global_rank) const { return global_rank % spec_.nvl_domain_size; }

  DomainSpec spec_;
  char* local_ = nullptr;
  std::vector<char*> peers_;
};

}  // namespace

std::unique_ptr<NvlinkDomain> make_cuda_ipc_domain(const DomainSpec& spec) {
  return std::make_unique<CudaIpcDomain>(spec);
}

}  // namespace flashep::transport
