// The checker's view of the image (loading, the refcount array, the recorded
// refcounts) and every write a repair makes: refcount blocks, L1/L2 entries,
// a rebuilt refcount structure, header bits.
#include "qcow2/header_io.h"
#include "qcow2/tables.h"
#include "qcow2/repair.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "block/debug_event.h"
#include "block/endian.h"
#include "qcow2/hex.h"

namespace uqcow::qcow2::check_internal {
namespace {

// Header fields a repair rewrites (docs/interop/qcow2.txt, "Header"):
// refcount_table_offset (bytes 48-55) and refcount_table_clusters (56-59),
// written together; incompatible_features (72-79, version 3 only).

constexpr uint64_t kRefcountCacheBytes = 32ull << 20;
constexpr uint64_t kSubclusterZeroMask = 0xffffffff00000000ull;  // QCOW_L2_BITMAP_ALL_ZEROES

std::span<std::byte> as_bytes(std::vector<uint8_t>& v) {
  return {reinterpret_cast<std::byte*>(v.data()), v.size()};
}
std::span<const std::byte> as_bytes(std::span<const uint8_t> v) {
  return {reinterpret_cast<const std::byte*>(v.data()), v.size()};
}

Task<Status> load_snapshots(CheckedImage& img) {
  const Header& h = img.header;
  // The header was parsed for a check, which leaves the snapshot table
  // pointer to this point; QEMU then fails the check ("ERROR snapshot table
  // offset invalid", qcow2_check_read_snapshot_table()).
  if (Status s = validate_snapshot_table_pointer(h); !s.ok()) {
    co_return s.error().with_context(img.file.name());
  }
  if (h.nb_snapshots == 0) co_return Status();
  UQ_CO_ASSIGN_OR_RETURN(img.snapshots, co_await read_snapshot_table(img.file, h, img.file_length));
  // The parser keeps no byte count; QEMU writes entries in the canonical
  // layout that serialize_snapshot_table() reproduces.
  UQ_CO_ASSIGN_OR_RETURN(const std::vector<uint8_t> canonical, serialize_snapshot_table(img.snapshots));
  img.snapshot_table_bytes = canonical.size();
  co_return Status();
}

// Whether [offset, offset + len) touches the metadata QEMU's default
// ("cached") overlap check protects, except L2 tables: the header, the active
// L1 table, the refcount table and blocks, the snapshot table and the
// snapshot L1 tables. Returns what it overlaps, or nullptr.
const char* overlapping_metadata(const CheckedImage& img, uint64_t offset, uint64_t len) {
  auto hits = [&](uint64_t start, uint64_t bytes) {
    return bytes && offset < start + bytes && start < offset + len;
  };
  if (hits(0, img.cluster_size())) return "header";
  if (hits(img.header.l1_table_offset, uint64_t{img.header.l1_size} * 8)) return "active L1 table";
  if (hits(img.header.refcount_table_offset, img.refcount_table.size() * 8)) return "refcount table";
  for (uint64_t e : img.refcount_table) {
    if (hits(e & kReftableOffsetMask, (e & kReftableOffsetMask) ? img.cluster_size() : 0)) return "refcount block";
  }
  if (hits(img.header.snapshots_offset, img.snapshot_table_bytes)) return "snapshot table";
  for (const Snapshot& sn : img.snapshots) {
    if (hits(sn.l1_table_offset, uint64_t{sn.l1_size} * 8)) return "snapshot L1 table";
  }
  return nullptr;
}

Status refuse_overlap(const CheckedImage& img, const char* what, uint64_t offset, uint64_t len) {
  if (const char* meta = overlapping_metadata(img, offset, len)) {
    return Error(EIO, std::string("writing the ") + what + " at " + hex(offset) + " would overwrite the " + meta);
  }
  return Status();
}

}  // namespace

void note(CheckResult& res, const char* format, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, format);
  std::vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  // Bounded: a damaged image can have a finding for each of 2^28 clusters
  // (iotest 220's 512 TiB image), whose lines would not fit in memory.
  if (res.messages.size() >= kMaxCheckMessages) {
    ++res.messages_dropped;
    return;
  }
  res.messages.emplace_back(buf);
}

