// FreedClusters: freeing the host clusters of unlinked L2 entries, safely
// against requests in flight and against crashes. The image lock is held in
// every member function (Qcow2Image calls them under it).
//
// When an L2 entry stops pointing at a host cluster (discard, zero with
// unmap, a replaced compressed or shared cluster), the cluster's reference
// is dropped only once two things hold:
//
// 1. Grace period: every request that started before the unlink has
//    finished. Lock-free reads and in-place writes map a cluster without
//    registering it; had the cluster been reused at once, such a read would
//    return another guest offset's data and such a write would land in
//    another guest offset's cluster.
// 2. Durable unlink: the L2 table without the entry has reached the disk
//    (L2 cache written back, file synced). Otherwise the cluster could be
//    reused and rewritten with another guest offset's data, and a crash
//    would leave the old L2 entry on disk pointing at that data. (QEMU 7.2
//    reuses at once and has this window.)
//
// Until then the cluster keeps its refcount: a crash leaks it at most.
// Stamps and epochs only grow along the queue, so what can be freed is
// always a prefix of it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>

#include "engine/in_flight.h"
#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cache.h"
#include "qcow2/corruption.h"
#include "qcow2/format.h"
#include "qcow2/refcounts.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class FreedClusters {
 public:
  // `file` is the qcow2 file; `data_file` the external data file, or `file`
  // itself. `requests` stamps the unlinks and says when their grace period
  // is over; `l2_cache` is written back to make unlinks durable.
  FreedClusters(const Geometry& geo, BlockDevice& file, BlockDevice& data_file, const InFlightTracker& requests,
                Refcounts& refcounts, MetadataCache& l2_cache, CorruptionReporter& reporter)
      : geo_(geo), file_(file), data_file_(data_file), requests_(requests), refcounts_(refcounts),
        l2_cache_(l2_cache), reporter_(reporter) {}

  // Takes the reference of an L2 entry the caller has just unlinked (QEMU's
  // qcow2_free_any_cluster). With an external data file nothing is counted:
  // only the discard passthrough is done, at once. Otherwise the reference
  // is queued and dropped by a later release().
  Task<Status> defer(uint64_t l2e, bool discard);
  // Drops the queued references whose grace period is over and whose unlink
  // is durable; when too many wait only for durability, makes the unlinks
  // durable first (make_unlinks_durable).
  Task<Status> release();
  // Writes back the L2 cache (its refcount-block dependency first) and syncs
  // the file: every unlink so far is durable.
  Task<Status> make_unlinks_durable();
  // The caller has just made every unlink durable itself (a guest flush
  // wrote back the caches and synced).
  void unlinks_are_durable() { ++durable_epoch_; }

  bool empty() const { return queue_.empty(); }
  size_t size() const { return queue_.size(); }

 private:
  // Drops one reference now: a compressed run's bytes or a whole cluster.
  Task<Status> free_now(uint64_t l2e, bool discard);

  struct Deferred {
    uint64_t l2e;     // the unlinked L2 entry
    bool discard;     // punch the freed range
    uint64_t stamp;   // requests_.stamp() when it was unlinked
    uint64_t epoch;   // durable_epoch_ when it was unlinked
  };
  const Geometry& geo_;
  BlockDevice& file_;
  BlockDevice& data_file_;
  const InFlightTracker& requests_;
  Refcounts& refcounts_;
  MetadataCache& l2_cache_;
  CorruptionReporter& reporter_;
  std::deque<Deferred> queue_;
  size_t past_grace_ = 0;  // leading entries known past their grace period
  // Counts the points at which every L2 change so far was on disk.
  uint64_t durable_epoch_ = 0;
};

}  // namespace uqcow::qcow2
