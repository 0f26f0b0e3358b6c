// Creating, applying and deleting internal snapshots (qemu-img snapshot -c,
// -a, -d), after QEMU's qcow2-snapshot.c and qcow2_update_snapshot_refcount.
// Member functions of Qcow2Image.
//
// The refcount walks are qcow2/snapshot_refcounts.h's.
//
// Crash safety: refcounts only ever go up before the header points at a new
// snapshot table, and only go down after it stopped pointing at the old one,
// so a crash anywhere leaks clusters at most.
#include <algorithm>
#include <cerrno>
#include <ctime>

#include "block/debug_event.h"
#include "block/endian.h"
#include "qcow2/header_io.h"
#include "qcow2/hex.h"
#include "qcow2/image.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {
std::span<const std::byte> cbytes_of(const std::vector<uint8_t>& v) { return std::as_bytes(std::span(v)); }
}  // namespace

Task<Status> Qcow2Image::write_active_l1(const std::vector<uint64_t>& table) {
  // Writes `table` over the active L1 table and, only once the write
  // succeeded, makes it the in-memory one (with its L2 tables as the
  // active-L2 overlap regions): after a failed write, map_->l1() still holds what
  // the disk held before (a torn write aside, as in QEMU), and the
  // references the new table would have taken are leaked at most.
  const std::vector<uint8_t> raw = encode_table(table);
  UQ_CO_TRY(overlap_->check_metadata_write(header_.l1_table_offset, raw.size(), "active L1 table",
                                 overlap_bit(MetadataKind::kActiveL1)));
  file_->debug_event(BlkDebugEvent::kL1Update);
  UQ_CO_TRY(co_await file_->co_write(header_.l1_table_offset, cbytes_of(raw)));
  map_->replace_l1(table);
  co_return Status();
}

Task<Status> Qcow2Image::flush_metadata() {
  // In a drained section every deferred free is past its grace period; once
  // the unlinks are on disk they are all released.
  if (!freed_->empty()) {
    UQ_CO_TRY(co_await freed_->make_unlinks_durable());
    UQ_CO_TRY(co_await freed_->release());
  }
  UQ_CO_TRY(co_await refcounts_->cache().flush());
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  UQ_CO_TRY(co_await refcounts_->process_discards());
  co_return co_await file_->co_flush();
}

Status Qcow2Image::check_snapshot_support() const {
  if (header_.has_data_file()) return Error(ENOTSUP, "internal snapshots are not supported with an external data file");
  if (!options_.snapshot.empty()) return Error(EPERM, "the image is opened at a snapshot");
  return check_writable(0, 0);
}

Task<Status> Qcow2Image::snapshot_create(const std::string& name) {
  auto exclusive = co_await exclusive_.scoped_lock();  // see image.h
  UQ_CO_TRY(check_snapshot_support());
  co_await requests_.drain();  // see the invariants in image.h
  DrainedSection drained(requests_);
  auto guard = co_await lock_.scoped_lock();
  for (const auto& s : snapshots_->list()) {
    if (s.name == name) co_return Error(EEXIST, "snapshot '" + name + "' already exists");
  }
  if (snapshots_->list().size() >= kMaxSnapshots) co_return Error(EFBIG, "too many snapshots");
  UQ_CO_TRY(co_await flush_metadata());
  UQ_CO_TRY(co_await snapshot_refs_->check_in_file(map_->l1()));
  // Everything the active L1 reaches gains the snapshot's reference; the
  // active entries lose COPIED, so later writes copy on write.
  // The walk works on a copy: map_->l1() changes only with the disk's table.
  bool l1_changed = false;
  std::vector<uint64_t> active = map_->l1();
  UQ_CO_TRY(co_await snapshot_refs_->update(active, +1, false, l1_changed));
  // The raised refcounts are durable before the L2 tables (their cache
  // depends on the refcount cache) and the L1 table drop COPIED.
  UQ_CO_TRY(co_await refcounts_->cache().flush());
  UQ_CO_TRY(co_await file_->co_flush());
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  if (l1_changed) UQ_CO_TRY(co_await write_active_l1(active));
  std::vector<uint64_t> inactive(map_->l1());
  for (uint64_t& e : inactive) e &= ~kOflagCopied;
  const std::vector<uint8_t> l1_copy = encode_table(inactive);
  UQ_CO_ASSIGN_OR_RETURN(uint64_t l1_offset,
                         co_await refcounts_->write_new_metadata(l1_copy, MetadataKind::kInactiveL1));

  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  Snapshot sn;
  sn.l1_table_offset = l1_offset;
  sn.l1_size = static_cast<uint32_t>(map_->l1().size());
  sn.id = snapshots_->next_id();
  sn.name = name;
  sn.date_sec = static_cast<uint32_t>(now.tv_sec);
  sn.date_nsec = static_cast<uint32_t>(now.tv_nsec);
  sn.disk_size = size_;
  sn.has_icount = true;
  sn.icount = 0;  // what qemu-img snapshot -c records without replay
  std::vector<Snapshot> next = snapshots_->list();
  next.push_back(std::move(sn));
  UQ_CO_TRY(co_await snapshots_->replace(std::move(next), options_.pass_discard_snapshot));
  // The active L2 tables are the snapshot's too from now on (the COPIED
  // changes above were written while they were not yet inactive).
  overlap_->l2_tables(MetadataKind::kInactiveL2, map_->l1(), true);
  co_return co_await flush_metadata();
}

