// The device-side communicator: everything a kernel needs to know about its rank, its peers and
// the buffer's memory, passed by value to every communicating kernel (a typed struct, no hidden
// globals). Filled by the host (BufferImpl::device_comm()); read by src/kernels/*.
//
// Ranks: `rank` / `num_ranks` are global; the NVLink domain of this rank is the ranks
// [node * nvl_size, node * nvl_size + nvl_size), in which it is `nvl_rank`. Peers of the domain are
// reached with loads and stores through their `nvl_base` (CUDA IPC mappings); peers of other
// domains through NVSHMEM puts and signals into their symmetric region (same offsets as ours at
// `sym_base`).
#pragma once

#include <cstdint>

#include "core/device_error.hpp"
#include "core/layouts.hpp"
#include "flashep/config.hpp"

namespace flashep {

struct DeviceComm {
  int rank = 0;
  int num_ranks = 1;
  int nvl_rank = 0;
  int nvl_size = 1;
  int node = 0;
  int num_nodes = 1;
  /// NVLink allocation of each rank of the domain (index: nvl rank; ours at nvl_rank).
  char* nvl_base[kMaxNvlRanks] = {};
  NvlAllocationLayout nvl{};
  /// Our NVSHMEM region (a symmetric address), or nullptr when the buffer has none.
  char* sym_base = nullptr;
  RdmaLayout rdma{};
  DeviceErrorRecord* error = nullptr;  // host-mapped
  uint64_t timeout_ns = 0;
  /// Diagnostics builds only (FLASHEP_DEBUG_PROFILE): per-warp phase counters, else nullptr.
  unsigned long long* profile = nullptr;

  FLASHEP_HD char* local() const { return nvl_base[nvl_rank]; }
  FLASHEP_HD int node_of(int global_rank) const { return global_rank / nvl_size; }
  // A range check, not node_of(global_rank) == node: a division by a runtime value is ~20
  // instructions on the GPU, and the low-latency kernels ask this for every peer they touch.
  FLASHEP_HD bool is_nvl_peer(int global_rank) const {
    return static_cast<unsigned>(global_rank - node * nvl_size) < static_cast<unsigned>(nvl_size);
  }
  FLASHEP_HD int nvl_index(int global_rank) const { return global_rank - node * nvl_size; }
};

}  // namespace flashep
