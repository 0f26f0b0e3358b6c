// Freeing the host clusters of unlinked L2 entries, safely against requests
// in flight and against crashes. Member functions of Qcow2Image; the lock is
// held in all of them.
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
#include <algorithm>

#include "block/endian.h"
#include "qcow2/hex.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {
namespace {
// How much freed space may wait for its unlink to become durable before
// release_deferred_frees() makes it durable itself (an L2 write-back and a
// sync under the lock) instead of waiting for the next guest flush. Bounds
// the space a discard-heavy client without flushes keeps allocated; syncing
// much more often than this costs allocating writes their throughput.
constexpr uint64_t kMaxUndurableBytes = 32ull << 20;
constexpr uint64_t kMinUndurableFrees = 16;
}  // namespace

Task<Status> Qcow2Image::free_cluster_entry(uint64_t l2e, bool discard) {
  if (header_.has_data_file()) {
    // QEMU's qcow2_free_any_cluster with a data file: no refcount counts a
    // data cluster, so only the discard passthrough is left to do. It is
    // done now, not deferred: a data-file cluster can only be reused by its
    // own guest offset (alloc_data_clusters), by a write that takes the lock
    // after this returns, and a deferred discard could land on that newer
    // data. Neither hazard above exists: no other guest offset can reuse
    // the cluster, and a request still in flight on it overlaps this unlink.
    if (discard && !(l2e & kOflagCompressed) && l2_has_host(l2e, true)) {
      (void)co_await data_file_->co_discard(l2e & kL2OffsetMask, geo_.cluster_size);  // advisory
    }
    co_return Status();
  }
  deferred_frees_.push_back({l2e, discard, requests_.stamp(), durable_epoch_});
  co_return Status();
}

Task<Status> Qcow2Image::make_unlinks_durable() {
  // The L2 cache writes its dependency (refcount blocks) first.
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  UQ_CO_TRY(co_await file_->co_flush());
  ++durable_epoch_;
  co_return Status();
}

Task<Status> Qcow2Image::release_deferred_frees() {
  // A grace period, once over, stays over: the scan resumes where the last
  // one stopped, so each entry is looked at about once.
  while (deferred_past_grace_ < deferred_frees_.size() &&
         requests_.grace_period_over(deferred_frees_[deferred_past_grace_].stamp)) {
    ++deferred_past_grace_;
  }
  if (deferred_past_grace_ == 0) co_return Status();
  const uint64_t max_undurable = std::max(kMinUndurableFrees, kMaxUndurableBytes >> geo_.cluster_bits);
  if (deferred_frees_.front().epoch == durable_epoch_ && deferred_past_grace_ >= max_undurable) {
    UQ_CO_TRY(co_await make_unlinks_durable());
  }
  while (deferred_past_grace_ > 0 && deferred_frees_.front().epoch < durable_epoch_) {
    const DeferredFree f = deferred_frees_.front();
    deferred_frees_.pop_front();
    --deferred_past_grace_;
    UQ_CO_TRY(co_await free_cluster_now(f.l2e, f.discard));
  }
  co_return Status();
}

Task<Status> Qcow2Image::free_cluster_now(uint64_t l2e, bool discard) {
  // QEMU's qcow2_free_any_cluster for a cluster of the qcow2 file (never
  // one of an external data file: free_cluster_entry).
  if (l2e & kOflagCompressed) {
    uint64_t coffset = geo_.compressed_offset(l2e) & ~uint64_t{kSectorSize - 1};
    uint64_t sectors = ((l2e & kL2CompressedMask) >> geo_.csize_shift & geo_.csize_mask) + 1;
    co_return co_await refcounts_->update_refcount(coffset, sectors * kSectorSize, -1, discard);
  }
  uint64_t host = l2e & kL2OffsetMask;
  if (!host) co_return Status();
  if (host & (geo_.cluster_size - 1)) {
    // QEMU's decision: not fatal. The entry is already unlinked; the cluster
    // it named is leaked (check -r leaks reclaims it), nothing is marked.
    nonfatal_corruption("cannot free unaligned cluster " + hex(host));
    co_return Status();
  }
  co_return co_await refcounts_->update_refcount(host, geo_.cluster_size, -1, discard);
}

}  // namespace uqcow::qcow2
