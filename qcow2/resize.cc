// Changing the virtual size (qemu-img resize). Member functions of
// Qcow2Image, after QEMU's qcow2_co_truncate.
//
// Growing may need a larger L1 table: the new table is written and flushed
// before the header points at it (l1_size and l1_table_offset are adjacent
// and change in one write), and the old one is freed afterwards, as QEMU's
// qcow2_grow_l1_table. Shrinking discards every cluster past the new end,
// frees the L2 tables and refcount blocks that no longer count anything and
// truncates the file (shrink.cc), as QEMU does. An external data file
// follows the disk's size; a raw one gets the added area preallocated
// (metadata).
//
// Bytes past the old end read as zero after a grow. QEMU does not promise
// that: it keeps the bytes of the cluster that holds the new end when it
// shrinks, and shows them again when it grows. Here the partial cluster's
// tail is zeroed on both sides: past the new end when shrinking (so that
// qemu-img growing the image later finds zeros), and past the old end when
// growing (for images shrunk by someone else). Both writes happen before the
// header's size changes: a crash in between leaves the old size, with zeros
// where the caller asked to drop the data, or beyond the visible end.
#include <algorithm>
#include <vector>

#include "block/debug_event.h"
#include "block/endian.h"
#include "qcow2/header_io.h"
#include "qcow2/image.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

Task<Status> Qcow2Image::resize(uint64_t new_size) {
  auto exclusive = co_await exclusive_.scoped_lock();  // see image.h
  co_return co_await resize_exclusive(new_size, /*zero_new_area=*/true);
}

Task<Status> Qcow2Image::resize_exclusive(uint64_t new_size, bool zero_new_area) {
  UQ_CO_TRY(check_writable(0, 0));
  // QEMU's qcow2_co_truncate refuses what its header could not keep exactly
  // (bs->total_sectors counts whole sectors).
  if (new_size % kSectorSize) co_return Error(EINVAL, "The new size must be a multiple of 512");
  // No request may be in flight past a new, smaller end, or hold an L1
  // entry while the table moves.
  co_await requests_.drain();
  DrainedSection drained(requests_);
  // Snapshots record their own disk size from v3 on; QEMU refuses v2.
  if (!snapshots_->list().empty() && !v3_) co_return Error(ENOTSUP, "Can't resize a v2 image which has snapshots");
  const uint64_t old_size = size_;
  if (new_size < old_size) UQ_CO_TRY(co_await drop_tail(new_size));
  const bool data_file = header_.has_data_file();
  {
    auto guard = co_await lock_.scoped_lock();
    UQ_CO_TRY(co_await grow_l1_for(new_size));
    if (new_size < old_size) {
      // As QEMU's qcow2_co_truncate: the metadata past the new end goes
      // before the size changes, so a failure leaves the old size. The
      // discarded clusters are freed first (no request is in flight to wait
      // for).
      UQ_CO_TRY(co_await flush_metadata());
      UQ_CO_TRY(co_await shrink_l1_table(l1_entries_for(new_size, geo_)));
      UQ_CO_TRY(co_await refcounts_->shrink_refcount_table());
      UQ_CO_TRY(co_await refcounts_->truncate_to_last_cluster());
    }
    if (header_.data_file_raw() && new_size > old_size) {
      // QEMU's qcow2_co_truncate: a raw data file reads as the disk only if
      // the L2 tables map every guest cluster 1:1, so the added area is
      // preallocated (metadata), as creation preallocates the whole disk.
      std::vector<HostRun> runs;
      UQ_CO_TRY(co_await preallocate_metadata(old_size, new_size, /*fresh=*/false, runs));
      UQ_CO_TRY(co_await map_->l2_cache().flush());
      UQ_CO_TRY(co_await refcounts_->cache().flush());
      UQ_CO_TRY(co_await file_->co_flush());
    }
    // QEMU resizes an external data file with the disk: clusters sit at
    // their guest offsets, so it holds exactly the disk (a raw one as
    // preallocation leaves it, data_file_end). It grows before the header
    // says the disk is larger, and shrinks after it says the disk is
    // smaller, so the disk never reaches past its end.
    if (data_file && new_size > old_size) {
      const uint64_t end = header_.data_file_raw() ? data_file_end(new_size) : new_size;
      UQ_CO_ASSIGN_OR_RETURN(uint64_t length, data_file_->length());
      if (end > length) UQ_CO_TRY(data_file_->truncate(end));
      UQ_CO_TRY(co_await data_file_->co_flush());
    }
  }
  // Until the header says otherwise, a failure leaves the old size in memory.
  struct SizeRollback {
    uint64_t& size;
    uint64_t old;
    bool committed = false;
    ~SizeRollback() {
      if (!committed) size = old;
    }
  } rollback{size_, old_size};
  if (new_size > old_size && zero_new_area) {
    // The write path keeps requests below size_: let the zeros reach the
    // new area (nothing else runs in the drained section).
    size_ = new_size;
    UQ_CO_TRY(co_await zero_partial_cluster(old_size, new_size));
    UQ_CO_TRY(co_await zero_over_backing(old_size, new_size));
  }
  auto guard = co_await lock_.scoped_lock();
  // The zeros (zero flags in cached L2 slices) reach the disk before the
  // header says the disk is larger: a crash in between must not show a
  // backing file, or old data, past the old end.
  if (new_size > old_size && zero_new_area) UQ_CO_TRY(co_await flush_metadata());
  UQ_CO_TRY(co_await write_header_fields(*file_, {kOffSize, new_size}));
  UQ_CO_TRY(co_await file_->co_flush());
  header_.size = new_size;
  size_ = new_size;
  rollback.committed = true;
  if (data_file && new_size < old_size) UQ_CO_TRY(data_file_->truncate(new_size));
  co_return Status();
}