Task<Result<CheckedImage>> load_image(BlockDevice& file, BlockDevice* data_file) {
  UQ_CO_ASSIGN_OR_RETURN(Header header, co_await read_image_header(file, HeaderUse::kCheck));
  CheckedImage img(file, data_file, std::move(header));
  UQ_CO_ASSIGN_OR_RETURN(img.file_length, file.length());
  if (data_file) {
    UQ_CO_ASSIGN_OR_RETURN(img.data_file_length, data_file->length());
  }
  img.refblock_bits = img.geo.cluster_bits + 3 - img.header.refcount_order;
  // l1_size is bounded to 32 MiB and the refcount table to 8 MiB by parse_header.
  UQ_CO_ASSIGN_OR_RETURN(img.l1, co_await read_table(file, img.header.l1_table_offset, img.header.l1_size));
  UQ_CO_ASSIGN_OR_RETURN(
      img.refcount_table,
      co_await read_table(file, img.header.refcount_table_offset,
                          (uint64_t{img.header.refcount_table_clusters} << img.geo.cluster_bits) / 8));
  UQ_CO_TRY(co_await load_snapshots(img));
  co_return img;
}

// --- RefcountArray ---------------------------------------------------------

RefcountArray::RefcountArray(uint32_t refcount_order, uint32_t cluster_bits)
    : order_(refcount_order), cluster_bits_(cluster_bits), block_bits_(cluster_bits + 3 - refcount_order) {}

void RefcountArray::grow(uint64_t clusters) {
  if (clusters <= clusters_) return;
  const uint64_t blocks = (clusters + (uint64_t{1} << block_bits_) - 1) >> block_bits_;
  bytes_.resize(blocks << cluster_bits_, 0);
  clusters_ = clusters;
}

void RefcountArray::clear() { std::fill(bytes_.begin(), bytes_.end(), 0); }

std::span<const uint8_t> RefcountArray::block(uint64_t index) const {
  return {bytes_.data() + (index << cluster_bits_), size_t{1} << cluster_bits_};
}

bool RefcountArray::block_in_use(uint64_t index) const {
  auto b = block(index);
  return std::any_of(b.begin(), b.end(), [](uint8_t v) { return v != 0; });
}

// --- DiskRefcounts ---------------------------------------------------------

DiskRefcounts::DiskRefcounts(CheckedImage& img) : img_(img) {
  slots_.resize(std::clamp<uint64_t>(kRefcountCacheBytes / img.cluster_size(), 4, 64));
}

Task<Result<DiskRefcounts::Block>> DiskRefcounts::block(uint64_t cluster) {
  const uint64_t index = cluster >> img_.refblock_bits;
  if (index >= img_.refcount_table.size()) co_return Block{};
  const uint64_t offset = img_.refcount_table[index] & kReftableOffsetMask;
  if (offset == 0) co_return Block{};
  if (img_.geo.offset_into_cluster(offset)) {
    co_return Error(EIO, "refcount block offset " + hex(offset) + " unaligned (refcount table index " +
                             std::to_string(index) + ")");
  }
  const size_t slot = (offset >> img_.cluster_bits()) % slots_.size();
  Slot& s = slots_[slot];
  if (s.offset != offset) {
    if (s.dirty) UQ_CO_TRY(co_await write_back(s));
    s.offset = 0;
    s.data.resize(img_.cluster_size());
    // A block past the end of the file reads as zeros, as in QEMU.
    UQ_CO_TRY(co_await img_.file.co_read(offset, as_bytes(s.data)));
    s.offset = offset;
  }
  co_return Block{s.data.data(), slot};
}

uint64_t DiskRefcounts::get(const Block& b, uint64_t cluster) const {
  if (!b.data) return 0;
  return get_refcount_entry(b.data, cluster & ((uint64_t{1} << img_.refblock_bits) - 1),
                            img_.header.refcount_order);
}

void DiskRefcounts::set(Block& b, uint64_t cluster, uint64_t value) {
  set_refcount_entry(b.data, cluster & ((uint64_t{1} << img_.refblock_bits) - 1),
                     img_.header.refcount_order, value);
  slots_[b.slot].dirty = true;
  if (value == 0) freed_.push_back(cluster);
}

