#include "qcow2/freed_clusters.h"

#include <algorithm>

#include "qcow2/hex.h"

namespace uqcow::qcow2 {
namespace {
// How much freed space may wait for its unlink to become durable before
// release() makes it durable itself (an L2 write-back and a
// sync under the lock) instead of waiting for the next guest flush. Bounds
// the space a discard-heavy client without flushes keeps allocated; syncing
// much more often than this costs allocating writes their throughput.
constexpr uint64_t kMaxUndurableBytes = 32ull << 20;
constexpr uint64_t kMinUndurableFrees = 16;
}  // namespace

Task<Status> FreedClusters::defer(uint64_t l2e, bool discard) {
  if (&data_file_ != &file_) {
    // QEMU's qcow2_free_any_cluster with a data file: no refcount counts a
    // data cluster, so only the discard passthrough is left to do. It is
    // done now, not deferred: a data-file cluster can only be reused by its
    // own guest offset (MappingWriter::alloc_data_clusters), by a write that
    // takes the lock after this returns, and a deferred discard could land
    // on that newer data. Neither hazard above exists: no other guest offset can reuse
    // the cluster, and a request still in flight on it overlaps this unlink.
    if (discard && !(l2e & kOflagCompressed) && l2_has_host(l2e, true)) {
      (void)co_await data_file_.co_discard(l2e & kL2OffsetMask, geo_.cluster_size);  // advisory
    }
    co_return Status();
  }
  queue_.push_back({l2e, discard, requests_.stamp(), durable_epoch_});
  co_return Status();
}

Task<Status> FreedClusters::make_unlinks_durable() {
  // The L2 cache writes its dependency (refcount blocks) first.
  UQ_CO_TRY(co_await l2_cache_.flush());
  UQ_CO_TRY(co_await file_.co_flush());
  ++durable_epoch_;
  co_return Status();
}

Task<Status> FreedClusters::release() {
  // A grace period, once over, stays over: the scan resumes where the last
  // one stopped, so each entry is looked at about once.
  while (past_grace_ < queue_.size() && requests_.grace_period_over(queue_[past_grace_].stamp)) {
    ++past_grace_;
  }
  if (past_grace_ == 0) co_return Status();
  const uint64_t max_undurable = std::max(kMinUndurableFrees, kMaxUndurableBytes >> geo_.cluster_bits);
  if (queue_.front().epoch == durable_epoch_ && past_grace_ >= max_undurable) {
    UQ_CO_TRY(co_await make_unlinks_durable());
  }
  while (past_grace_ > 0 && queue_.front().epoch < durable_epoch_) {
    const Deferred f = queue_.front();
    queue_.pop_front();
    --past_grace_;
    UQ_CO_TRY(co_await free_now(f.l2e, f.discard));
  }
  co_return Status();
}

Task<Status> FreedClusters::free_now(uint64_t l2e, bool discard) {
  // QEMU's qcow2_free_any_cluster for a cluster of the qcow2 file (never
  // one of an external data file: defer()).
  if (l2e & kOflagCompressed) {
    uint64_t coffset = geo_.compressed_offset(l2e) & ~uint64_t{kSectorSize - 1};
    uint64_t sectors = ((l2e & kL2CompressedMask) >> geo_.csize_shift & geo_.csize_mask) + 1;
    co_return co_await refcounts_.update_refcount(coffset, sectors * kSectorSize, -1, discard);
  }
  uint64_t host = l2e & kL2OffsetMask;
  if (!host) co_return Status();
  if (host & (geo_.cluster_size - 1)) {
    // QEMU's decision: not fatal. The entry is already unlinked; the cluster
    // it named is leaked (check -r leaks reclaims it), nothing is marked.
    reporter_.nonfatal("cannot free unaligned cluster " + hex(host));
    co_return Status();
  }
  co_return co_await refcounts_.update_refcount(host, geo_.cluster_size, -1, discard);
}

}  // namespace uqcow::qcow2
