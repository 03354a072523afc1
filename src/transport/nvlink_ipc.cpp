// NVLink transport: peers of the same NVLink domain map each other's buffer with CUDA IPC.
#include <cuda_runtime_api.h>

#include <cstring>
#include <string>
#include <unistd.h>

#include "core/cuda_check.hpp"
#include "transport/transport.hpp"

namespace flashep::transport {
namespace {

/// What a rank publishes about its buffer. Checked on import so mismatched ranks fail loudly.
struct IpcRecord {
  uint32_t magic;
  int32_t rank;
  int32_t num_ranks;
  int32_t device;
  uint64_t buffer_bytes;
  uint64_t host_id;  // hostname hash: IPC works within one host only
  cudaIpcMemHandle_t handle;
};
constexpr uint32_t kIpcMagic = 0x46455031;  // "FEP1"

uint64_t host_id() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  uint64_t h = 1469598103934665603ull;
  for (const char* c = name; *c; ++c) h = (h ^ uint8_t(*c)) * 1099511628211ull;
  return h;
}

class NvlinkIpcTransport final : public Transport {
 public:
  NvlinkIpcTransport(int rank, int num_ranks, int domain_size, void* local, size_t bytes, int device)
      : rank_(rank), num_ranks_(num_ranks), domain_size_(domain_size), local_(local), bytes_(bytes), device_(device),
        peers_(num_ranks, nullptr) {
    peers_[rank] = local;
  }
  ~NvlinkIpcTransport() override { close(); }

  const char* name() const override { return "nvlink-ipc"; }

  std::vector<uint8_t> export_local() const override {
    IpcRecord record{};
    record.magic = kIpcMagic;
    record.rank = rank_;
    record.num_ranks = num_ranks_;
    record.device = device_;
    record.buffer_bytes = bytes_;
    record.host_id = host_id();
    FLASHEP_CUDA_CHECK(cudaIpcGetMemHandle(&record.handle, local_));
    std::vector<uint8_t> out(sizeof(record));
    std::memcpy(out.data(), &record, sizeof(record));
    return out;
  }

  void import_peers(const std::vector<std::vector<uint8_t>>& all_ranks) override {
    if (static_cast<int>(all_ranks.size()) != num_ranks_)
      throw_error("connect: expected " + std::to_string(num_ranks_) + " handles, got " + std::to_string(all_ranks.size()));
    for (int peer = 0; peer < num_ranks_; ++peer) {
      if (all_ranks[peer].size() != sizeof(IpcRecord))
        throw_error("connect: handle of rank " + std::to_string(peer) + " has the wrong size (not a flashep handle?)");
      IpcRecord record;
      std::memcpy(&record, all_ranks[peer].data(), sizeof(record));
      if (record.magic != kIpcMagic || record.rank != peer || record.num_ranks != num_ranks_)
        throw_error("connect: handle " + std::to_string(peer) + " is not rank " + std::to_string(peer) + " of " +
                    std::to_string(num_ranks_) + " (ranks passed out of order, or from another group)");
      if (record.buffer_bytes != bytes_)
        throw_error("connect: rank " + std::to_string(peer) + " allocated " + std::to_string(record.buffer_bytes) +
                    " bytes, this rank " + std::to_string(bytes_) + ": every rank must pass the same num_nvl_bytes");
      if (peer == rank_ || !reaches(peer)) continue;
      if (record.host_id != host_id())
        throw_error("connect: rank " + std::to_string(peer) + " is on another host but in this rank's NVLink domain");
      void* mapped = nullptr;
      FLASHEP_CUDA_CHECK(cudaIpcOpenMemHandle(&mapped, record.handle, cudaIpcMemLazyEnablePeerAccess));
      peers_[peer] = mapped;
    }
  }

  bool reaches(int peer) const override { return peer / domain_size_ == rank_ / domain_size_; }

  void* peer_pointer(int peer) const override { return peers_.at(peer); }

  void close() override {
    for (int peer = 0; peer < num_ranks_; ++peer) {
      if (peer != rank_ && peers_[peer] != nullptr) {
        cudaIpcCloseMemHandle(peers_[peer]);  // best effort: may run during teardown
        peers_[peer] = nullptr;
      }
    }
  }

 private:
  int rank_, num_ranks_, domain_size_;
  void* local_;
  size_t bytes_;
  int device_;
  std::vector<void*> peers_;
};

}  // namespace

std::unique_ptr<Transport> make_nvlink_ipc_transport(int rank, int num_ranks, int domain_size, void* local_buffer,
                                                     size_t buffer_bytes, int device) {
  return std::make_unique<NvlinkIpcTransport>(rank, num_ranks, domain_size, local_buffer, buffer_bytes, device);
}

}  // namespace flashep::transport
