// The overlap check (QEMU's qcow2_check_metadata_overlap), metadata region
// bookkeeping and marking the image corrupt. Member functions of Qcow2Image.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "qcow2/endian.h"
#include "qcow2/image.h"

namespace uqcow::qcow2 {
namespace {
std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}
}  // namespace

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
  corrupt_ = true;
  background_.spawn([](Qcow2Image* self) -> Task<void> {
    (void)co_await self->write_header_incompatible(self->header_.incompatible_features | kIncompatCorrupt);
    (void)co_await self->file_->co_flush();
  }(this));
  return Error(EIO, "qcow2 image " + file_->name() + " is corrupt: " + why + "; the image is marked corrupt");
}

Status Qcow2Image::check_data_write(uint64_t offset, uint64_t length) {
  if (options_.overlap_check == OverlapCheck::kNone || data_file_ != file_.get()) return Status();
  if (!regions_.overlaps(offset, length)) return Status();
  return check_metadata_write(offset, length, "guest data");
}

Task<Status> Qcow2Image::mark_corrupt(const std::string& why) {
  if (!options_.read_only && !corrupt_) {
    corrupt_ = true;
    (void)co_await write_header_incompatible(header_.incompatible_features | kIncompatCorrupt);
    (void)co_await file_->co_flush();
  }
  co_return corruption(why);
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
