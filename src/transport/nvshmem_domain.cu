// NVSHMEM memory domain: one symmetric-heap allocation per buffer, for the peers of other NVLink
// domains. Compiled only with FLASHEP_WITH_NVSHMEM, into the library that device-links NVSHMEM
// (nvshmemi_init_thread must be called from the module that holds NVSHMEM's device state).
//
// Bootstrap without MPI, in one all-gather round: rank 0 makes a unique id, every rank takes it
// from rank 0's message and initializes NVSHMEM with it (collective), then allocates (collective).
// NVSHMEM is initialized once per process and stays initialized until the process ends: its
// documentation makes a second nvshmem_init after nvshmem_finalize undefined, and later buffers of
// the same process (after a destroy, or after a poisoned buffer) must still work. Every later
// buffer checks that it runs on the same ranks NVSHMEM was initialized with.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "core/cuda_check.hpp"
#include "transport/memory_domain.hpp"

namespace flashep::transport {
namespace {

/// Process-wide NVSHMEM state.
struct NvshmemProcess {
  std::mutex mutex;
  bool initialized = false;
  int rank = -1;
  int num_ranks = 0;
  int users = 0;  // live domains
};
NvshmemProcess& process() {
  static NvshmemProcess state;
  return state;
}

/// The round's message: whether the sender has NVSHMEM initialized already, and rank 0's unique id.
struct UidMessage {
  uint32_t magic;
  int32_t rank;
  int32_t already_initialized;
  int32_t pad;
  nvshmemx_uniqueid_t uid;
};
constexpr uint32_t kUidMagic = 0x46455055;  // "FEPU"

/// nvshmemx_init_attr without its exit() on failure: the status comes back as an error instead.
int init_with_uid(int rank, int num_ranks, const nvshmemx_uniqueid_t& uid) {
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int status = nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &uid, &attr);
  if (status != 0) return status;
  nvshmemx_init_init_attr_ver_only(attr);
  nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                NVSHMEM_VENDOR_PATCH_VERSION};
  int provided = 0;
  return nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version);
}

class NvshmemDomain final : public SymmetricDomain {
 public:
  explicit NvshmemDomain(const DomainSpec& spec) : spec_(spec) {
    FLASHEP_CUDA_CHECK(cudaSetDevice(spec.device));
    NvshmemProcess& state = process();
    std::lock_guard<std::mutex> lock(state.mutex);
    message_.magic = kUidMagic;
    message_.rank = spec.rank;
    message_.already_initialized = state.initialized ? 1 : 0;
    message_.uid = NVSHMEMX_UNIQUEID_INITIALIZER;
    if (spec.rank == 0 && !state.initialized && nvshmemx_get_uniqueid(&message_.uid) != 0)
      throw_error(ErrorKind::kDeviceFault, "nvshmemx_get_uniqueid failed");
  }
  ~NvshmemDomain() override { close(false); }

  const char* name() const override { return "nvshmem"; }
  char* local_base() const override { return base_; }
  size_t bytes() const override { return spec_.bytes; }

  std::vector<uint8_t> bootstrap_message() const override {
    std::vector<uint8_t> out(sizeof(UidMessage));
    std::memcpy(out.data(), &message_, sizeof(UidMessage));
    return out;
  }

