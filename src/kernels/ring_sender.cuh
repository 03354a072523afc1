// The sending side of the NVLink rings for dispatch: one warp feeds one channel's rings at every
// peer with bulk copies. (Combine sends with plain-copy warps, one per (channel, destination):
// combine receivers free slots in token order, so one warp serving every peer could be blocked
// behind one full ring while the ranks wait on each other; see docs/design.md.)
//
// Items (a token of dispatch, an expert-output row of combine) flow through a pipeline of `stages`
// shared-memory slots:
//   1. lane 0 bulk-loads the item's row from global memory into a stage, `lookahead` items ahead,
//      while the lanes copy its metadata (scales, top-k, source index) after the row with cp.async;
//      both complete on the stage's mbarrier, so no load latency sits on the per-item path;
//   2. once the stage's mbarrier flips, the slot image is complete;
//   3. lane d, for every destination d of the item, waits for ring space at d and bulk-stores the
//      whole slot image into d's ring (one store per destination: a dispatch token is read once);
//   4. every lane commits one bulk group per item (empty if it stored nothing), so group n of every
//      lane is item n, and publishes d's ring tail `publish_lag` items late, once those stores are
//      written (wait_group), so the warp never waits on its newest stores.
// A lane that must wait for ring space first publishes everything it wrote (the receiver may be
// waiting for exactly that), so sender and receiver cannot wait on each other.
#pragma once

#include "kernels/bulk_copy.cuh"
#include "kernels/comm_utils.cuh"
#include "kernels/profile.cuh"

namespace flashep::kernels {

/// Tail history entries per sender warp: kBulkTailHistory (> the publish lag).
inline constexpr int kTailHistory = kBulkTailHistory;

/// Shared memory of one pipelined sender warp.
struct WarpStages {
  char* stages;        // `count` slots of `slot_bytes`
  uint64_t* barriers;  // `count` mbarriers, one per stage
  int* tail_history;   // [kTailHistory][32], senders only
  int count;
  int slot_bytes;

