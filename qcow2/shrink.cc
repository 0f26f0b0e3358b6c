// Giving back what a smaller disk no longer needs (QEMU's
// qcow2_shrink_l1_table, qcow2_shrink_reftable and the file truncation of
// qcow2_co_truncate). Member functions of Qcow2Image, called by resize() in
// its drained section with the lock held: no request is in flight, so
// freed clusters go at once instead of through the deferred-free queue.
#include <algorithm>
#include <cstdio>

#include "block/debug_event.h"
#include "block/endian.h"
#include "qcow2/hex.h"
#include "qcow2/image.h"
#include "qcow2/tables.h"
#include "qcow2/refcount_entry.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::shrink_l1_table(uint64_t entries) {
  if (entries >= map_->l1().size()) co_return Status();
  const uint64_t cs = geo_.cluster_size;
  bool any = false;
  for (uint64_t i = entries; i < map_->l1().size(); ++i) any |= (map_->l1()[i] & kL1OffsetMask) != 0;
  if (!any) co_return Status();
  // The entries past the new end are zero on disk before their L2 tables
  // are freed: a crash in between leaks the tables, never reuses one that
  // the table on disk still points at. (The table keeps its size, as QEMU's.)
  const uint64_t first = header_.l1_table_offset + entries * 8;
  const uint64_t bytes = (map_->l1().size() - entries) * 8;
  UQ_CO_TRY(overlap_->check_metadata_write(first, bytes, "L1 entry", overlap_bit(MetadataKind::kActiveL1)));
  file_->debug_event(BlkDebugEvent::kL1ShrinkWriteTable);
  std::vector<std::byte> zeros(bytes);
  Status written = co_await file_->co_write(first, zeros);
  if (written.ok()) written = co_await file_->co_flush();
  if (!written.ok()) {
    // The table on disk may be partly zeroed: forget the tables in memory
    // too (they leak), so nothing is written through an entry the disk may
    // no longer have. Nothing past the new end is allocated (resize checked).
    for (uint64_t i = entries; i < map_->l1().size(); ++i) map_->set_active_l1_entry(i, 0);
    co_return written;
  }
  file_->debug_event(BlkDebugEvent::kL1ShrinkFreeL2Clusters);
  for (uint64_t i = map_->l1().size(); i-- > entries;) {
    const uint64_t l2 = map_->l1()[i] & kL1OffsetMask;
    map_->set_active_l1_entry(i, 0);
    if (!l2) continue;
    if (l2 & (cs - 1)) {
      nonfatal_corruption("cannot free unaligned L2 table " + hex(l2));
      continue;
    }
    UQ_CO_TRY(co_await refcounts_->update_refcount(l2, cs, -1, /*discard_freed=*/true));
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