Task<Result<uint64_t>> DiskRefcounts::get(uint64_t cluster) {
  UQ_CO_ASSIGN_OR_RETURN(Block b, co_await block(cluster));
  co_return get(b, cluster);
}

Task<Status> DiskRefcounts::write_back(Slot& s) {
  // Only refcounts of clusters nothing references go down, and only ones
  // that are referenced go up, so the block may reach the disk at any time.
  img_.file.debug_event(BlkDebugEvent::kRefblockUpdate);
  UQ_CO_TRY(co_await img_.file.co_write(s.offset, as_bytes(std::span<const uint8_t>(s.data))));
  s.dirty = false;
  co_return Status();
}

Task<Status> DiskRefcounts::flush() {
  for (Slot& s : slots_) {
    if (s.dirty) UQ_CO_TRY(co_await write_back(s));
  }
  UQ_CO_TRY(co_await img_.file.co_flush());
  // Freed clusters are unreferenced and now recorded as free: give their
  // space back. Discarding is advisory (QEMU ignores its errors too).
  std::sort(freed_.begin(), freed_.end());
  for (size_t i = 0; i < freed_.size();) {
    size_t j = i + 1;
    while (j < freed_.size() && freed_[j] == freed_[j - 1] + 1) ++j;
    const uint64_t start = freed_[i] << img_.cluster_bits();
    const uint64_t end = std::min(img_.file_length, (freed_[j - 1] + 1) << img_.cluster_bits());
    if (start < end) (void)co_await img_.file.co_discard(start, end - start);
    i = j;
  }
  freed_.clear();
  co_return Status();
}

void DiskRefcounts::reset() {
  for (Slot& s : slots_) {
    s.offset = 0;
    s.dirty = false;
  }
  freed_.clear();
}

// --- Entry repairs ---------------------------------------------------------

Task<Status> zero_l2_entry(CheckedImage& img, uint64_t l2_offset, std::span<uint8_t> table, uint64_t index) {
  const uint32_t entry_size = img.geo.l2_entry_size;
  const uint64_t at = l2_offset + index * entry_size;
  UQ_CO_TRY(refuse_overlap(img, "L2 entry", at, entry_size));
  L2Slice l2(table.data(), img.geo);
  const uint64_t l2e = l2.entry(index);
  if (img.geo.extended_l2) {
    // The subclusters that held data read as zeros; unallocated ones still
    // read from the backing file. A compressed cluster is all data.
    uint64_t bitmap = (l2e & kOflagCompressed) ? 0xffffffffull : l2.bitmap(index);
    bitmap = (bitmap | bitmap << 32) & kSubclusterZeroMask;
    l2.set(index, 0, bitmap);
  } else {
    l2.set_entry(index, img.header.version >= 3 ? kOflagZero : 0);
  }
  // Once this entry is on disk the cluster is no longer referenced, which is
  // what the refcounts of this pass already assume.
  img.file.debug_event(BlkDebugEvent::kL2Update);
  UQ_CO_TRY(co_await img.file.co_write(at, as_bytes(table.subspan(index * entry_size, entry_size))));
  co_return co_await img.file.co_flush();
}

Task<Status> write_l1_entry(CheckedImage& img, uint64_t index) {
  uint8_t raw[8];
  store_be64(raw, img.l1[index]);
  img.file.debug_event(BlkDebugEvent::kL1Update);
  UQ_CO_TRY(co_await img.file.co_write(img.header.l1_table_offset + index * 8,
                                       as_bytes(std::span<const uint8_t>(raw, sizeof raw))));
  co_return co_await img.file.co_flush();
}

Task<Status> write_l2_table(CheckedImage& img, uint64_t l2_offset, std::span<const uint8_t> table) {
  UQ_CO_TRY(refuse_overlap(img, "L2 table", l2_offset, table.size()));
  img.file.debug_event(BlkDebugEvent::kL2Update);
  co_return co_await img.file.co_write(l2_offset, as_bytes(table));
}

// --- Rebuilding the refcount structure -------------------------------------

