// Creating, applying and deleting internal snapshots (qemu-img snapshot -c,
// -a, -d), after QEMU's qcow2-snapshot.c and qcow2_update_snapshot_refcount.
// Member functions of Qcow2Image.
//
// Refcount model (QEMU's): a data cluster's refcount is the number of L1
// tables (active or snapshot) that reach it, an L2 table's the number of L1
// tables that point at it. OFLAG_COPIED is set in the active tables exactly
// where that count is 1, which is what makes the write path copy on write.
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


// The entry with OFLAG_COPIED recomputed for `refcount`. A walk that drops
// references never sets the flag: the dropped counts are not on disk yet, and
// COPIED must never reach the disk before the refcount 1 it promises. The
// caller's later recompute_copied_flags(), after a refcount flush, sets it.
uint64_t copied_flag(uint64_t entry, uint64_t refcount, int64_t addend) {
  if (refcount != 1) return entry & ~kOflagCopied;
  return addend < 0 ? entry : (entry | kOflagCopied);
}
}  // namespace

Task<Status> Qcow2Image::check_mapping_in_file(const std::vector<uint64_t>& l1) {
  // Every cluster the snapshot will reference must exist: a reference to a
  // cluster past the end of the file would grow the refcount structures to
  // count a cluster that holds nothing. Checked before any refcount changes,
  // so a refusal leaves the image as it was. (QEMU 7.2 fails such a
  // snapshot too, with EAGAIN from its refcount code, after raising the
  // refcounts before it; we refuse first and say why.)
  const uint64_t cs = geo_.cluster_size;
  const uint32_t slice_size = cache_sizes_.l2_entry_size;
  const uint64_t entries = slice_size / geo_.l2_entry_size;
  auto beyond_end = [&](uint64_t offset, uint64_t bytes, const std::string& what) -> Status {
    if (offset < refcounts_->alloc_end() && bytes <= refcounts_->alloc_end() - offset) return Status();
    return corruption(what + " at " + hex(offset) + " lies beyond the end of the image file (" + hex(refcounts_->alloc_end()) +
                      "); no snapshot was created. Run 'uqcow check -r all' to repair the image");
  };
  for (size_t i = 0; i < l1.size(); ++i) {
    const uint64_t l2 = l1[i] & kL1OffsetMask;
    if (!l2) continue;
    if (l2 & (cs - 1)) {
      co_return fatal_corruption(corruption("L2 table offset " + hex(l2) + " unaligned (L1 index " +
                                            std::to_string(i) + ")"));
    }
    UQ_CO_TRY(beyond_end(l2, cs, "the L2 table of L1 index " + std::to_string(i)));
    for (uint64_t off = 0; off < cs; off += slice_size) {
      UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_->l2_cache().get(l2 + off));
      const ConstL2Slice slice(ref.data(), geo_);
      for (uint64_t k = 0; k < entries; ++k) {
        const uint64_t l2e = slice.entry(k);
        const uint64_t bitmap = slice.bitmap(k);
        const uint64_t index = off / geo_.l2_entry_size + k;
        if (const char* why = map_->l2_entry_problem(l2e, bitmap)) {
          co_return fatal_corruption(map_->bad_l2_entry(l2 + off, index, l2e, why));
        }
        if (l2e & kOflagCompressed) {
          const uint64_t coffset = geo_.compressed_offset(l2e);
          UQ_CO_TRY(beyond_end(coffset, geo_.compressed_size(l2e), "compressed data of L2 entry " + hex(l2e)));
        } else if (uint64_t host = l2e & kL2OffsetMask) {
          if (data_file_ == file_.get()) UQ_CO_TRY(beyond_end(host, cs, "the data cluster of L2 entry " + hex(l2e)));
        }
      }
    }
  }
  co_return Status();
}

