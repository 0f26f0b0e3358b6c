// The overlap check (QEMU's qcow2_check_metadata_overlap), metadata region
// bookkeeping and marking the image corrupt. Member functions of Qcow2Image.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "qcow2/endian.h"
#include "qcow2/hex.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {

void Qcow2Image::overlap_add(uint64_t offset, uint64_t length, const char* what) {
  regions_.add(offset, length, what);
}

void Qcow2Image::overlap_remove(uint64_t offset, uint64_t length) { regions_.remove(offset, length); }

Status Qcow2Image::check_metadata_write(uint64_t offset, uint64_t length, const char* what) {
  if (options_.overlap_check == OverlapCheck::kNone) return Status();
  const char* hit = regions_.overlaps(offset, length);
  // A metadata write may land on its own kind (an L2 slice on its L2 table).
  if (!hit || std::strcmp(hit, what) == 0) return Status();
  std::string why = std::string("metadata write (") + what + ") at " + hex(offset) + " would overwrite the " + hit;
  return fatal_corruption(corruption(why));
}

Status Qcow2Image::check_data_write(uint64_t offset, uint64_t length) {
  if (options_.overlap_check == OverlapCheck::kNone || data_file_ != file_.get()) return Status();
  if (!regions_.overlaps(offset, length)) return Status();
  return check_metadata_write(offset, length, "guest data");
}

Task<Status> Qcow2Image::build_metadata_regions() {
  const uint64_t cs = geo_.cluster_size;
  regions_.clear();
  regions_.add(0, cs, "header");
  regions_.add(header_.l1_table_offset, (uint64_t{header_.l1_size} * 8 + cs - 1) & ~(cs - 1), "active L1 table");
  for (uint64_t e : l1_) {
    uint64_t l2 = e & kL1OffsetMask;
    if (l2) regions_.add(l2, cs, "L2 table");
  }
  regions_.add(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs, "refcount table");
  for (uint64_t e : reftable_) {
    uint64_t b = e & kReftableOffsetMask;
    if (b) regions_.add(b, cs, "refcount block");
  }
  if (header_.nb_snapshots) {
    auto table = serialize_snapshot_table(snapshots_);
    if (table.ok()) regions_.add(header_.snapshots_offset, (table->size() + cs - 1) & ~(cs - 1), "snapshot table");
    for (const auto& s : snapshots_) {
      regions_.add(s.l1_table_offset, (uint64_t{s.l1_size} * 8 + cs - 1) & ~(cs - 1), "inactive L1 table");
    }
  }
  if (header_.crypto_header) {
    regions_.add(header_.crypto_header->offset, (header_.crypto_header->length + cs - 1) & ~(cs - 1), "crypto header");
  }
  if (header_.bitmaps && header_.bitmaps->directory_size) {
    regions_.add(header_.bitmaps->directory_offset,
                 (std::min<uint64_t>(header_.bitmaps->directory_size, 64 << 20) + cs - 1) & ~(cs - 1),
                 "bitmap directory");
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
