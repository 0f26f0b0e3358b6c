// The overlap check (QEMU's qcow2_check_metadata_overlap and
// qcow2_pre_write_overlap_check), the bookkeeping of the metadata regions it
// checks, and marking the image corrupt. Member functions of Qcow2Image.
//
// Invariant (read-write opens): regions_ holds exactly the regions that
// collect_metadata_regions() would find from header_, l1_, reftable_,
// snapshots_ and the snapshot L1 tables on disk, for the kinds the
// overlap-check options enable. Each change of one of those updates it:
// L2 allocation (alloc.cc), refcount block allocation and refcount table
// growth (refcount.cc), L1 growth (resize.cc), snapshot create, apply and
// delete (snapshot_ops.cc). Freed clusters are not removed wholesale: a
// structure leaves the set when it is unlinked, so a cluster freed while
// some table still points at it (corrupt refcounts) stays protected.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "qcow2/endian.h"
#include "qcow2/hex.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

void Qcow2Image::overlap_add(MetadataKind kind, uint64_t offset, uint64_t length) {
  regions_.add(kind, offset, length);
}

void Qcow2Image::overlap_remove(MetadataKind kind, uint64_t offset, uint64_t length) {
  regions_.remove(kind, offset, length);
}

void Qcow2Image::set_active_l1_entry(uint64_t index, uint64_t entry) {
  const uint64_t old_l2 = l1_[index] & kL1OffsetMask;
  const uint64_t new_l2 = entry & kL1OffsetMask;
  if (old_l2 != new_l2) {
    regions_.remove(MetadataKind::kActiveL2, old_l2, old_l2 ? geo_.cluster_size : 0);
    regions_.add(MetadataKind::kActiveL2, new_l2, new_l2 ? geo_.cluster_size : 0);
  }
  l1_[index] = entry;
}

void Qcow2Image::overlap_l2_tables(MetadataKind kind, const std::vector<uint64_t>& l1, bool add) {
  for (uint64_t e : l1) {
    const uint64_t l2 = e & kL1OffsetMask;
    if (!l2) continue;
    if (add) {
      regions_.add(kind, l2, geo_.cluster_size);
    } else {
      regions_.remove(kind, l2, geo_.cluster_size);
    }
  }
}

std::optional<MetadataKind> Qcow2Image::find_overlap(uint64_t offset, uint64_t length, OverlapMask mask) const {
  // QEMU aligns the range to clusters (after its header check, which the
  // aligned range answers the same way).
  const uint64_t cs = geo_.cluster_size;
  const uint64_t start = offset & ~(cs - 1);
  const uint64_t end = offset + length > UINT64_MAX - cs ? UINT64_MAX : round_up(offset + length, cs);
  return regions_.overlaps(start, end - start, mask);
}

Status Qcow2Image::check_metadata_write(uint64_t offset, uint64_t length, const char* what, OverlapMask ignore) {
  const OverlapMask mask = overlap_mask_ & ~ignore;
  if (!mask || length == 0) return Status();
  const std::optional<MetadataKind> hit = find_overlap(offset, length, mask);
  if (!hit) return Status();
  return refuse_overlap(*hit, offset, length, what);
}

Status Qcow2Image::refuse_overlap(MetadataKind hit, uint64_t offset, uint64_t length, const char* what) {
  std::string why = std::string("Preventing invalid write on metadata (overlaps with ") + metadata_kind_name(hit) +
                    "): " + what + " write at " + hex(offset) + " (" + std::to_string(length) + " bytes)";
  if (hit == MetadataKind::kCryptoHeader) {
    why += "; QEMU does not check the crypto header, uqcow protects it deliberately";
  }
  return fatal_corruption(corruption(why));
}

Status Qcow2Image::check_cache_write(uint64_t offset, uint64_t length, MetadataKind own) {
  // As QEMU's cache flush: a table may be written over its own kind. The
  // snapshot operations also rewrite OFLAG_COPIED in the L2 tables of the
  // L1 they walk, which may be another snapshot's too (QEMU would refuse
  // that under overlap-check=all and mark the image corrupt).
  OverlapMask ignore = overlap_bit(own);
  if (own == MetadataKind::kActiveL2 && rewriting_snapshot_l2_) ignore |= overlap_bit(MetadataKind::kInactiveL2);
  return check_metadata_write(offset, length, metadata_kind_name(own), ignore);
}