Task<Status> Qcow2Image::snapshot_slice_refcounts(const uint8_t* slice, uint64_t entries, int64_t addend,
                                                  bool discard) {
  // The refcount half of QEMU's qcow2_update_snapshot_refcount for one L2
  // slice: adds `addend` to every cluster the entries reference. Runs of
  // entries pointing at consecutive host clusters (the common layout) are
  // updated with one call.
  const uint64_t cs = geo_.cluster_size;
  uint64_t run_start = 0, run_len = 0;
  const ConstL2Slice l2(slice, geo_);
  for (uint64_t i = 0; i < entries; ++i) {
    const uint64_t l2e = l2.entry(i);
    if (l2e & kOflagCompressed) {
      // Compressed data is counted by the clusters its sectors touch.
      const uint64_t coffset = geo_.compressed_offset(l2e) & ~uint64_t{kSectorSize - 1};
      const uint64_t sectors = ((l2e & kL2CompressedMask) >> geo_.csize_shift & geo_.csize_mask) + 1;
      UQ_CO_TRY(co_await refcounts_->update_refcount(coffset, sectors * kSectorSize, addend, discard));
      continue;
    }
    const uint64_t host = l2e & kL2OffsetMask;
    if (!host) continue;
    if (host & (cs - 1)) co_return fatal_corruption(corruption("L2 entry points at unaligned cluster " + hex(host)));
    // Stricter than QEMU, which fails here only by accident (EAGAIN while
    // allocating refcount blocks for the offset, iotest 080): an entry past
    // every allocated cluster is damage, and counting it would grow the
    // refcount structure for it. (snapshot_create refuses earlier, in
    // check_mapping_in_file, before changing anything.)
    if (data_file_ == file_.get() && host >= refcounts_->alloc_end()) {
      co_return Error(EIO, file_->name() + ": an L2 entry points at host offset " + hex(host) +
                               ", beyond the end of the image (" + hex(refcounts_->alloc_end()) +
                               "); refusing to count references to it");
    }
    if (run_len && run_start + run_len == host) {
      run_len += cs;
      continue;
    }
    if (run_len) UQ_CO_TRY(co_await refcounts_->update_refcount(run_start, run_len, addend, discard));
    run_start = host;
    run_len = cs;
  }
  if (run_len) UQ_CO_TRY(co_await refcounts_->update_refcount(run_start, run_len, addend, discard));
  co_return Status();
}

Task<Status> Qcow2Image::snapshot_slice_copied(uint8_t* slice, uint64_t entries, int64_t addend, bool& changed) {
  // The OFLAG_COPIED half: recomputes the flag of every entry from the
  // refcount its cluster has now. Compressed clusters never carry it.
  L2Slice l2(slice, geo_);
  for (uint64_t i = 0; i < entries; ++i) {
    const uint64_t l2e = l2.entry(i);
    const uint64_t host = l2e & kL2OffsetMask;
    if ((l2e & kOflagCompressed) || !host) continue;
    const uint64_t cluster = host >> geo_.cluster_bits;
    uint64_t refcount;
    if (auto cached = refcounts_->cached_refcount(cluster)) {
      refcount = *cached;
    } else {
      UQ_CO_ASSIGN_OR_RETURN(refcount, co_await refcounts_->get_refcount(cluster));
    }
    const uint64_t updated = copied_flag(l2e, refcount, addend);
    if (updated != l2e) {
      if (addend > 0 && !changed) {
        // The entry loses COPIED because its refcount went up: that count
        // must reach the disk before this slice does (QEMU sets the same
        // dependency), or a crash leaves COPIED clear at refcount 1.
        UQ_CO_TRY(co_await set_cache_dependency(map_->l2_cache(), refcounts_->cache()));
      }
      l2.set_entry(i, updated);
      changed = true;
    }
  }
  co_return Status();
}

Task<Status> Qcow2Image::snapshot_l2_refcount(uint64_t l2_offset, int64_t addend, bool discard) {
  // Walks every slice of one L2 table; the slices stay pinned across the
  // refcount updates so the entries we fix are the ones written back.
  const uint32_t slice_size = cache_sizes_.l2_entry_size;
  const uint64_t entries = slice_size / geo_.l2_entry_size;
  for (uint64_t off = 0; off < geo_.cluster_size; off += slice_size) {
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_->l2_cache().get(l2_offset + off));
    if (addend != 0) UQ_CO_TRY(co_await snapshot_slice_refcounts(ref.data(), entries, addend, discard));
    bool dirty = false;
    UQ_CO_TRY(co_await snapshot_slice_copied(ref.data(), entries, addend, dirty));
    if (dirty) map_->l2_cache().mark_dirty(ref);
  }
  co_return Status();
}

