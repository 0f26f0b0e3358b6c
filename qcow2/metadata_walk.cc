// collect_metadata_regions (metadata_walk.h).
#include "qcow2/metadata_walk.h"

#include <algorithm>
#include <cstdint>

#include "qcow2/format.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

Task<Result<MetadataRegions>> collect_metadata_regions(BlockDevice& file, ImageTables t, OverlapMask tracked) {
  const uint64_t cs = t.geo.cluster_size;
  auto clusters = [cs](uint64_t bytes) { return bytes > UINT64_MAX - cs ? UINT64_MAX & ~(cs - 1) : round_up(bytes, cs); };
  MetadataRegions r;
  r.reset(tracked);
  r.add(MetadataKind::kMainHeader, 0, cs);
  r.add(MetadataKind::kActiveL1, t.header.l1_table_offset, clusters(uint64_t{t.header.l1_size} * 8));
  for (uint64_t e : t.active_l1) {
    if (uint64_t l2 = e & kL1OffsetMask) r.add(MetadataKind::kActiveL2, l2, cs);
  }
  r.add(MetadataKind::kRefcountTable, t.header.refcount_table_offset, uint64_t{t.header.refcount_table_clusters} * cs);
  for (uint64_t e : t.refcount_table) {
    if (uint64_t b = e & kReftableOffsetMask) r.add(MetadataKind::kRefcountBlock, b, cs);
  }
  r.add(MetadataKind::kSnapshotTable, t.header.snapshots_offset, t.snapshot_table_bytes);
  for (const auto& s : t.snapshots) {
    r.add(MetadataKind::kInactiveL1, s.l1_table_offset, clusters(uint64_t{s.l1_size} * 8));
    if (!(tracked & overlap_bit(MetadataKind::kInactiveL2))) continue;
    // The set keeps one node per distinct L2 table.
    auto l1 = co_await read_table(file, s.l1_table_offset, s.l1_size);
    if (!l1.ok()) co_return std::move(l1).error().with_context("L1 table of snapshot " + s.id);
    for (uint64_t e : *l1) {
      if (uint64_t l2 = e & kL1OffsetMask) r.add(MetadataKind::kInactiveL2, l2, cs);
    }
  }
  if (t.header.crypto_header) {
    r.add(MetadataKind::kCryptoHeader, t.header.crypto_header->offset, clusters(t.header.crypto_header->length));
  }
  if (t.header.bitmaps && t.header.bitmaps->directory_size) {
    r.add(MetadataKind::kBitmapDirectory, t.header.bitmaps->directory_offset,
          clusters(std::min<uint64_t>(t.header.bitmaps->directory_size, 64 << 20)));
  }
  co_return r;
}

}  // namespace uqcow::qcow2
