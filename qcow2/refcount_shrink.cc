// Shrinking the refcount structures after a resize to a smaller size
// (QEMU's qcow2_shrink_reftable and the file truncation of
// qcow2_co_truncate). Members of Refcounts (refcounts.h).
#include <algorithm>
#include <cstdio>

#include "qcow2/hex.h"
#include "qcow2/refcount_entry.h"
#include "qcow2/refcounts.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

Task<Status> Refcounts::shrink_refcount_table() {
  const uint64_t cs = geo_.cluster_size;
  // Which blocks count nothing but (maybe) themselves.
  std::vector<uint64_t> kept = reftable_;
  bool dropping = false;
  for (uint64_t i = 0; i < reftable_.size(); ++i) {
    const uint64_t block = reftable_[i] & kReftableOffsetMask;
    if (!block) continue;
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await load_refcount_block(i));
    const uint64_t own_index = block >> geo_.cluster_bits;
    const bool self_counted = (own_index >> refblock_bits_) == i;
    const uint64_t self_slot = own_index & ((1ull << refblock_bits_) - 1);
    bool unused = true;
    for (uint64_t k = 0; k < (1ull << refblock_bits_) && unused; ++k) {
      if (self_counted && k == self_slot) continue;
      unused = get_refcount_entry(ref.data(), k, header_.refcount_order) == 0;
    }
    if (unused) {
      kept[i] = 0;
      dropping = true;
    }
  }
  if (!dropping) co_return Status();

  // The table without them reaches the disk first; then the blocks are
  // freed. A crash in between leaks them.
  const std::vector<uint8_t> table = encode_table(kept, uint64_t{header_.refcount_table_clusters} * cs);
  UQ_CO_TRY(overlap_->check_metadata_write(header_.refcount_table_offset, table.size(), "refcount table",
                                 overlap_bit(MetadataKind::kRefcountTable)));
  Status status = co_await file_->co_write(header_.refcount_table_offset,
                                          std::span<const std::byte>(reinterpret_cast<const std::byte*>(table.data()),
                                                                     table.size()));
  if (status.ok()) status = co_await file_->co_flush();
  // As QEMU: whether or not the write succeeded, the dropped entries leave
  // the in-memory table (a failed write may have reached the disk in part;
  // refcounts of clusters no block covers then read as 0, and check -r
  // repairs them), and the blocks are freed only after a good write.
  for (uint64_t i = 0; i < kept.size(); ++i) {
    const uint64_t block = reftable_[i] & kReftableOffsetMask;
    if (!block || kept[i]) continue;
    if (status.ok()) status = co_await free_refcount_block(block);
    reftable_[i] = 0;
    refcount_cache_->discard_range(block, cs);
    overlap_->remove(MetadataKind::kRefcountBlock, block, cs);
  }
  co_return status;
}

Task<Status> Refcounts::free_refcount_block(uint64_t block) {
  // QEMU's qcow2_discard_refcount_block: the block's own refcount, held by
  // the block that covers its cluster (maybe itself), goes from 1 to 0.
  const uint64_t index = block >> geo_.cluster_bits;
  const uint64_t rt = index >> refblock_bits_;
  if (rt >= reftable_.size() || (reftable_[rt] & kReftableOffsetMask) == 0) {
    co_return fatal_corruption(corruption("refcount block at " + hex(block) +
                                          " is not covered by the refcount structures"));
  }
  UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await load_refcount_block(rt));
  const uint64_t slot = index & ((1ull << refblock_bits_) - 1);
  const uint64_t refcount = get_refcount_entry(ref.data(), slot, header_.refcount_order);
  if (refcount != 1) {
    co_return fatal_corruption(corruption("refcount block at " + hex(block) + " has refcount " +
                                          std::to_string(refcount) + " (expected 1)"));
  }
  set_refcount_entry(ref.data(), slot, header_.refcount_order, 0);
  refcount_cache_->mark_dirty(ref);
  free_cluster_index_ = std::min(free_cluster_index_, index);
  co_return Status();
}

Task<Status> Refcounts::truncate_to_last_cluster() {
  // QEMU truncates the file after the last cluster with a reference; only a
  // warning if that fails (the image itself is fine).
  UQ_CO_ASSIGN_OR_RETURN(uint64_t length, file_->length());
  const uint64_t cs = geo_.cluster_size;
  uint64_t end = (length + cs - 1) >> geo_.cluster_bits;  // clusters
  // Refcounts must be current on disk before the file loses what they name.
  UQ_CO_TRY(co_await refcount_cache_->flush());
  while (end > 0) {
    UQ_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await get_refcount(end - 1));
    if (rc) break;
    --end;
  }
  if ((end << geo_.cluster_bits) < length) {
    Status s = file_->truncate(end << geo_.cluster_bits);
    if (!s.ok()) {
      std::fprintf(stderr, "uqcow: warning: failed to truncate the tail of the image: %s\n", s.message().c_str());
    } else {
      alloc_end_ = std::min(alloc_end_, end << geo_.cluster_bits);
      free_cluster_index_ = std::min(free_cluster_index_, end);
    }
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