Task<Status> Qcow2Image::update_snapshot_refcount(std::vector<uint64_t>& l1, int64_t addend, bool discard,
                                                  bool& l1_changed) {
  // QEMU's qcow2_update_snapshot_refcount for one L1 table: adds `addend` to
  // every L2 table and data cluster `l1` reaches, then recomputes COPIED in
  // the L2 entries and in `l1` (the caller writes `l1` back if it is active).
  for (uint64_t& l1e : l1) {
    const uint64_t l2 = l1e & kL1OffsetMask;
    if (!l2) continue;
    if (l2 & (geo_.cluster_size - 1)) {
      co_return fatal_corruption(corruption("L2 table offset " + hex(l2) + " unaligned"));
    }
    UQ_CO_TRY(co_await snapshot_l2_refcount(l2, addend, discard));
    if (addend != 0) {
      // A table that drops to refcount 0 leaves the cache with it.
      UQ_CO_TRY(co_await refcounts_->update_refcount(l2, geo_.cluster_size, addend, discard));
    }
    UQ_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await refcounts_->get_refcount(l2 >> geo_.cluster_bits));
    const uint64_t updated = copied_flag(l1e, rc, addend);
    if (updated != l1e) {
      l1e = updated;
      l1_changed = true;
    }
  }
  co_return Status();
}

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
  if (!deferred_frees_.empty()) {
    UQ_CO_TRY(co_await make_unlinks_durable());
    UQ_CO_TRY(co_await release_deferred_frees());
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
  UQ_CO_TRY(co_await check_mapping_in_file(map_->l1()));
  // Everything the active L1 reaches gains the snapshot's reference; the
  // active entries lose COPIED, so later writes copy on write.
  // The walk works on a copy: map_->l1() changes only with the disk's table.
  bool l1_changed = false;
  std::vector<uint64_t> active = map_->l1();
  UQ_CO_TRY(co_await update_snapshot_refcount(active, +1, false, l1_changed));
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

Task<Result<std::vector<uint64_t>>> Qcow2Image::read_l1_table(uint64_t offset, uint32_t entries) {
  co_return co_await read_table(*file_, offset, entries);
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
  UQ_CO_ASSIGN_OR_RETURN(std::vector<uint64_t> l1, co_await read_l1_table(sn.l1_table_offset, sn.l1_size));
  // Its L2 tables stop being inactive ones for this snapshot before any of
  // them can be freed and reused.
  overlap_->l2_tables(MetadataKind::kInactiveL2, l1, false);
  bool unused = false;
  const bool discard = options_.pass_discard_snapshot;
  UQ_CO_TRY(co_await update_snapshot_refcount(l1, -1, discard, unused));
  if (l1_bytes) UQ_CO_TRY(co_await refcounts_->update_refcount(sn.l1_table_offset, l1_bytes, -1, discard));
  // Clusters now only the active tables reach get COPIED back, once the
  // lowered refcounts are on disk.
  UQ_CO_TRY(co_await flush_metadata());
  bool l1_changed = false;
  std::vector<uint64_t> active = map_->l1();
  UQ_CO_TRY(co_await recompute_copied_flags(active, l1_changed));
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
  const Snapshot sn = *found;
  if (sn.disk_size != size_) UQ_CO_TRY(co_await resize_exclusive(sn.disk_size, /*zero_new_area=*/false));
  auto guard = co_await lock_.scoped_lock();
  if (sn.l1_size > map_->l1().size()) {
    co_return Error(ENOTSUP, "snapshot '" + key + "' has a larger L1 table than the image");
  }
  UQ_CO_TRY(co_await flush_metadata());
  OverlapGuard::SharedL2Rewrite rewrite(*overlap_);  // as in snapshot_delete
  UQ_CO_ASSIGN_OR_RETURN(std::vector<uint64_t> next, co_await read_l1_table(sn.l1_table_offset, sn.l1_size));
  next.resize(map_->l1().size(), 0);
  // The snapshot's clusters gain the active reference, and those counts reach
  // the disk before the active L1 points at them.
  bool unused = false;
  UQ_CO_TRY(co_await update_snapshot_refcount(next, +1, false, unused));
  UQ_CO_TRY(co_await flush_metadata());
  std::vector<uint64_t> old = map_->l1();
  for (uint64_t& e : next) e &= ~kOflagCopied;
  // map_->l1() becomes `next` only once the disk's active table is `next` too:
  // reads and writes after a failed write still go through the old table.
  UQ_CO_TRY(co_await write_active_l1(next));
  UQ_CO_TRY(co_await file_->co_flush());
  // What the old active table reached loses that reference.
  UQ_CO_TRY(co_await update_snapshot_refcount(old, -1, false, unused));
  // COPIED is set only after the lowered refcounts are on disk.
  UQ_CO_TRY(co_await flush_metadata());
  bool l1_changed = false;
  std::vector<uint64_t> active = map_->l1();
  UQ_CO_TRY(co_await recompute_copied_flags(active, l1_changed));
  UQ_CO_TRY(co_await map_->l2_cache().flush());
  if (l1_changed) UQ_CO_TRY(co_await write_active_l1(active));
  co_return co_await flush_metadata();
}

}  // namespace uqcow::qcow2
