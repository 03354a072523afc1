// How a rank reaches its peers' buffers. One small interface, one implementation per mechanism,
// chosen per peer: NVLink peers (same NVLink domain) through CUDA IPC now; peers off NVLink through
// NVSHMEM in the multi-node milestone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace flashep::transport {

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  /// Bytes that describe this rank's buffer to its peers (to be all-gathered).
  virtual std::vector<uint8_t> export_local() const = 0;
  /// Maps every peer this transport reaches, from all ranks' export_local() in rank order.
  virtual void import_peers(const std::vector<std::vector<uint8_t>>& all_ranks) = 0;
  /// Whether `peer` is reached by this transport.
  virtual bool reaches(int peer) const = 0;
  /// A pointer the GPU can load from / store to for `peer`'s buffer (ours for peer == rank).
  virtual void* peer_pointer(int peer) const = 0;
  /// Unmaps peers (idempotent). Does not free the local buffer, which the caller owns.
  virtual void close() = 0;
};

/// CUDA IPC over NVLink for the ranks of this rank's NVLink domain
/// [domain_begin, domain_begin + domain_size).
std::unique_ptr<Transport> make_nvlink_ipc_transport(int rank, int num_ranks, int domain_size, void* local_buffer,
                                                     size_t buffer_bytes, int device);

}  // namespace flashep::transport