Task<Status> Qcow2Image::drop_tail(uint64_t new_size) {
  // Guest bytes [new_size, size_) go: the partial cluster's tail is zeroed,
  // the whole clusters after it are discarded (their entries cleared, their
  // references dropped), as QEMU's qcow2_cluster_discard(full_discard).
  const uint64_t cut = std::min(round_up(new_size, geo_.cluster_size), size_);
  UQ_CO_TRY(co_await zero_partial_cluster(new_size, cut));
  if (cut < size_) {
    Status s = co_await zero_clusters(cut, size_ - cut, ZeroMode::kFullDiscard);
    if (!s.ok()) co_return s.error().with_context("Failed to discard cropped clusters");
  }
  co_return Status();
}

Task<Status> Qcow2Image::zero_partial_cluster(uint64_t from, uint64_t to) {
  // Zeroes guest bytes [from, end of their cluster) (at most up to `to`)
  // when they could read as anything but zero: data or a preallocated
  // cluster here, or a backing file underneath (resize opens without it).
  const uint64_t end = std::min(round_up(from, geo_.cluster_size), to);
  bool needed = false;
  for (uint64_t off = from; off < end && !needed;) {
    UQ_CO_ASSIGN_OR_RETURN(BlockStatus st, co_await block_status(off, end - off));
    needed = st.kind == BlockStatus::Kind::kData ||
             (st.kind == BlockStatus::Kind::kUnallocated && !header_.backing_file.empty());
    off += st.length;
  }
  if (!needed) co_return Status();
  co_return co_await write_zeroes_range(from, end - from, false);
}

Task<Status> Qcow2Image::zero_over_backing(uint64_t old_size, uint64_t new_size) {
  // The clusters past the old end are unallocated (a shrink discarded
  // them), so a backing file longer than the old size would show through.
  // Zero clusters cover them up to the backing file's end (all the way
  // when the backing file is not open, e.g. with no_backing).
  if (header_.backing_file.empty()) co_return Status();
  const uint64_t cs = geo_.cluster_size;
  const uint64_t start = round_up(old_size, cs);
  uint64_t end = new_size;
  if (backing_) end = std::min(end, round_up(backing_->size(), cs));
  if (start >= end) co_return Status();
  co_return co_await write_zeroes_range(start, end - start, false);
}

Task<Status> Qcow2Image::grow_l1_for(uint64_t new_size) {
  // Lock held. Nothing in memory changes until the header points at the new
  // table; a failure before that leaks the new table's clusters at most.
  const uint64_t cs = geo_.cluster_size;
  const uint64_t need = l1_entries_for(new_size, geo_);
  if (need * 8 > kMaxL1Bytes) co_return Error(EFBIG, "size: " + std::to_string(new_size) + " needs an L1 table over 32 MiB");
  if (need <= map_->l1().size()) co_return Status();
  // Grow by at least half, as QEMU does, so repeated growth stays cheap.
  uint64_t entries = std::min<uint64_t>(std::max<uint64_t>(need, map_->l1().size() + map_->l1().size() / 2), kMaxL1Bytes / 8);
  uint64_t clusters = (entries * 8 + cs - 1) / cs;
  entries = std::min<uint64_t>(clusters * cs / 8, kMaxL1Bytes / 8);
  file_->debug_event(BlkDebugEvent::kL1GrowAllocTable);
  UQ_CO_ASSIGN_OR_RETURN(uint64_t table, co_await refcounts_->alloc_clusters(clusters));
  UQ_CO_TRY(overlap_->check_metadata_write(table, clusters * cs, "active L1 table"));
  const std::vector<uint8_t> buf = encode_table(map_->l1(), clusters * cs);
  // The refcount of the new table, then the table itself, before the header.
  UQ_CO_TRY(co_await refcounts_->cache().flush());
  file_->debug_event(BlkDebugEvent::kL1GrowWriteTable);
  UQ_CO_TRY(co_await file_->co_write(table, std::span<const std::byte>(reinterpret_cast<const std::byte*>(buf.data()), buf.size())));
  UQ_CO_TRY(co_await file_->co_flush());
  file_->debug_event(BlkDebugEvent::kL1GrowActivateTable);
  UQ_CO_TRY(co_await write_header_fields(*file_, {kOffL1Size, entries}, {kOffL1TableOffset, table}));
  UQ_CO_TRY(co_await file_->co_flush());
  const uint64_t old_offset = header_.l1_table_offset;
  const uint64_t old_bytes = (uint64_t{header_.l1_size} * 8 + cs - 1) / cs * cs;
  overlap_->remove(MetadataKind::kActiveL1, old_offset, old_bytes);
  overlap_->add(MetadataKind::kActiveL1, table, clusters * cs);
  header_.l1_table_offset = table;
  header_.l1_size = static_cast<uint32_t>(entries);
  map_->grow_l1(entries);
  if (old_bytes) UQ_CO_TRY(co_await refcounts_->update_refcount(old_offset, old_bytes, -1, options_.pass_discard_other));
  co_return Status();
}

}  // namespace uqcow::qcow2
