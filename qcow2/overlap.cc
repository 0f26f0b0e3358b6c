// The regions the overlap check guards (overlap_guard.h), found by walking
// the image's tables: at a read-write open, and again by
// verify_metadata_regions() to check the guard's bookkeeping. Each change of
// a table updates the guard in the same step: L2 allocation (mapping_writer.cc),
// refcount block allocation and refcount table growth (refcount.cc), L1
// growth (resize.cc), snapshot create, apply and delete (snapshot_ops.cc).
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "block/endian.h"
#include "qcow2/hex.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

Task<Result<MetadataRegions>> Qcow2Image::collect_metadata_regions(OverlapMask tracked) {
  // Tables are registered in whole clusters (the updates in mapping_writer.cc,
  // refcount.cc, resize.cc and snapshot_ops.cc do the same); QEMU counts
  // bytes, which a cluster-aligned check cannot tell apart.
  const uint64_t cs = geo_.cluster_size;
  auto clusters = [cs](uint64_t bytes) { return bytes > UINT64_MAX - cs ? UINT64_MAX & ~(cs - 1) : round_up(bytes, cs); };
  MetadataRegions r;
  r.reset(tracked);
  r.add(MetadataKind::kMainHeader, 0, cs);
  r.add(MetadataKind::kActiveL1, header_.l1_table_offset, clusters(uint64_t{header_.l1_size} * 8));
  for (uint64_t e : map_->l1()) {
    if (uint64_t l2 = e & kL1OffsetMask) r.add(MetadataKind::kActiveL2, l2, cs);
  }
  r.add(MetadataKind::kRefcountTable, header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs);
  for (uint64_t e : refcounts_->table()) {
    if (uint64_t b = e & kReftableOffsetMask) r.add(MetadataKind::kRefcountBlock, b, cs);
  }
  r.add(MetadataKind::kSnapshotTable, header_.snapshots_offset, snapshots_->clusters_bytes());
  for (const auto& s : snapshots_->list()) {
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
  const OverlapMask mask = overlap_check_mask(options_);
  UQ_CO_ASSIGN_OR_RETURN(MetadataRegions regions, co_await collect_metadata_regions(mask));
  overlap_->reset(std::move(regions), mask);
  co_return Status();
}

Task<Status> Qcow2Image::verify_metadata_regions() {
  if (options_.read_only) co_return Status();
  auto guard = co_await lock_.scoped_lock();
  const MetadataRegions& kept = overlap_->regions();
  UQ_CO_ASSIGN_OR_RETURN(const MetadataRegions fresh, co_await collect_metadata_regions(kept.tracked()));
  if (fresh == kept) co_return Status();
  co_return Error(EIO, file_->name() + ": overlap-check regions out of date (kept vs. found): " +
                           kept.describe_difference(fresh));
}

}  // namespace uqcow::qcow2
