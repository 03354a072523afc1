// Typed launch parameters of the low-latency kernels (src/kernels/low_latency_*.cu) and their
// host-side launch functions. Plain C++, filled by src/core/low_latency_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "core/device_comm.hpp"
#include "core/low_latency_layout.hpp"
#include "flashep/low_latency.hpp"

namespace flashep::kernels {

/// Where a low-latency kernel finds the regions. A peer is reached *directly* (stores through a
/// mapping) when it is this rank or an NVLink-domain peer with a mapped region (`nvl_peer`);
/// every other peer through NVSHMEM puts into its symmetric region (`sym`, same offsets).
struct LowLatencyComm {
  LowLatencyLayout layout;
  char* local = nullptr;                 // our primary region: state, zero-copy, what direct peers write
  char* nvl_peer[kMaxNvlRanks] = {};     // regions of the NVLink-domain peers reached directly
  char* sym = nullptr;                   // our region in the symmetric heap (NVSHMEM peers), or nullptr
  int shrink = 0;                        // a peer that times out is masked instead of failing the call
  int all_direct = 0;                    // every rank is reached directly (no NVSHMEM peer)
};

struct LowLatencyDispatchParams {
  DeviceComm comm;
  LowLatencyComm ll;
  const void* x;
  const int64_t* topk_idx;
  int num_tokens, num_topk, phases;
  FastDivmod div_topk;  // by num_topk (set by launch_low_latency_dispatch)
  int call_slot;  // [0, kLowLatencyCallSlots): where the send phase leaves its sequence number
  int fp8, round_scale, ue8m0;
  int call_hash;
  void* recv_x;
  void* recv_scales;
  int* recv_count;
  int* recv_stats;
  int64_t* wait_stats;
  int* src_info;
  int64_t* layout_range;
  int* plan;
};

struct LowLatencyCombineParams {
  DeviceComm comm;
  LowLatencyComm ll;
  const void* x;  // [L, R*T, H] bf16 (the user's, or the zero-copy half)
  const int64_t* topk_idx;
  const float* topk_weights;
  int num_tokens, num_topk, phases;
  int call_slot;
  int call_hash;
  int logfmt;  // partial sums travel as LogFMT-10 (src/core/logfmt.hpp), else BF16
  /// Per-slot combine (a hooked call whose peers are all direct): every expert row travels to its
  /// source's (token, top-k slot) and the receive phase weights and adds them, so no weights are
  /// exchanged and the send phase waits for no peer. Else the reduced combine: the expert side
  /// waits for the source's weights and sends one weighted partial sum per (token, rank).
  int slot_mode;
  /// The receive's split of each token's row over the blocks (set by launch_low_latency_combine
  /// from its block count: ll_combine_receive_split).
  int chunk_words;
  FastDivmod div_chunks;
  const int* plan;
  void* out;
  int64_t* wait_stats;
};

/// Cooperative launches (every block resident: blocks wait for each other's signals, and shrink
/// mode synchronizes the grid): `num_blocks` <= the SMs.
cudaError_t launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, cudaStream_t stream);
cudaError_t launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, cudaStream_t stream);
/// Loads every low-latency kernel (one per dtype and phase set) now, at Buffer construction: with
/// CUDA's lazy module loading a kernel first used inside a CUDA-graph capture, or by the first
/// hook, would load there instead.
cudaError_t load_low_latency_kernels();

/// Diagnostics builds (FLASHEP_ENABLE_DIAGNOSTICS): the timeline of the dispatch (or combine)
/// kernels since the last take, then reset: kLowLatencyTracePoints earliest-block %globaltimer
/// stamps (ns; ~0 where no block passed), then as many latest-block stamps (0 where none).
/// Empty in production builds. Points: kLowLatencyDispatchTrace / kLowLatencyCombineTrace.
inline constexpr int kLowLatencyTracePoints = 12;
std::vector<uint64_t> take_low_latency_trace(bool combine);
std::vector<uint64_t> take_low_latency_combine_trace();  // (the combine half of the above)
cudaError_t load_low_latency_combine_kernels();          // (the combine half of load_low_latency_kernels)
/// Point names, in order (the python bench prints them).
inline constexpr const char* kLowLatencyDispatchTrace[] = {
    "kernel start", "entry", "pairs counted", "counts signalled", "tokens sent", "send ticket",
    "sources counted", "segments", "expanded", "exit", "(1st message) flag seen", "(1st message) rows stored"};
inline constexpr const char* kLowLatencyCombineTrace[] = {
    "kernel start", "entry", "weights sent", "plan read", "sums sent", "send ticket", "tokens added", "exit",
    "(1st token) parts there", "(1st token) added"};

}  // namespace flashep::kernels