Status Qcow2Image::check_data_write(uint64_t offset, uint64_t length) {
  // QEMU skips the check for an external data file: no metadata lives there.
  // On every write: one lookup in the merged index, no Status built twice.
  if (!overlap_mask_ || data_file_ != file_.get() || length == 0) return Status();
  const std::optional<MetadataKind> hit = find_overlap(offset, length, overlap_mask_);
  if (!hit) [[likely]] return Status();
  return refuse_overlap(*hit, offset, length, "guest data");
}

Task<Result<MetadataRegions>> Qcow2Image::collect_metadata_regions(OverlapMask tracked) {
  // Tables are registered in whole clusters (the updates in alloc.cc,
  // refcount.cc, resize.cc and snapshot_ops.cc do the same); QEMU counts
  // bytes, which a cluster-aligned check cannot tell apart.
  const uint64_t cs = geo_.cluster_size;
  auto clusters = [cs](uint64_t bytes) { return bytes > UINT64_MAX - cs ? UINT64_MAX & ~(cs - 1) : round_up(bytes, cs); };
  MetadataRegions r;
  r.reset(tracked);
  r.add(MetadataKind::kMainHeader, 0, cs);
  r.add(MetadataKind::kActiveL1, header_.l1_table_offset, clusters(uint64_t{header_.l1_size} * 8));
  for (uint64_t e : l1_) {
    if (uint64_t l2 = e & kL1OffsetMask) r.add(MetadataKind::kActiveL2, l2, cs);
  }
  r.add(MetadataKind::kRefcountTable, header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs);
  for (uint64_t e : reftable_) {
    if (uint64_t b = e & kReftableOffsetMask) r.add(MetadataKind::kRefcountBlock, b, cs);
  }
  if (header_.nb_snapshots) {
    auto table = serialize_snapshot_table(snapshots_);
    if (table.ok()) r.add(MetadataKind::kSnapshotTable, header_.snapshots_offset, clusters(table->size()));
  }
  for (const auto& s : snapshots_) {
    r.add(MetadataKind::kInactiveL1, s.l1_table_offset, clusters(uint64_t{s.l1_size} * 8));
    if (!(tracked & overlap_bit(MetadataKind::kInactiveL2))) continue;
    // One snapshot L1 in memory at a time (at most 32 MiB: parse_snapshot_
    // table bounds l1_size); the set keeps one node per distinct L2 table.
    auto l1 = co_await read_l1_table(s.l1_table_offset, s.l1_size);
    if (!l1.ok()) co_return std::move(l1).error().with_context("L1 table of snapshot " + s.id);
    for (uint64_t e : *l1) {
      if (uint64_t l2 = e & kL1OffsetMask) r.add(MetadataKind::kInactiveL2, l2, cs);
    }
  }
  if (header_.crypto_header) {
    r.add(MetadataKind::kCryptoHeader, header_.crypto_header->offset, clusters(header_.crypto_header->length));
  }
  if (header_.bitmaps && header_.bitmaps->directory_size) {
    r.add(MetadataKind::kBitmapDirectory, header_.bitmaps->directory_offset,
          clusters(std::min<uint64_t>(header_.bitmaps->directory_size, 64 << 20)));
  }
  co_return r;
}

Task<Status> Qcow2Image::build_metadata_regions() {
  overlap_mask_ = overlap_check_mask(options_);
  auto r = co_await collect_metadata_regions(overlap_mask_);
  if (!r.ok()) co_return std::move(r).error();
  regions_ = std::move(r).value();
  co_return Status();
}

Task<Status> Qcow2Image::verify_metadata_regions() {
  if (options_.read_only) co_return Status();
  auto guard = co_await lock_.scoped_lock();
  auto fresh = co_await collect_metadata_regions(regions_.tracked());
  if (!fresh.ok()) co_return std::move(fresh).error();
  if (*fresh == regions_) co_return Status();
  co_return Error(EIO, file_->name() + ": overlap-check regions out of date (kept vs. found): " +
                           regions_.describe_difference(*fresh));
}

}  // namespace uqcow::qcow2
