#include "qcow2/cluster_map.h"

#include <algorithm>

#include "block/endian.h"
#include "qcow2/hex.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

ClusterMap::ClusterMap(BlockDevice& file, const Header& header, const Geometry& geo,
                       std::unique_ptr<MetadataCache> l2_cache, uint32_t slice_bytes, OverlapGuard& overlap)
    : file_(file),
      header_(header),
      geo_(geo),
      l2_cache_(std::move(l2_cache)),
      slice_bytes_(slice_bytes),
      slice_bits_(static_cast<uint32_t>(__builtin_ctzll(slice_bytes / geo.l2_entry_size))),
      overlap_(overlap) {}

Task<Status> ClusterMap::load_l1(uint64_t offset, uint32_t entries) {
  UQ_CO_ASSIGN_OR_RETURN(l1_, co_await read_table(file_, offset, entries));
  co_return Status();
}

void ClusterMap::set_active_l1_entry(uint64_t index, uint64_t entry) {
  overlap_.active_l1_entry_changed(l1_[index], entry);
  l1_[index] = entry;
}

void ClusterMap::replace_l1(std::vector<uint64_t> table) {
  overlap_.l2_tables(MetadataKind::kActiveL2, l1_, false);
  l1_ = std::move(table);
  overlap_.l2_tables(MetadataKind::kActiveL2, l1_, true);
}

Task<Status> ClusterMap::write_l1_entry(uint64_t l1_index) {
  constexpr uint64_t kPerSector = kSectorSize / 8;
  const uint64_t first = l1_index & ~(kPerSector - 1);
  const uint64_t count = std::min<uint64_t>(kPerSector, l1_.size() - first);
  const std::vector<uint8_t> sector = encode_table(std::span<const uint64_t>(l1_).subspan(first, count));
  const uint64_t offset = header_.l1_table_offset + first * 8;
  UQ_CO_TRY(overlap_.check_metadata_write(offset, count * 8, "L1 entry", overlap_bit(MetadataKind::kActiveL1)));
  file_.debug_event(BlkDebugEvent::kL1Update);
  co_return co_await file_.co_write(offset, std::span<const std::byte>(reinterpret_cast<const std::byte*>(sector.data()), sector.size()));
}

Result<uint64_t> ClusterMap::l2_table_of(uint64_t offset) const {
  uint64_t l1_index = geo_.l1_index(offset);
  if (l1_index >= l1_.size()) return uint64_t{0};
  uint64_t l2 = l1_[l1_index] & kL1OffsetMask;
  if (l2 & (geo_.cluster_size - 1)) {
    return Error(EIO, "qcow2 image " + file_.name() + " is corrupt: L2 table offset " + hex(l2) +
                          " unaligned (L1 index " + std::to_string(l1_index) + ")");
  }
  return l2;
}

const char* ClusterMap::l2_entry_problem(uint64_t l2e, uint64_t bitmap) const {
  const bool df = header_.has_data_file();
  if (l2e & kOflagCompressed) return df ? "compressed cluster in an image with an external data file" : nullptr;
  const bool host = l2_has_host(l2e, df);
  const uint64_t alloc_bits = bitmap & 0xffffffffull;
  if (!geo_.extended_l2) {
    if ((l2e & kOflagZero) && !(header_.version >= 3)) return "zero flag in a compat=0.10 image";
  } else if (host && (alloc_bits & (bitmap >> 32))) {
    return "a subcluster is both allocated and zero";
  } else if (!host && alloc_bits) {
    return "subclusters allocated without a host cluster";
  }
  if (host && ((l2e & kL2OffsetMask) & (geo_.cluster_size - 1))) {
    return "cluster allocation offset is not cluster aligned";
  }
  return nullptr;
}

Error ClusterMap::bad_l2_entry(uint64_t slice_host, uint64_t index, uint64_t l2e, const char* why) const {
  return Error(EIO, "qcow2 image " + file_.name() + " is corrupt: L2 entry " + hex(l2e) + " (L2 slice " +
                        hex(slice_host) + ", index " + std::to_string(index) + "): " + why);
}

