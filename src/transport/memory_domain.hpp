// Memory domains: how a rank allocates the memory its peers reach, and how it reaches theirs. One
// small interface, one implementation per mechanism, chosen per peer by the NVLink domain:
//   - NvlinkDomain: the ranks of this rank's NVLink domain map each other's allocation and load
//     from / store to it directly. CUDA IPC today (cuda_ipc_domain.cpp); built so that cuMem
//     fabric handles (multi-node NVLink) can replace it: allocation, export and import are its own.
//   - SymmetricDomain: NVSHMEM's symmetric heap, for peers in other NVLink domains, reached only
//     through NVSHMEM puts and signals (nvshmem_domain.cu; optional at build time).
// A domain allocates as well as maps. Connecting is collective and may take several rounds of an
// all-gather (bootstrap_message / bootstrap_receive): the Buffer runs every domain's rounds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace flashep::transport {

/// Who this rank is, and what it allocates.
struct DomainSpec {
  int rank = 0;
  int num_ranks = 1;
  int nvl_domain_size = 1;
  int device = 0;
  size_t bytes = 0;  // of this rank's allocation (the same on every rank)
};

class MemoryDomain {
 public:
  virtual ~MemoryDomain() = default;
  virtual const char* name() const = 0;
  /// This rank's allocation (device memory, zeroed) and its size.
  virtual char* local_base() const = 0;
  virtual size_t bytes() const = 0;
  /// The message of the current bootstrap round: the same size on every rank.
  virtual std::vector<uint8_t> bootstrap_message() const = 0;
  /// Takes every rank's message of the round (rank order); true once connected. Every rank
  /// returns the same in the same round.
  virtual bool bootstrap_receive(const std::vector<std::vector<uint8_t>>& all) = 0;
  /// Unmaps and frees (idempotent). `collective`: every rank is tearing down together (a domain
  /// whose teardown needs all ranks, like NVSHMEM's, skips it otherwise, leaving it to the process'
  /// end rather than risking a hang).
  virtual void close(bool collective) = 0;
};

class NvlinkDomain : public MemoryDomain {
 public:
  /// The allocation of `global_rank` (a rank of this rank's NVLink domain; ours for ourselves).
  virtual char* peer_base(int global_rank) const = 0;
};

class SymmetricDomain : public MemoryDomain {
 public:
  /// Host-side: writes the 64-bit `value` into `peer`'s word at `offset` of its allocation
  /// (asynchronously, on `stream`). Used to carry an abort to peers of other NVLink domains.
  virtual void post_signal(int peer, size_t offset, uint64_t value, cudaStream_t stream) = 0;
};

/// CUDA IPC over NVLink for the ranks of this rank's NVLink domain.
std::unique_ptr<NvlinkDomain> make_cuda_ipc_domain(const DomainSpec& spec);
/// NVSHMEM's symmetric heap (init once per process, one allocation per domain). Throws
/// flashep::Error (kUnsupported) in a build without NVSHMEM.
std::unique_ptr<SymmetricDomain> make_nvshmem_domain(const DomainSpec& spec);
/// Whether this build has NVSHMEM (FLASHEP_WITH_NVSHMEM).
bool nvshmem_built();

}  // namespace flashep::transport
