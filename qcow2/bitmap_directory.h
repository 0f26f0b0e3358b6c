// The persistent bitmaps' on-disk structures (docs/interop/qcow2.txt,
// "Bitmaps"): the bitmap directory and the bitmap tables. The one place that
// knows their byte layout; QEMU's qcow2-bitmap.c checks, with its limits.
//
// Every field read from an image is untrusted: parse_bitmap_directory()
// refuses with EINVAL and a message naming the field (and the bitmap), and
// nothing is allocated in proportion to a field before it is bounded.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/result.h"
#include "qcow2/format.h"

namespace uqcow::qcow2 {

inline constexpr uint32_t kMaxBitmaps = 65535;                               // QCOW2_MAX_BITMAPS
inline constexpr uint64_t kMaxBitmapDirectoryBytes = uint64_t{1024} * kMaxBitmaps;  // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
inline constexpr uint32_t kMaxBitmapNameBytes = 1023;                        // BME_MAX_NAME_SIZE
inline constexpr uint32_t kMaxBitmapTableEntries = 0x8000000;                // BME_MAX_TABLE_SIZE
inline constexpr uint64_t kMaxBitmapDataBytes = 0x20000000;                  // BME_MAX_PHYS_SIZE
inline constexpr uint32_t kMinBitmapGranularityBits = 9;
inline constexpr uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr uint32_t kBitmapDirEntryHeaderBytes = 24;

// Directory entry flags.
inline constexpr uint32_t kBitmapInUse = 1u << 0;  // in use, or left so by a crash: inconsistent
inline constexpr uint32_t kBitmapAuto = 1u << 1;   // enabled: tracks writes
inline constexpr uint32_t kBitmapReservedFlags = ~(kBitmapInUse | kBitmapAuto);
inline constexpr uint8_t kBitmapTypeDirtyTracking = 1;

// Bitmap table entries.
inline constexpr uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kBitmapTableReservedMask = 0xff000000000001feull;
inline constexpr uint64_t kBitmapTableAllOnes = 1;

struct BitmapDirEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries (8 bytes each)
  uint32_t flags = 0;
  uint8_t granularity_bits = 16;
  std::string name;

  bool in_use() const { return flags & kBitmapInUse; }
  bool enabled() const { return flags & kBitmapAuto; }
};

// A directory entry's size on disk: header, name, padding to 8 bytes (this
// implementation writes no extra data, as QEMU).
inline uint64_t bitmap_dir_entry_bytes(size_t name_bytes, uint64_t extra_bytes = 0) {
  return (kBitmapDirEntryHeaderBytes + name_bytes + extra_bytes + 7) & ~uint64_t{7};
}

// Bitmap table entries a bitmap of `disk_size` bytes at `granularity_bits`
// needs with clusters of `cluster_size` bytes.
uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits, uint64_t cluster_size);

// QEMU's check_constraints_on_bitmap (a bitmap about to be created or
// stored): granularity in [512, 2 GiB], the serialised bitmap within the
// table-size and 512 MiB limits, the name at most 1023 bytes and not empty.
// EINVAL with QEMU's wording otherwise.
Status check_bitmap_constraints(const std::string& name, uint64_t granularity, uint64_t disk_size,
                                uint64_t cluster_size);

// Parses the `nb_bitmaps` entries of a directory of exactly dir.size()
// bytes, checking each as QEMU's bitmap_list_load/check_dir_entry do
// (table offset and size, flags, type, granularity, name, no extra data;
// a consistent bitmap's table must cover `disk_size`). Names are unique.
Result<std::vector<BitmapDirEntry>> parse_bitmap_directory(std::span<const uint8_t> dir, uint32_t nb_bitmaps,
                                                           uint64_t cluster_size, uint64_t disk_size);
// The directory for `entries` (EINVAL if it would exceed the limits).
Result<std::vector<uint8_t>> serialize_bitmap_directory(const std::vector<BitmapDirEntry>& entries);

// QEMU's check_table_entry: no reserved bit; a data offset is cluster-aligned
// and then bit 0 (all ones) is clear. The reason for a bad entry, or "".
std::string bitmap_table_entry_problem(uint64_t entry, uint64_t cluster_size);

}  // namespace uqcow::qcow2