namespace {

// Where a rebuilt refcount structure goes: `blocks` (refcount block indices,
// ascending) at clusters start, start + 1, ..., then the table.
struct RebuildLayout {
  uint64_t start = 0;
  std::vector<uint64_t> blocks;
  uint64_t table_clusters = 0;
  uint64_t end() const { return start + blocks.size() + table_clusters; }
};

// The blocks needed are those holding a refcount of an existing cluster plus
// those covering the new structure itself, and the table must index them
// all. Both only grow as the structure grows, so this reaches a fixed point.
RebuildLayout plan_rebuild(const RefcountArray& refs, uint64_t start, uint32_t refblock_bits, uint32_t cluster_bits) {
  std::vector<uint64_t> used;
  for (uint64_t i = 0; i < refs.blocks() && (i << refblock_bits) < start; ++i) {
    if (refs.block_in_use(i)) used.push_back(i);
  }
  RebuildLayout l{start, {}, 0};
  while (true) {
    std::vector<uint64_t> blocks = used;
    const uint64_t end = l.end();
    if (end > start) {
      for (uint64_t i = start >> refblock_bits; i <= (end - 1) >> refblock_bits; ++i) {
        if (blocks.empty() || blocks.back() < i) blocks.push_back(i);
      }
    }
    const uint64_t entries = blocks.empty() ? 1 : blocks.back() + 1;
    const uint64_t table_clusters = (entries * 8 + (uint64_t{1} << cluster_bits) - 1) >> cluster_bits;
    if (blocks.size() == l.blocks.size() && table_clusters == l.table_clusters) return l;
    l.blocks = std::move(blocks);
    l.table_clusters = table_clusters;
  }
}

}  // namespace

Task<Status> rebuild_refcount_structure(CheckedImage& img, RefcountArray& refs) {
  const uint64_t cs = img.cluster_size();
  // Past the end of the file and past every cluster with a reference, so the
  // new structure overwrites nothing that is in use, and the old one stays
  // valid until the header switches over.
  const uint64_t start = std::max(img.geo.size_to_clusters(img.file_length), refs.clusters());
  const RebuildLayout l = plan_rebuild(refs, start, img.refblock_bits, img.cluster_bits());
  if (l.table_clusters * cs > kMaxRefcountTableBytes) {
    co_return Error(EFBIG, "the rebuilt refcount table would exceed 8 MiB");
  }
  refs.grow(l.end());
  for (uint64_t c = start; c < l.end(); ++c) refs.set(c, 1);

  std::vector<uint64_t> entries(l.table_clusters * cs / 8, 0);
  uint64_t next = start;
  for (uint64_t index : l.blocks) {
    entries[index] = next * cs;
    img.file.debug_event(BlkDebugEvent::kRefblockAllocWriteBlocks);
    UQ_CO_TRY(co_await img.file.co_write(next * cs, as_bytes(refs.block(index))));
    ++next;
  }
  const uint64_t table_offset = next * cs;
  img.file.debug_event(BlkDebugEvent::kRefblockAllocWriteTable);
  const std::vector<uint8_t> table = encode_table(entries);
  UQ_CO_TRY(co_await img.file.co_write(table_offset, as_bytes(std::span<const uint8_t>(table))));
  // The new blocks and table must be on disk before the header points at
  // them: a crash before the switch leaves the old structure in charge.
  UQ_CO_TRY(co_await img.file.co_flush());
  img.file.debug_event(BlkDebugEvent::kRefblockAllocSwitchTable);
  UQ_CO_TRY(co_await write_header_fields(
      img.file, {kOffRefcountTableOffset, table_offset}, {kOffRefcountTableClusters, l.table_clusters}));
  UQ_CO_TRY(co_await img.file.co_flush());

  img.header.refcount_table_offset = table_offset;
  img.header.refcount_table_clusters = static_cast<uint32_t>(l.table_clusters);
  img.refcount_table = std::move(entries);
  UQ_CO_ASSIGN_OR_RETURN(img.file_length, img.file.length());
  co_return Status();
}

Task<Status> clear_incompatible_bits(CheckedImage& img, uint64_t bits) {
  const uint64_t features = img.header.incompatible_features & ~bits;
  if (img.header.version < 3 || features == img.header.incompatible_features) co_return Status();
  UQ_CO_TRY(co_await write_header_fields(img.file, {kOffIncompatible, features}));
  UQ_CO_TRY(co_await img.file.co_flush());
  img.header.incompatible_features = features;
  co_return Status();
}

}  // namespace uqcow::qcow2::check_internal