  __device__ char* stage(int index) const { return stages + int64_t(index) * slot_bytes; }
};

/// Lookahead of the loads: half the stages, so that stores of the older half keep reading their
/// stages while the newer half fills.
/// Items sent..sent+lookahead are in stages at once, so lookahead < stages.
__device__ __forceinline__ int load_lookahead(int stages) { return stages / 2; }

/// What a sender needs to know about the rings it feeds: lane d < num_dsts holds destination d's.
struct RingSendTarget {
  char* ring;            // slot 0 of our ring at the destination
  int* remote_tail;      // the ring's tail, in the destination's memory
  const int* local_head; // the ring's head, written into our memory by the destination
};

/// Lane d < nvl_size: ring (channel, our rank) at destination d. Diagnostics may aim the slots at
/// our own buffer (`into_own_buffer`); tails and heads stay the real ones.
__device__ __forceinline__ RingSendTarget ring_send_target(const DeviceComm& comm, int channel, int ring_depth,
                                                           int slot_bytes, int lane, bool into_own_buffer = false) {
  RingSendTarget target{};
  const IntranodeLayout& layout = comm.nvl.intranode;
  if (lane < comm.nvl_size) {
    void* slots = into_own_buffer ? comm.local() : comm.nvl_base[lane];
    target.ring = at(slots, layout.ring(channel, comm.nvl_rank, ring_depth, slot_bytes));
    target.remote_tail = int_at(comm.nvl_base[lane], layout.tail(channel, comm.nvl_rank));
    target.local_head = int_at(comm.local(), layout.head(channel, lane));
  }
  return target;
}

/// Per-lane sender state (lane d: destination d).
struct RingSendLane {
  int tail = 0;       // slots stored
  int head = 0;       // slots the destination released (last seen)
  int published = 0;  // tail last published
};

__device__ __forceinline__ void publish_tail(const RingSendTarget& target, RingSendLane& lane_state, int tail) {
  device::fence_proxy_async_global();
  device::st_release_sys(target.remote_tail, tail);
  lane_state.published = tail;
}

/// Waits (this lane only) until the ring has room for one more slot. Returns false on timeout or
/// abort (the error is recorded).
__device__ __forceinline__ bool wait_ring_space(const DeviceComm& comm, const RingSendTarget& target,
                                                RingSendLane& s, int ring_depth, Phase phase, int dst, int channel) {
  if (s.tail - s.head < ring_depth) return true;
  // The receiver's reads of the freed slots (generic proxy) come before our bulk stores into them
  // (async proxy): a proxy fence after every acquire of the head whose value we use.
  s.head = device::ld_acquire_sys(target.local_head);
  device::fence_proxy_async_global();
  if (s.tail - s.head < ring_depth) return true;
  // Publish everything first: the receiver may be waiting for exactly these slots.
  device::bulk_wait_written(0);
  if (s.published != s.tail) publish_tail(target, s, s.tail);
  int seen = 0;
  if (!device::wait_reached(comm, target.local_head, s.tail - ring_depth + 1, phase, dst, channel, &seen)) return false;
  device::fence_proxy_async_global();
  s.head = seen;
  return true;
}

struct RingSendConfig {
  int num_dsts;
  int ring_depth;
  int chunk;             // publish once this many slots are unpublished (and written)
  int load_bytes;        // bytes of the row loaded into a stage
  int store_offset;      // bytes of the stage stored start here (0; debug runs may skip the row)
  int publish_lag;       // items a lane's stores may be in flight before their tail is published (< kTailHistory)
  Phase space_phase;
  int channel;
  int first_dst_rank;  // global rank of destination 0 (error records name global ranks)
};

/// mbarrier arrivals per stage and item: lane 0's arrive.expect_tx (the row) + one per lane (its
/// cp.async metadata copies).
inline constexpr int kStageArrivals = 1 + device::kWarpSize;

/// Runs the pipeline over the items `policy` produces. Policy (all calls by every lane, uniform):
///   bool next_load()                      moves to the next item to load, false at the end
///   const void* load_row()                that item's source row
///   void load_metadata(char* stage)       starts copying its metadata into the stage (cp.async)
///   uint32_t next_send(int my_tail)       next item to send (same order): destination mask;
///                                         my_tail = this lane's slots stored so far
/// Returns false when a wait failed (error recorded); true when every tail was published.
template <typename Policy>
__device__ bool run_ring_sender(Policy& policy, const WarpStages& w, const RingSendTarget& target,
                                const RingSendConfig& cfg, const DeviceComm& comm, RingSendLane& s,
                                device::PhaseClock& clock, int lane) {
  const int S = w.count, L = load_lookahead(S);
  const int store_bytes = w.slot_bytes - cfg.store_offset;
  int loaded = 0, sent = 0;
  bool more = true;
  bool ok = true;
  while (true) {
    // 1. Loads (row and metadata, completing on the stage's mbarrier), up to L items ahead.
    while (more && loaded <= sent + L) {
      if (!policy.next_load()) {
        more = false;
        break;
      }
      const int stage = loaded % S;
      if (loaded >= S) {  // the stage's previous item (loaded - S) must have finished reading it
        device::bulk_wait_read((sent - 1) - (loaded - S));
        __syncwarp();
      }
      char* stage_ptr = w.stage(stage);
      policy.load_metadata(stage_ptr);
      device::async_copy_arrive(w.barriers + stage);
      if (lane == 0) {
        device::mbarrier_arrive_expect_tx(w.barriers + stage, cfg.load_bytes);
        device::bulk_load(stage_ptr, policy.load_row(), cfg.load_bytes, w.barriers + stage);
      }
      ++loaded;
    }
    clock.mark(0);  // load issue
    if (sent == loaded) break;

    // 2. The item's row and metadata must have landed; the metadata (generic-proxy writes) is then
    //    ordered before the bulk stores (async proxy) that read it.
    const int stage = sent % S;
    const uint32_t dst_mask = policy.next_send(s.tail);
    char* slot_image = w.stage(stage);
    if (!device::mbarrier_wait(w.barriers + stage, (sent / S) & 1, comm.timeout_ns)) ok = false;
    const uint32_t load_failed = __ballot_sync(0xffffffffu, !ok);
    if (load_failed != 0 && lane == __ffs(load_failed) - 1)
      device::fail(comm, Phase::kSendWaitRowLoad, -1, cfg.channel, sent, -1);
    device::fence_proxy_async_shared();
    __syncwarp();
    clock.mark(1);  // waiting for the row


    // 3. One bulk store per destination, from the destination's lane.
    if (ok && lane < cfg.num_dsts && ((dst_mask >> lane) & 1u)) {
      if (wait_ring_space(comm, target, s, cfg.ring_depth, cfg.space_phase, cfg.first_dst_rank + lane, cfg.channel)) {
        device::bulk_store(target.ring + int64_t(s.tail % cfg.ring_depth) * w.slot_bytes + cfg.store_offset,
                           slot_image + cfg.store_offset, store_bytes);
        ++s.tail;
      } else {
        ok = false;
      }
    }
    device::bulk_commit();
    w.tail_history[(sent % kTailHistory) * 32 + lane] = s.tail;
    ++sent;
    if (__any_sync(0xffffffffu, !ok)) {
      // Leave no copy in flight into or out of this block's shared memory, which another block
      // may own once we exit: the loads of items sent - 1 .. loaded - 1 (one timeout bounds them
      // all), then our stores.
      const uint64_t drain_start = device::global_timer_ns();
      for (int item = sent - 1; item < loaded; ++item) {
        const uint64_t spent = device::global_timer_ns() - drain_start;
        if (spent >= comm.timeout_ns) break;
        device::mbarrier_wait(w.barriers + item % S, (item / S) & 1, comm.timeout_ns - spent);
      }
      device::bulk_wait_written(0);
      return false;
    }
    clock.mark(2);  // stores, ring space included
    clock.count_item();

    // 4. Publish the tail as of publish_lag items ago, whose stores are written by now.
    if (sent > cfg.publish_lag) {
      device::bulk_wait_written(cfg.publish_lag);
      const int done = w.tail_history[((sent - 1 - cfg.publish_lag) % kTailHistory) * 32 + lane];
      if (lane < cfg.num_dsts && done - s.published >= cfg.chunk) publish_tail(target, s, done);
    }
    __syncwarp();
    clock.mark(3);  // publishing
  }
  device::bulk_wait_written(0);
  if (lane < cfg.num_dsts && s.published != s.tail) publish_tail(target, s, s.tail);
  __syncwarp();
  clock.mark(4);  // final drain
  return true;
}

}  // namespace flashep::kernels
