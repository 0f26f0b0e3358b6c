#include "qcow2/snapshot_refcounts.h"

#include "qcow2/hex.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {
namespace {
// The entry with OFLAG_COPIED recomputed for `refcount`. A walk that drops
// references never sets the flag: the dropped counts are not on disk yet, and
// COPIED must never reach the disk before the refcount 1 it promises. The
// caller's later recompute_copied_flags(), after a refcount flush, sets it.
uint64_t copied_flag(uint64_t entry, uint64_t refcount, int64_t addend) {
  if (refcount != 1) return entry & ~kOflagCopied;
  return addend < 0 ? entry : (entry | kOflagCopied);
}
}  // namespace

Task<Status> SnapshotRefcounts::check_in_file(const std::vector<uint64_t>& l1) {
  // Every cluster the snapshot will reference must exist: a reference to a
  // cluster past the end of the file would grow the refcount structures to
  // count a cluster that holds nothing. Checked before any refcount changes,
  // so a refusal leaves the image as it was. (QEMU 7.2 fails such a
  // snapshot too, with EAGAIN from its refcount code, after raising the
  // refcounts before it; we refuse first and say why.)
  const uint64_t cs = geo_.cluster_size;
  const uint32_t slice_size = map_.slice_bytes();
  const uint64_t entries = slice_size / geo_.l2_entry_size;
  auto beyond_end = [&](uint64_t offset, uint64_t bytes, const std::string& what) -> Status {
    if (offset < refcounts_.alloc_end() && bytes <= refcounts_.alloc_end() - offset) return Status();
    return reporter_.corruption(what + " at " + hex(offset) + " lies beyond the end of the image file (" +
                                hex(refcounts_.alloc_end()) +
                                "); no snapshot was created. Run 'uqcow check -r all' to repair the image");
  };
  for (size_t i = 0; i < l1.size(); ++i) {
    const uint64_t l2 = l1[i] & kL1OffsetMask;
    if (!l2) continue;
    if (l2 & (cs - 1)) {
      co_return reporter_.fatal(
          reporter_.corruption("L2 table offset " + hex(l2) + " unaligned (L1 index " + std::to_string(i) + ")"));
    }
    UQ_CO_TRY(beyond_end(l2, cs, "the L2 table of L1 index " + std::to_string(i)));
    for (uint64_t off = 0; off < cs; off += slice_size) {
      UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_.l2_cache().get(l2 + off));
      const ConstL2Slice slice(ref.data(), geo_);
      for (uint64_t k = 0; k < entries; ++k) {
        const uint64_t l2e = slice.entry(k);
        const uint64_t bitmap = slice.bitmap(k);
        const uint64_t index = off / geo_.l2_entry_size + k;
        if (const char* why = map_.l2_entry_problem(l2e, bitmap)) {
          co_return reporter_.fatal(map_.bad_l2_entry(l2 + off, index, l2e, why));
        }
        if (l2e & kOflagCompressed) {
          const uint64_t coffset = geo_.compressed_offset(l2e);
          UQ_CO_TRY(beyond_end(coffset, geo_.compressed_size(l2e), "compressed data of L2 entry " + hex(l2e)));
        } else if (uint64_t host = l2e & kL2OffsetMask) {
          if (!external_data_) UQ_CO_TRY(beyond_end(host, cs, "the data cluster of L2 entry " + hex(l2e)));
        }
      }
    }
  }
  co_return Status();
}

Task<Status> SnapshotRefcounts::slice_refcounts(const uint8_t* slice, uint64_t entries, int64_t addend,
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
      UQ_CO_TRY(co_await refcounts_.update_refcount(coffset, sectors * kSectorSize, addend, discard));
      continue;
    }
    const uint64_t host = l2e & kL2OffsetMask;
    if (!host) continue;
    if (host & (cs - 1)) {
      co_return reporter_.fatal(reporter_.corruption("L2 entry points at unaligned cluster " + hex(host)));
    }
    // Stricter than QEMU, which fails here only by accident (EAGAIN while
    // allocating refcount blocks for the offset, iotest 080): an entry past
    // every allocated cluster is damage, and counting it would grow the
    // refcount structure for it. (snapshot_create refuses earlier, in
    // check_in_file, before changing anything.)
    if (!external_data_ && host >= refcounts_.alloc_end()) {
      co_return Error(EIO, file_.name() + ": an L2 entry points at host offset " + hex(host) +
                               ", beyond the end of the image (" + hex(refcounts_.alloc_end()) +
                               "); refusing to count references to it");
    }
    if (run_len && run_start + run_len == host) {
      run_len += cs;
      continue;
    }
    if (run_len) UQ_CO_TRY(co_await refcounts_.update_refcount(run_start, run_len, addend, discard));
    run_start = host;
    run_len = cs;
  }
  if (run_len) UQ_CO_TRY(co_await refcounts_.update_refcount(run_start, run_len, addend, discard));
  co_return Status();
}