Task<Status> Qcow2Image::snapshot_delete(const std::string& key) {
  auto exclusive = co_await exclusive_.scoped_lock();  // see image.h
  UQ_CO_TRY(check_snapshot_support());
  co_await requests_.drain();  // see the invariants in image.h
  DrainedSection drained(requests_);
  auto guard = co_await lock_.scoped_lock();
  const Snapshot* found = snapshots_->find(key);
  if (!found) co_return Error(ENOENT, "snapshot '" + key + "' not found");
  const Snapshot sn = *found;
  std::vector<Snapshot> next;
  for (const auto& s : snapshots_->list()) {
    if (&s != found) next.push_back(s);
  }
  UQ_CO_TRY(co_await flush_metadata());
  // Guest writes are flushed and checked as usual; from here on L2 tables
  // change only by the walks below.
  OverlapGuard::SharedL2Rewrite rewrite(*overlap_);
  // The header stops pointing at the snapshot before any refcount drops.
  UQ_CO_TRY(co_await snapshots_->replace(std::move(next), options_.pass_discard_snapshot));
  const uint64_t l1_bytes = round_up(uint64_t{sn.l1_size} * 8, geo_.cluster_size);
  overlap_->remove(MetadataKind::kInactiveL1, sn.l1_table_offset, l1_bytes);
  UQ_CO_ASSIGN_OR_RETURN(std::vector<uint64_t> l1, co_await read_table(*file_, sn.l1_table_offset, sn.l1_size));
  // Its L2 tables stop being inactive ones for this snapshot before any of
  // them can be freed and reused.
  overlap_->l2_tables(MetadataKind::kInactiveL2, l1, false);
  bool unused = false;
  const bool discard = options_.pass_discard_snapshot;
  UQ_CO_TRY(co_await snapshot_refs_->update(l1, -1, discard, unused));
  if (l1_bytes) UQ_CO_TRY(co_await refcounts_->update_refcount(sn.l1_table_offset, l1_bytes, -1, discard));
  // Clusters now only the active tables reach get COPIED back, once the
  // lowered refcounts are on disk.
  UQ_CO_TRY(co_await flush_metadata());
  bool l1_changed = false;
  std::vector<uint64_t> active = map_->l1();
  UQ_CO_TRY(co_await snapshot_refs_->recompute_copied_flags(active, l1_changed));
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  if (l1_changed) UQ_CO_TRY(co_await write_active_l1(active));
  co_return co_await flush_metadata();
}

Task<Status> Qcow2Image::snapshot_apply(const std::string& key) {
  auto exclusive = co_await exclusive_.scoped_lock();  // see image.h
  UQ_CO_TRY(check_snapshot_support());
  co_await requests_.drain();  // see the invariants in image.h
  DrainedSection drained(requests_);
  const Snapshot* found = snapshots_->find(key);
  if (!found) co_return Error(ENOENT, "snapshot '" + key + "' not found");
  // The bitmaps could not say what the snapshot's contents changed:
  // QEMU's bdrv_snapshot_goto refuses as well.
  if (!bitmaps_->empty()) co_return Error(EBUSY, "Device has active dirty bitmaps");
  const Snapshot sn = *found;
  if (sn.disk_size != size_) UQ_CO_TRY(co_await resize_exclusive(sn.disk_size, /*zero_new_area=*/false));
  auto guard = co_await lock_.scoped_lock();
  if (sn.l1_size > map_->l1().size()) {
    co_return Error(ENOTSUP, "snapshot '" + key + "' has a larger L1 table than the image");
  }
  UQ_CO_TRY(co_await flush_metadata());
  OverlapGuard::SharedL2Rewrite rewrite(*overlap_);  // as in snapshot_delete
  UQ_CO_ASSIGN_OR_RETURN(std::vector<uint64_t> next, co_await read_table(*file_, sn.l1_table_offset, sn.l1_size));
  next.resize(map_->l1().size(), 0);
  // The snapshot's clusters gain the active reference, and those counts reach
  // the disk before the active L1 points at them.
  bool unused = false;
  UQ_CO_TRY(co_await snapshot_refs_->update(next, +1, false, unused));
  UQ_CO_TRY(co_await flush_metadata());
  std::vector<uint64_t> old = map_->l1();
  for (uint64_t& e : next) e &= ~kOflagCopied;
  // map_->l1() becomes `next` only once the disk's active table is `next` too:
  // reads and writes after a failed write still go through the old table.
  UQ_CO_TRY(co_await write_active_l1(next));
  UQ_CO_TRY(co_await file_->co_flush());
  // What the old active table reached loses that reference.
  UQ_CO_TRY(co_await snapshot_refs_->update(old, -1, false, unused));
  // COPIED is set only after the lowered refcounts are on disk.
  UQ_CO_TRY(co_await flush_metadata());
  bool l1_changed = false;
  std::vector<uint64_t> active = map_->l1();
  UQ_CO_TRY(co_await snapshot_refs_->recompute_copied_flags(active, l1_changed));
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  if (l1_changed) UQ_CO_TRY(co_await write_active_l1(active));
  co_return co_await flush_metadata();
}

}  // namespace uqcow::qcow2