Result<Mapping> ClusterMap::decode_l2(const uint8_t* slice, uint64_t slice_host, uint64_t offset,
                                      uint64_t max_bytes) const {
  const uint64_t entries_per_slice = 1ull << slice_bits_;
  uint64_t index = geo_.l2_index(offset) & (entries_per_slice - 1);
  // Never map past the end of this slice.
  uint64_t in_cluster = geo_.offset_into_cluster(offset);
  max_bytes = std::min(max_bytes, (entries_per_slice - index) * geo_.cluster_size - in_cluster);

  const ConstL2Slice entries(slice, geo_);
  uint64_t l2e = entries.entry(index), bitmap = entries.bitmap(index);
  uint32_t sc = geo_.subcluster_index(offset);
  const bool df = header_.has_data_file();
  SubclusterType type = subcluster_type(geo_, l2e, bitmap, sc, (header_.version >= 3), df);
  Mapping m;
  m.type = type;
  if (type == SubclusterType::kInvalid || (type == SubclusterType::kCompressed && df)) {
    return bad_l2_entry(slice_host, index, l2e, l2_entry_problem(l2e, bitmap));
  }
  if (type == SubclusterType::kCompressed) {
    m.host_offset = l2e;
    m.bytes = std::min(max_bytes, geo_.cluster_size - in_cluster);
    return m;
  }
  uint64_t host = l2e & kL2OffsetMask;
  bool has_host = type == SubclusterType::kNormal || type == SubclusterType::kZeroAlloc ||
                  type == SubclusterType::kUnallocatedAlloc;
  if (has_host && (host & (geo_.cluster_size - 1))) {
    return bad_l2_entry(slice_host, index, l2e, "cluster allocation offset is not cluster aligned");
  }
  if (has_host && df && host != offset - in_cluster) {
    // QEMU's check: a data-file cluster sits at its guest offset. Going
    // through any other host offset would read, or overwrite, another guest
    // cluster's data.
    return bad_l2_entry(slice_host, index, l2e,
                        "external data file host cluster offset does not match the guest cluster offset");
  }
  if (has_host) m.host_offset = host + in_cluster;
  m.copied = (l2e & kOflagCopied) != 0;

  // Extend the run over following subclusters and clusters of the same type
  // (and, where there is a host offset, physically contiguous).
  uint64_t run = geo_.subcluster_size - (offset & (geo_.subcluster_size - 1));
  uint32_t per_cluster = geo_.extended_l2 ? kSubclustersPerCluster : 1;
  uint64_t i = index;
  uint32_t next_sc = geo_.extended_l2 ? sc + 1 : 1;
  uint64_t expected_host = host;
  while (run < max_bytes) {
    if (next_sc == per_cluster) {
      if (++i >= entries_per_slice) break;
      l2e = entries.entry(i);
      bitmap = entries.bitmap(i);
      next_sc = 0;
      expected_host += geo_.cluster_size;
      if (has_host && (l2e & kL2OffsetMask) != expected_host) break;
      if (((l2e & kOflagCopied) != 0) != m.copied) break;
    }
    if (subcluster_type(geo_, l2e, bitmap, next_sc, (header_.version >= 3), df) != type) break;
    run += geo_.subcluster_size;
    ++next_sc;
  }
  m.bytes = std::min(run, max_bytes);
  return m;
}

bool ClusterMap::map_fast(uint64_t offset, uint64_t max_bytes, Result<Mapping>& out) {
  auto l2 = l2_table_of(offset);
  if (!l2.ok()) {
    out = std::move(l2).error();
    return true;
  }
  if (*l2 == 0) {
    // No L2 table: unallocated up to the end of this L1 entry's coverage.
    uint64_t coverage = geo_.l1_entry_coverage();
    uint64_t left = coverage - (offset & (coverage - 1));
    out = Mapping{.type = SubclusterType::kUnallocatedPlain, .bytes = std::min(left, max_bytes)};
    return true;
  }
  uint64_t slice = slice_offset(*l2, offset);
  const uint8_t* data = l2_cache_->lookup(slice);
  if (!data) return false;
  out = decode_l2(data, slice, offset, max_bytes);
  return true;
}

}  // namespace uqcow::qcow2
