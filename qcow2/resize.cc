// Changing the virtual size (qemu-img resize). Member functions of
// Qcow2Image, after QEMU's qcow2_co_truncate.
//
// Growing may need a larger L1 table (L1Resize::grow_for, QEMU's
// qcow2_grow_l1_table). Shrinking discards every cluster past the new end,
// frees the L2 tables (L1Resize::shrink_to) and refcount blocks
// (Refcounts::shrink_refcount_table) that no longer count anything and
// truncates the file, as QEMU does. An external data file
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
  // Bitmaps follow the disk's size; an inconsistent one cannot (QEMU's
  // qcow2_truncate_bitmaps_check).
  UQ_CO_TRY(bitmaps_->check_resize());
  if (!bitmaps_->ready_for_resize()) {
    // A stored bitmap's table covers the old size only: IN_USE first, or a
    // crash would leave a consistent bitmap of the wrong size.
    auto guard = co_await lock_.scoped_lock();
    UQ_CO_TRY(co_await bitmaps_->mark_in_use());
  }
  const uint64_t old_size = size_;
  if (new_size < old_size) UQ_CO_TRY(co_await drop_tail(new_size));
  const bool data_file = header_.has_data_file();
  {
    auto guard = co_await lock_.scoped_lock();
    UQ_CO_TRY(co_await l1_resize_->grow_for(new_size, options_.pass_discard_other));
    if (new_size < old_size) {
      // As QEMU's qcow2_co_truncate: the metadata past the new end goes
      // before the size changes, so a failure leaves the old size. The
      // discarded clusters are freed first (no request is in flight to wait
      // for).
      UQ_CO_TRY(co_await flush_metadata());
      UQ_CO_TRY(co_await l1_resize_->shrink_to(l1_entries_for(new_size, geo_)));
      UQ_CO_TRY(co_await refcounts_->shrink_refcount_table());
      UQ_CO_TRY(co_await refcounts_->truncate_to_last_cluster());
    }
    if (header_.data_file_raw() && new_size > old_size) {
      // QEMU's qcow2_co_truncate: a raw data file reads as the disk only if
      // the L2 tables map every guest cluster 1:1, so the added area is
      // preallocated (metadata), as creation preallocates the whole disk.
      std::vector<MappingWriter::HostRun> runs;
      UQ_CO_TRY(co_await writer_->preallocate(old_size, new_size, /*fresh=*/false, runs));
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
  bitmaps_->resize(new_size);
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

}  // namespace uqcow::qcow2
