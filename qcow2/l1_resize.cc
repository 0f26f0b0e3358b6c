// L1Resize (l1_resize.h): growing and shrinking the active L1 table.
#include "qcow2/l1_resize.h"

#include <algorithm>
#include <span>
#include <vector>

#include "block/debug_event.h"
#include "qcow2/header_io.h"
#include "qcow2/hex.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

Task<Status> L1Resize::grow_for(uint64_t disk_size, bool discard_old) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t need = l1_entries_for(disk_size, geo_);
  if (need * 8 > kMaxL1Bytes) co_return Error(EFBIG, "size: " + std::to_string(disk_size) + " needs an L1 table over 32 MiB");
  if (need <= map_.l1().size()) co_return Status();
  // Grow by at least half, as QEMU does, so repeated growth stays cheap.
  uint64_t entries = std::min<uint64_t>(std::max<uint64_t>(need, map_.l1().size() + map_.l1().size() / 2), kMaxL1Bytes / 8);
  uint64_t clusters = (entries * 8 + cs - 1) / cs;
  entries = std::min<uint64_t>(clusters * cs / 8, kMaxL1Bytes / 8);
  file_.debug_event(BlkDebugEvent::kL1GrowAllocTable);
  UQ_CO_ASSIGN_OR_RETURN(uint64_t table, co_await refcounts_.alloc_clusters(clusters));
  UQ_CO_TRY(overlap_.check_metadata_write(table, clusters * cs, "active L1 table"));
  const std::vector<uint8_t> buf = encode_table(map_.l1(), clusters * cs);
  // The refcount of the new table, then the table itself, before the header.
  UQ_CO_TRY(co_await refcounts_.cache().flush());
  file_.debug_event(BlkDebugEvent::kL1GrowWriteTable);
  UQ_CO_TRY(co_await file_.co_write(table, std::span<const std::byte>(reinterpret_cast<const std::byte*>(buf.data()), buf.size())));
  UQ_CO_TRY(co_await file_.co_flush());
  file_.debug_event(BlkDebugEvent::kL1GrowActivateTable);
  UQ_CO_TRY(co_await write_header_fields(file_, {kOffL1Size, entries}, {kOffL1TableOffset, table}));
  UQ_CO_TRY(co_await file_.co_flush());
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_bytes = (uint64_t{header_.l1_size} * 8 + cs - 1) / cs * cs;
  overlap_.remove(MetadataKind::kActiveL1, old_offset, old_bytes);
  overlap_.add(MetadataKind::kActiveL1, table, clusters * cs);
  header_.l1_table_offset = table;
  header_.l1_size = static_cast<uint32_t>(entries);
  map_.grow_l1(entries);
  if (old_bytes) UQ_CO_TRY(co_await refcounts_.update_refcount(old_offset, old_bytes, -1, discard_old));
  co_return Status();
}

Task<Status> L1Resize::shrink_to(uint64_t entries) {
  if (entries >= map_.l1().size()) co_return Status();
  const uint64_t cs = geo_.cluster_size;
  bool any = false;
  for (uint64_t i = entries; i < map_.l1().size(); ++i) any |= (map_.l1()[i] & kL1OffsetMask) != 0;
  if (!any) co_return Status();
  // The entries past the new end are zero on disk before their L2 tables
  // are freed: a crash in between leaks the tables, never reuses one that
  // the table on disk still points at. (The table keeps its size, as QEMU's.)
  const uint64_t first = header_.l1_table_offset + entries * 8;
  const uint64_t bytes = (map_.l1().size() - entries) * 8;
  UQ_CO_TRY(overlap_.check_metadata_write(first, bytes, "L1 entry", overlap_bit(MetadataKind::kActiveL1)));
  file_.debug_event(BlkDebugEvent::kL1ShrinkWriteTable);
  std::vector<std::byte> zeros(bytes);
  Status written = co_await file_.co_write(first, zeros);
  if (written.ok()) written = co_await file_.co_flush();
  if (!written.ok()) {
    // The table on disk may be partly zeroed: forget the tables in memory
    // too (they leak), so nothing is written through an entry the disk may
    // no longer have. Nothing past the new end is allocated (resize checked).
    for (uint64_t i = entries; i < map_.l1().size(); ++i) map_.set_active_l1_entry(i, 0);
    co_return written;
  }
  file_.debug_event(BlkDebugEvent::kL1ShrinkFreeL2Clusters);
  for (uint64_t i = map_.l1().size(); i-- > entries;) {
    const uint64_t l2 = map_.l1()[i] & kL1OffsetMask;
    map_.set_active_l1_entry(i, 0);
    if (!l2) continue;
    if (l2 & (cs - 1)) {
      reporter_.nonfatal("cannot free unaligned L2 table " + hex(l2));
      continue;
    }
    UQ_CO_TRY(co_await refcounts_.update_refcount(l2, cs, -1, /*discard_freed=*/true));
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