Task<Status> SnapshotRefcounts::slice_copied(uint8_t* slice, uint64_t entries, int64_t addend, bool& changed) {
  // The OFLAG_COPIED half: recomputes the flag of every entry from the
  // refcount its cluster has now. Compressed clusters never carry it.
  L2Slice l2(slice, geo_);
  for (uint64_t i = 0; i < entries; ++i) {
    const uint64_t l2e = l2.entry(i);
    const uint64_t host = l2e & kL2OffsetMask;
    if ((l2e & kOflagCompressed) || !host) continue;
    const uint64_t cluster = host >> geo_.cluster_bits;
    uint64_t refcount;
    if (auto cached = refcounts_.cached_refcount(cluster)) {
      refcount = *cached;
    } else {
      UQ_CO_ASSIGN_OR_RETURN(refcount, co_await refcounts_.get_refcount(cluster));
    }
    const uint64_t updated = copied_flag(l2e, refcount, addend);
    if (updated != l2e) {
      if (addend > 0 && !changed) {
        // The entry loses COPIED because its refcount went up: that count
        // must reach the disk before this slice does (QEMU sets the same
        // dependency), or a crash leaves COPIED clear at refcount 1.
        UQ_CO_TRY(co_await map_.l2_cache().depend_on(refcounts_.cache()));
      }
      l2.set_entry(i, updated);
      changed = true;
    }
  }
  co_return Status();
}

Task<Status> SnapshotRefcounts::l2_refcount(uint64_t l2_offset, int64_t addend, bool discard) {
  // Walks every slice of one L2 table; the slices stay pinned across the
  // refcount updates so the entries we fix are the ones written back.
  const uint32_t slice_size = map_.slice_bytes();
  const uint64_t entries = slice_size / geo_.l2_entry_size;
  for (uint64_t off = 0; off < geo_.cluster_size; off += slice_size) {
    UQ_CO_ASSIGN_OR_RETURN(auto ref, co_await map_.l2_cache().get(l2_offset + off));
    if (addend != 0) UQ_CO_TRY(co_await slice_refcounts(ref.data(), entries, addend, discard));
    bool dirty = false;
    UQ_CO_TRY(co_await slice_copied(ref.data(), entries, addend, dirty));
    if (dirty) map_.l2_cache().mark_dirty(ref);
  }
  co_return Status();
}

Task<Status> SnapshotRefcounts::update(std::vector<uint64_t>& l1, int64_t addend, bool discard, bool& l1_changed) {
  // QEMU's qcow2_update_snapshot_refcount for one L1 table: adds `addend` to
  // every L2 table and data cluster `l1` reaches, then recomputes COPIED in
  // the L2 entries and in `l1` (the caller writes `l1` back if it is active).
  for (uint64_t& l1e : l1) {
    const uint64_t l2 = l1e & kL1OffsetMask;
    if (!l2) continue;
    if (l2 & (geo_.cluster_size - 1)) {
      co_return reporter_.fatal(reporter_.corruption("L2 table offset " + hex(l2) + " unaligned"));
    }
    UQ_CO_TRY(co_await l2_refcount(l2, addend, discard));
    if (addend != 0) {
      // A table that drops to refcount 0 leaves the cache with it.
      UQ_CO_TRY(co_await refcounts_.update_refcount(l2, geo_.cluster_size, addend, discard));
    }
    UQ_CO_ASSIGN_OR_RETURN(uint64_t rc, co_await refcounts_.get_refcount(l2 >> geo_.cluster_bits));
    const uint64_t updated = copied_flag(l1e, rc, addend);
    if (updated != l1e) {
      l1e = updated;
      l1_changed = true;
    }
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
