// The NVSHMEM memory domain of a build without NVSHMEM (FLASHEP_WITH_NVSHMEM=OFF, or AUTO without
// NVSHMEM found): every mode that needs it fails with an error naming the build option.
#include "core/cuda_check.hpp"
#include "transport/memory_domain.hpp"

namespace flashep::transport {

std::unique_ptr<SymmetricDomain> make_nvshmem_domain(const DomainSpec& spec) {
  throw_error(ErrorKind::kUnsupported,
              "rank " + std::to_string(spec.rank) +
                  ": this buffer needs NVSHMEM (its ranks span several NVLink domains and num_rdma_bytes > 0), but "
                  "flashep was built without it; rebuild with -DFLASHEP_WITH_NVSHMEM=ON (NVSHMEM 3.4.5: "
                  "pip install nvidia-nvshmem-cu13==3.4.5, or set NVSHMEM_ROOT)");
}

bool nvshmem_built() { return false; }

}  // namespace flashep::transport
