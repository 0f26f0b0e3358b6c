#include "qcow2/bitmap_directory.h"

#include <bit>
#include <cstring>
#include <set>

#include "block/endian.h"
#include "qcow2/hex.h"

namespace uqcow::qcow2 {

namespace {

Error bad_entry(size_t index, const std::string& name, const std::string& field, const std::string& why) {
  std::string who = name.empty() ? "bitmap " + std::to_string(index) : "bitmap '" + name + "'";
  return Error(EINVAL, "bitmap directory: " + who + ": " + field + " " + why);
}

}  // namespace

uint64_t bitmap_table_entries(uint64_t disk_size, uint32_t granularity_bits, uint64_t cluster_size) {
  const uint64_t granules = (disk_size + (uint64_t{1} << granularity_bits) - 1) >> granularity_bits;
  const uint64_t bytes = (granules + 7) / 8;
  return (bytes + cluster_size - 1) / cluster_size;
}

Status check_bitmap_constraints(const std::string& name, uint64_t granularity, uint64_t disk_size,
                                uint64_t cluster_size) {
  if (!std::has_single_bit(granularity)) {
    return Error(EINVAL, "Granularity must be a power of 2 (got " + std::to_string(granularity) + ")");
  }
  const auto bits = static_cast<uint32_t>(std::countr_zero(granularity));
  if (bits > kMaxBitmapGranularityBits) return Error(EINVAL, "Granularity exceeds maximum (2147483648 bytes)");
  if (bits < kMinBitmapGranularityBits) return Error(EINVAL, "Granularity is under minimum (512 bytes)");
  const uint64_t granules = (disk_size + granularity - 1) >> bits;
  const uint64_t bytes = (granules + 7) / 8;
  if (bytes > kMaxBitmapDataBytes || bytes > uint64_t{kMaxBitmapTableEntries} * cluster_size) {
    return Error(EINVAL, "Too much space will be occupied by the bitmap. Use larger granularity");
  }
  if (name.empty()) return Error(EINVAL, "Bitmap name cannot be empty");
  if (name.size() > kMaxBitmapNameBytes) return Error(EINVAL, "Name length exceeds maximum (1023 characters)");
  return Status();
}

Result<std::vector<BitmapDirEntry>> parse_bitmap_directory(std::span<const uint8_t> dir, uint32_t nb_bitmaps,
                                                           uint64_t cluster_size, uint64_t disk_size) {
  if (dir.empty()) return Error(EINVAL, "bitmap_directory_size is zero");
  if (dir.size() > kMaxBitmapDirectoryBytes) return Error(EINVAL, "bitmap_directory_size is too big");
  if (nb_bitmaps > kMaxBitmaps) return Error(EINVAL, "nb_bitmaps exceeds the maximum of 65535");
  std::vector<BitmapDirEntry> out;
  std::set<std::string> names;
  size_t pos = 0;
  while (pos < dir.size()) {
    const size_t index = out.size();
    if (dir.size() - pos < kBitmapDirEntryHeaderBytes) {
      return Error(EINVAL, "bitmap directory: entry " + std::to_string(index) + " runs past bitmap_directory_size");
    }
    if (index >= nb_bitmaps) {
      return Error(EINVAL, "bitmap directory: more bitmaps found than nb_bitmaps (" + std::to_string(nb_bitmaps) + ")");
    }
    const uint8_t* d = dir.data() + pos;
    BitmapDirEntry e;
    e.table_offset = load_be64(d);
    e.table_size = load_be32(d + 8);
    e.flags = load_be32(d + 12);
    const uint8_t type = d[16];
    e.granularity_bits = d[17];
    const uint16_t name_size = load_be16(d + 18);
    const uint32_t extra_size = load_be32(d + 20);
    const uint64_t entry_bytes = bitmap_dir_entry_bytes(name_size, extra_size);
    if (entry_bytes > dir.size() - pos) {
      return bad_entry(index, "", "name_size/extra_data_size", "run past bitmap_directory_size");
    }
    if (name_size > kMaxBitmapNameBytes) {
      return bad_entry(index, "", "name_size", std::to_string(name_size) + " exceeds 1023");
    }
    e.name.assign(reinterpret_cast<const char*>(d + kBitmapDirEntryHeaderBytes + extra_size), name_size);
    if (extra_size != 0) return bad_entry(index, e.name, "extra_data_size", "is not zero (extra data is not supported)");
    if (e.name.empty()) return bad_entry(index, e.name, "name_size", "is zero");
    if (type != kBitmapTypeDirtyTracking) {
      return bad_entry(index, e.name, "type", std::to_string(type) + " is not 1 (dirty tracking)");
    }
    if (e.flags & kBitmapReservedFlags) return bad_entry(index, e.name, "flags", hex(e.flags) + " has reserved bits set");
    if (e.granularity_bits < kMinBitmapGranularityBits || e.granularity_bits > kMaxBitmapGranularityBits) {
      return bad_entry(index, e.name, "granularity_bits", std::to_string(e.granularity_bits) + " is outside [9, 31]");
    }
    if (e.table_offset == 0 || e.table_offset % cluster_size != 0) {
      return bad_entry(index, e.name, "bitmap_table_offset", hex(e.table_offset) + " is not a cluster-aligned offset");
    }
    if (e.table_size == 0 || e.table_size > kMaxBitmapTableEntries ||
        uint64_t{e.table_size} * cluster_size > kMaxBitmapDataBytes) {
      return bad_entry(index, e.name, "bitmap_table_size", std::to_string(e.table_size) + " is out of range");
    }
    // A consistent bitmap's table covers the disk (an in-use one may be
    // stale after a resize: QEMU accepts that too).
    const uint64_t covered_bits = uint64_t{e.table_size} * cluster_size * 8;
    if (!e.in_use() && disk_size > (covered_bits << e.granularity_bits)) {
      return bad_entry(index, e.name, "bitmap_table_size", std::to_string(e.table_size) + " does not cover the disk");
    }
    if (!names.insert(e.name).second) return bad_entry(index, e.name, "name", "is not unique");
    out.push_back(std::move(e));
    pos += entry_bytes;
  }
  if (out.size() != nb_bitmaps) {
    return Error(EINVAL, "bitmap directory: " + std::to_string(out.size()) + " bitmaps found, nb_bitmaps says " +
                             std::to_string(nb_bitmaps));
  }
  return out;
}

Result<std::vector<uint8_t>> serialize_bitmap_directory(const std::vector<BitmapDirEntry>& entries) {
  if (entries.size() > kMaxBitmaps) return Error(EINVAL, "Too many persistent bitmaps");
  uint64_t bytes = 0;
  for (const auto& e : entries) bytes += bitmap_dir_entry_bytes(e.name.size());
  if (bytes > kMaxBitmapDirectoryBytes) return Error(EINVAL, "Bitmap directory is too large");
  std::vector<uint8_t> dir(bytes, 0);
  size_t pos = 0;
  for (const auto& e : entries) {
    uint8_t* d = dir.data() + pos;
    store_be64(d, e.table_offset);
    store_be32(d + 8, e.table_size);
    store_be32(d + 12, e.flags);
    d[16] = kBitmapTypeDirtyTracking;
    d[17] = e.granularity_bits;
    store_be16(d + 18, static_cast<uint16_t>(e.name.size()));
    store_be32(d + 20, 0);
    std::memcpy(d + kBitmapDirEntryHeaderBytes, e.name.data(), e.name.size());
    pos += bitmap_dir_entry_bytes(e.name.size());
  }
  return dir;
}

std::string bitmap_table_entry_problem(uint64_t entry, uint64_t cluster_size) {
  if (entry & kBitmapTableReservedMask) return "reserved bits set";
  const uint64_t offset = entry & kBitmapTableOffsetMask;
  if (offset != 0) {
    if (entry & kBitmapTableAllOnes) return "bit 0 set with a data offset";
    if (offset % cluster_size != 0) return "data offset not cluster-aligned";
  }
  return "";
}

}  // namespace uqcow::qcow2