  bool bootstrap_receive(const std::vector<std::vector<uint8_t>>& all) override {
    NvshmemProcess& state = process();
    std::lock_guard<std::mutex> lock(state.mutex);
    FLASHEP_CUDA_CHECK(cudaSetDevice(spec_.device));
    std::vector<UidMessage> messages(all.size());
    for (size_t r = 0; r < all.size(); ++r) {
      if (all[r].size() != sizeof(UidMessage))
        throw_error(ErrorKind::kPeerMismatch, "connect (nvshmem): the message of rank " + std::to_string(r) +
                                                  " has the wrong size");
      std::memcpy(&messages[r], all[r].data(), sizeof(UidMessage));
      if (messages[r].magic != kUidMagic || messages[r].rank != static_cast<int>(r))
        throw_error(ErrorKind::kPeerMismatch, "connect (nvshmem): message " + std::to_string(r) + " is not rank " +
                                                  std::to_string(r) + "'s");
      if (messages[r].already_initialized != messages[0].already_initialized)
        throw_error(ErrorKind::kPeerMismatch,
                    "connect (nvshmem): NVSHMEM is initialized on rank " +
                        std::to_string(messages[0].already_initialized ? 0 : r) + " but not on rank " +
                        std::to_string(messages[0].already_initialized ? r : 0) +
                        " (every rank must create and destroy its buffers together)");
    }
    if (!state.initialized) {
      const int status = init_with_uid(spec_.rank, spec_.num_ranks, messages[0].uid);
      if (status != 0)
        throw_error(ErrorKind::kDeviceFault, "NVSHMEM initialization failed on rank " + std::to_string(spec_.rank) +
                                                 " (status " + std::to_string(status) + ")");
      state.initialized = true;
      state.rank = spec_.rank;
      state.num_ranks = spec_.num_ranks;
    }
    if (nvshmem_my_pe() != spec_.rank || nvshmem_n_pes() != spec_.num_ranks)
      throw_error(ErrorKind::kPeerMismatch,
                  "NVSHMEM was initialized in this process as PE " + std::to_string(nvshmem_my_pe()) + " of " +
                      std::to_string(nvshmem_n_pes()) + ", but this buffer is rank " + std::to_string(spec_.rank) +
                      " of " + std::to_string(spec_.num_ranks) + " (NVSHMEM can be initialized once per process)");
    base_ = static_cast<char*>(nvshmem_malloc(spec_.bytes));  // collective
    if (base_ == nullptr)
      throw_error(ErrorKind::kDeviceFault, "nvshmem_malloc of " + std::to_string(spec_.bytes) +
                                               " bytes failed (NVSHMEM_SYMMETRIC_SIZE too small?)");
    FLASHEP_CUDA_CHECK(cudaMemset(base_, 0, spec_.bytes));
    FLASHEP_CUDA_CHECK(cudaDeviceSynchronize());
    nvshmem_barrier_all();  // no peer writes into a region before its owner zeroed it
    ++state.users;
    return true;
  }

  void post_signal(int peer, size_t offset, uint64_t value, cudaStream_t stream) override {
    if (base_ == nullptr) return;
    nvshmemx_signal_op_on_stream(reinterpret_cast<uint64_t*>(base_ + offset), value, NVSHMEM_SIGNAL_SET, peer, stream);
  }

  void close(bool collective) override {
    if (base_ == nullptr) return;
    NvshmemProcess& state = process();
    std::lock_guard<std::mutex> lock(state.mutex);
    cudaSetDevice(spec_.device);
    // nvshmem_free is collective: without every rank it could wait forever. A non-collective
    // teardown (a destructor, an error path) leaves the allocation to the process' end.
    if (collective) {
      cudaDeviceSynchronize();
      nvshmem_free(base_);
    } else if (spec_.rank == 0) {
      std::fprintf(stderr,
                   "flashep: a buffer's NVSHMEM region (%zu bytes) stays allocated until the process ends: it was "
                   "not destroyed collectively (Python: Buffer(..., explicitly_destroy=True) and destroy())\n",
                   spec_.bytes);
    }
    base_ = nullptr;
    --state.users;
  }

 private:
  DomainSpec spec_;
  UidMessage message_{};
  char* base_ = nullptr;
};

}  // namespace

std::unique_ptr<SymmetricDomain> make_nvshmem_domain(const DomainSpec& spec) {
  return std::make_unique<NvshmemDomain>(spec);
}

bool nvshmem_built() { return true; }

}  // namespace flashep::transport
