// The checker: QEMU's qcow2_check_refcounts() and the functions it calls
// (calculate_refcounts, check_refcounts_l1/l2, check_refblocks,
// compare_refcounts, check_oflag_copied), over the raw on-disk structures.
// Writes are delegated to repair.cc.
#include "qcow2/check.h"

#include <algorithm>
#include <cinttypes>
#include <climits>
#include <cstring>

#include "block/endian.h"
#include "qcow2/repair.h"
#include "qcow2/tables.h"

namespace uqcow::qcow2 {

using check_internal::CheckedImage;
using check_internal::DiskRefcounts;
using check_internal::note;
using check_internal::RefcountArray;

namespace {

constexpr uint64_t kReftableReservedMask = 0x1ff;           // QEMU's REFT_RESERVED_MASK
constexpr uint64_t kSubclusterAllocMask = 0xffffffffull;    // QCOW_L2_BITMAP_ALL_ALLOC

std::span<std::byte> as_bytes(std::vector<uint8_t>& v) {
  return {reinterpret_cast<std::byte*>(v.data()), v.size()};
}

// QEMU's QCow2ClusterType: what a whole L2 entry describes. The checker works
// per cluster; format.h's subcluster_type() is the per-subcluster view.
enum class ClusterType { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };

ClusterType cluster_type(const CheckedImage& img, uint64_t l2e) {
  if (l2e & kOflagCompressed) return ClusterType::kCompressed;
  if ((l2e & kOflagZero) && !img.geo.extended_l2) {
    return (l2e & kL2OffsetMask) ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  if (!(l2e & kL2OffsetMask)) {
    // Offset 0 is a valid offset in an external data file. Its clusters all
    // have refcount 1, so COPIED tells them apart from unallocated ones.
    return img.has_data_file() && (l2e & kOflagCopied) ? ClusterType::kNormal
                                                        : ClusterType::kUnallocated;
  }
  return ClusterType::kNormal;
}

// Every count of `res` except the messages.
CheckResult counts_of(const CheckResult& res) {
  CheckResult c;
  c.corruptions = res.corruptions;
  c.leaks = res.leaks;
  c.check_errors = res.check_errors;
  c.corruptions_fixed = res.corruptions_fixed;
  c.leaks_fixed = res.leaks_fixed;
  c.image_end_offset = res.image_end_offset;
  c.total_clusters = res.total_clusters;
  c.allocated_clusters = res.allocated_clusters;
  c.fragmented_clusters = res.fragmented_clusters;
  c.compressed_clusters = res.compressed_clusters;
  return c;
}

void set_counts(CheckResult& res, const CheckResult& counts) {
  std::vector<std::string> messages = std::move(res.messages);
  res = counts;
  res.messages = std::move(messages);
}

// QEMU's calculate_refcounts(): the refcount every cluster should have,
// counted from everything that references it, with the checks QEMU makes on
// the way. A Status that is not ok stops the check (QEMU's ret < 0).
class ReferenceWalk {
 public:
  ReferenceWalk(CheckedImage& img, CheckResult& res, RefcountArray& refs, RepairMode fix)
      : img_(img), res_(res), refs_(refs), fix_(fix) {}

  Task<Status> run();
  // The refcount structure itself is broken and must be rebuilt.
  bool rebuild() const { return rebuild_; }

 private:
  struct L2Entry {
    uint64_t index;
    uint64_t entry;
    uint64_t bitmap;  // extended L2 subcluster bitmap, else 0
    ClusterType type;
  };
  enum class Next { kCount, kSkip, kZero };

  void inc(uint64_t offset, uint64_t size);
  Task<Status> walk_l1(uint64_t l1_offset, uint32_t l1_size, bool active);
  Task<Status> walk_l2(uint64_t l2_offset, bool active);
  Next check_l2_entry(const L2Entry& e, bool& counted);
  Next check_compressed(const L2Entry& e);
  Next check_allocated(const L2Entry& e, bool& counted);
  void count_l2_entry(const L2Entry& e, bool active);
  Task<Status> walk_snapshots();
  Task<Status> walk_bitmaps();
  Task<Status> walk_bitmap_table(uint64_t table_offset, uint32_t entries);
  void check_reftable_overlap();
  void check_refblocks();

  CheckedImage& img_;
  CheckResult& res_;
  RefcountArray& refs_;
  RepairMode fix_;
  bool rebuild_ = false;
  uint64_t next_contiguous_ = 0;  // fragmentation, per L2 table like QEMU
};

// qcow2_inc_refcounts_imrt(). A region may end inside the cluster after the
// end of the file (the last cluster may be partly written), not further: the
// refcount array never grows past one cluster beyond the file.
void ReferenceWalk::inc(uint64_t offset, uint64_t size) {
  if (size == 0) return;
  const uint64_t limit = img_.file_length + img_.cluster_size();
  if (offset >= limit || size >= limit - offset) {
    note(res_, "ERROR: counting reference for region exceeding the end of the file by one "
               "cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64, offset, size);
    ++res_.corruptions;
    return;
  }
  const uint64_t first = offset >> img_.cluster_bits();
  const uint64_t last = (offset + size - 1) >> img_.cluster_bits();
  refs_.grow(last + 1);
  for (uint64_t k = first; k <= last; ++k) {
    uint64_t refcount = refs_.get(k);
    if (refcount == refs_.max()) {
      note(res_, "ERROR: overflow cluster offset=0x%" PRIx64 " (the refcount width of the image "
                 "is too small; convert the image to a wider refcount_bits)", k << img_.cluster_bits());
      ++res_.corruptions;
      continue;
    }
    refs_.set(k, refcount + 1);
  }
}

Task<Status> ReferenceWalk::run() {
  inc(0, img_.cluster_size());  // the header
  UQ_CO_TRY(co_await walk_l1(img_.header.l1_table_offset, img_.header.l1_size, true));
  UQ_CO_TRY(co_await walk_snapshots());
  inc(img_.header.refcount_table_offset, img_.refcount_table.size() * 8);
  if (img_.header.crypto_header) inc(img_.header.crypto_header->offset, img_.header.crypto_header->length);
  UQ_CO_TRY(co_await walk_bitmaps());
  check_reftable_overlap();
  check_refblocks();
  co_return Status();
}

Task<Status> ReferenceWalk::walk_l1(uint64_t l1_offset, uint32_t l1_size, bool active) {
  if (l1_size == 0) co_return Status();
  inc(l1_offset, uint64_t{l1_size} * 8);
  // l1_size is bounded to 32 MiB by parse_header and the snapshot parser.
  std::vector<uint8_t> raw(uint64_t{l1_size} * 8);
  Status s = co_await img_.file.co_read(l1_offset, as_bytes(raw));
  if (!s.ok()) {
    note(res_, "ERROR: I/O error in check_refcounts_l1: %s", s.message().c_str());
    ++res_.check_errors;
    co_return s;
  }
  const std::vector<uint64_t> l1 = decode_table(raw);
  for (uint32_t i = 0; i < l1_size; ++i) {
    const uint64_t l1e = l1[i];
    if (l1e == 0) continue;
    if (l1e & kL1ReservedMask) {
      note(res_, "ERROR found L1 entry with reserved bits set: %" PRIx64, l1e);
      ++res_.corruptions;
    }
    const uint64_t l2_offset = l1e & kL1OffsetMask;
    inc(l2_offset, img_.cluster_size());
    if (img_.geo.offset_into_cluster(l2_offset)) {
      note(res_, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted",
           l2_offset);
      ++res_.corruptions;
    }
    UQ_CO_TRY(co_await walk_l2(l2_offset, active));
  }
  co_return Status();
}

Task<Status> ReferenceWalk::walk_l2(uint64_t l2_offset, bool active) {
  std::vector<uint8_t> table(img_.cluster_size());
  Status s = co_await img_.file.co_read(l2_offset, as_bytes(table));
  if (!s.ok()) {
    note(res_, "ERROR: I/O error in check_refcounts_l2: %s", s.message().c_str());
    ++res_.check_errors;
    co_return s;
  }
  next_contiguous_ = 0;
  const ConstL2Slice l2(table.data(), img_.geo);
  for (uint64_t i = 0; i < img_.geo.l2_entries; ++i) {
    L2Entry e{i, l2.entry(i), l2.bitmap(i), ClusterType::kUnallocated};
    e.type = cluster_type(img_, e.entry);
    bool counted = false;  // the problem is already counted as a corruption
    Next next = check_l2_entry(e, counted);
    if (next == Next::kSkip) continue;
    if (next == Next::kZero) {
      Status z = co_await check_internal::zero_l2_entry(img_, l2_offset, table, i);
      if (z.ok()) {
        if (counted) --res_.corruptions;
        ++res_.corruptions_fixed;
        continue;  // the entry owns no cluster any more
      }
      // Not fixed: keep checking the table with the entry as it was.
      note(res_, "ERROR: Failed to overwrite L2 table entry: %s", z.message().c_str());
      ++res_.check_errors;
    }
    count_l2_entry(e, active);
  }
  co_return Status();
}

// The checks of check_refcounts_l2() that do not count references: reports
// and counts what is wrong with the entry and decides what happens next.
ReferenceWalk::Next ReferenceWalk::check_l2_entry(const L2Entry& e, bool& counted) {
  if (e.type != ClusterType::kCompressed && (e.entry & kL2StandardReservedMask)) {
    note(res_, "ERROR found l2 entry with reserved bits set: %" PRIx64, e.entry);
    ++res_.corruptions;
  }
  switch (e.type) {
    case ClusterType::kCompressed:
      return check_compressed(e);
    case ClusterType::kZeroAlloc:
    case ClusterType::kNormal:
      return check_allocated(e, counted);
    case ClusterType::kZeroPlain:
      return Next::kSkip;
    case ClusterType::kUnallocated:
      if (e.bitmap & kSubclusterAllocMask) {
        note(res_, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
        ++res_.corruptions;
      }
      return Next::kSkip;
  }
  return Next::kSkip;
}

ReferenceWalk::Next ReferenceWalk::check_compressed(const L2Entry& e) {
  if (e.entry & kOflagCopied) {
    note(res_, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be set for compressed clusters",
         img_.geo.compressed_offset(e.entry));
    ++res_.corruptions;
  }
  if (img_.has_data_file()) {
    note(res_, "ERROR compressed cluster %" PRIu64 " with data file, entry=0x%" PRIx64, e.index, e.entry);
    ++res_.corruptions;
    return Next::kSkip;
  }
  if (e.bitmap) {
    note(res_, "ERROR compressed cluster %" PRIu64 " with non-zero subcluster allocation bitmap, "
               "entry=0x%" PRIx64, e.index, e.entry);
    ++res_.corruptions;
    return Next::kSkip;
  }
  // Beyond QEMU: compressed data that starts past the end of the file cannot
  // be read at all; with -r all the cluster is made to read as zeros.
  const uint64_t coffset = img_.geo.compressed_offset(e.entry);
  if (fix_ == RepairMode::kAll && coffset >= img_.file_length) {
    note(res_, "Repairing coffset=0x%" PRIx64 ": compressed cluster lies beyond the end of the file; "
               "it now reads as zeros", coffset);
    return Next::kZero;
  }
  return Next::kCount;
}

ReferenceWalk::Next ReferenceWalk::check_allocated(const L2Entry& e, bool& counted) {
  const uint64_t offset = e.entry & kL2OffsetMask;
  if ((e.bitmap >> 32) & e.bitmap) {
    note(res_, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted subcluster allocation bitmap",
         offset);
    ++res_.corruptions;
  }
  const bool fix = fix_ == RepairMode::kAll;
  if (img_.geo.offset_into_cluster(offset)) {
    ++res_.corruptions;
    counted = true;
    bool has_data = img_.geo.extended_l2 ? (e.bitmap & kSubclusterAllocMask) != 0
                                         : !(e.entry & kOflagZero);
    if (has_data) {
      // Left alone like QEMU: the data may still be recoverable by hand.
      note(res_, "ERROR offset=%" PRIx64 ": Data cluster is not properly aligned; L2 entry corrupted.",
           offset);
    } else {
      note(res_, "%s offset=%" PRIx64 ": Preallocated cluster is not properly aligned; L2 entry "
                 "corrupted.", fix ? "Repairing" : "ERROR", offset);
      if (fix) return Next::kZero;
    }
  }
  // Beyond QEMU (which only reports this, in inc()): nothing can be read past
  // the end of the file, so the cluster already reads as zeros; with -r all
  // the entry says so and stops referencing the missing cluster.
  const bool data_file = img_.has_data_file();
  if (fix && !data_file && offset >= img_.file_length) {
    note(res_, "Repairing offset=%" PRIx64 ": cluster lies beyond the end of the file; it now reads "
               "as zeros", offset);
    return Next::kZero;
  }
  if (data_file && img_.data_file && offset >= img_.data_file_length) {
    note(res_, "%s offset=%" PRIx64 ": cluster lies beyond the end of the external data file",
         fix ? "Repairing" : "ERROR", offset);
    ++res_.corruptions;
    counted = true;
    if (fix) return Next::kZero;
  }
  return Next::kCount;
}

// Counts the references of an entry that passed check_l2_entry(), and the
// allocation statistics of the active L1 (QEMU's CHECK_FRAG_INFO).
void ReferenceWalk::count_l2_entry(const L2Entry& e, bool active) {
  if (e.type == ClusterType::kCompressed) {
    inc(img_.geo.compressed_offset(e.entry), img_.geo.compressed_size(e.entry));
    if (active) {
      // Compressed clusters are fragmented by nature: neighbours share
      // sectors, which are read again for each of them.
      ++res_.allocated_clusters;
      ++res_.compressed_clusters;
      ++res_.fragmented_clusters;
    }
    return;
  }
  const uint64_t offset = e.entry & kL2OffsetMask;
  if (active) {
    ++res_.allocated_clusters;
    if (next_contiguous_ && offset != next_contiguous_) ++res_.fragmented_clusters;
    next_contiguous_ = offset + img_.cluster_size();
  }
  // Clusters of an external data file have no refcount.
  if (!img_.has_data_file()) inc(offset, img_.cluster_size());
}

Task<Status> ReferenceWalk::walk_snapshots() {
  if (img_.has_data_file() && !img_.snapshots.empty()) {
    note(res_, "ERROR %zu snapshots in image with data file", img_.snapshots.size());
    ++res_.corruptions;
  }
  // Unaligned and oversized snapshot L1 tables are refused by the parser.
  for (const Snapshot& sn : img_.snapshots) {
    UQ_CO_TRY(co_await walk_l1(sn.l1_table_offset, sn.l1_size, false));
  }
  inc(img_.header.snapshots_offset, img_.snapshot_table_bytes);
  co_return Status();
}

// qcow2_check_bitmaps_refcounts(): the bitmap directory, every bitmap table
// and the clusters the tables point at. Bitmaps only count while the
// autoclear bit says they are consistent (QEMU ignores them otherwise).
Task<Status> ReferenceWalk::walk_bitmaps() {
  auto entries = co_await check_internal::load_bitmap_directory(img_);
  if (!entries.ok()) {
    note(res_, "ERROR bitmap directory: %s", entries.error().message().c_str());
    ++res_.corruptions;
    co_return std::move(entries).error();
  }
  if (entries->empty()) co_return Status();
  inc(img_.header.bitmaps->directory_offset, img_.header.bitmaps->directory_size);
  for (const auto& e : *entries) {
    // Counted like any other (QEMU counts it and says nothing); only a
    // removal makes such a bitmap go (-r all does that here).
    if (e.in_use()) note(res_, "Bitmap '%s' is inconsistent: it was left in use", e.name.c_str());
    if (uint64_t{e.table_size} * 8 > img_.file_length) {
      note(res_, "ERROR bitmap '%s': bitmap_table_size %u runs past the end of the file", e.name.c_str(),
           e.table_size);
      ++res_.corruptions;
      co_return Error(EINVAL, "bitmap '" + e.name + "': bitmap_table_size runs past the end of the file");
    }
    inc(e.table_offset, uint64_t{e.table_size} * 8);
    UQ_CO_TRY(co_await walk_bitmap_table(e.table_offset, e.table_size));
  }
  co_return Status();
}

Task<Status> ReferenceWalk::walk_bitmap_table(uint64_t table_offset, uint32_t entries) {
  // entries * 8 is bounded by the file length (walk_bitmaps).
  std::vector<uint8_t> table(uint64_t{entries} * 8);
  Status s = co_await img_.file.co_read(table_offset, as_bytes(table));
  if (!s.ok()) {
    ++res_.corruptions;
    co_return s;
  }
  for (uint32_t i = 0; i < entries; ++i) {
    const uint64_t entry = load_be64(&table[uint64_t{i} * 8]);
    const uint64_t offset = entry & kBitmapTableOffsetMask;
    if (!bitmap_table_entry_problem(entry, img_.cluster_size()).empty()) {
      note(res_, "ERROR bitmap table entry %u at 0x%" PRIx64 " is invalid: 0x%" PRIx64, i,
           table_offset, entry);
      ++res_.corruptions;
      continue;
    }
    if (offset) inc(offset, img_.cluster_size());
  }
  co_return Status();
}

// Beyond QEMU: a refcount table that shares a cluster with other metadata or
// data. QEMU only sees the refcount mismatch this causes (counted by
// compare_refcounts()) and, with -r all, raises the refcount, leaving the
// table shared; this moves the table instead by rebuilding the structure.
// Runs before check_refblocks() so that a refcount block inside the table
// is reported there.
void ReferenceWalk::check_reftable_overlap() {
  const uint64_t first = img_.header.refcount_table_offset >> img_.cluster_bits();
  const uint64_t end = std::min<uint64_t>(refs_.clusters(), first + img_.header.refcount_table_clusters);
  for (uint64_t c = first; c < end; ++c) {
    if (refs_.get(c) <= 1) continue;
    note(res_, "Warning: refcount table cluster %" PRIu64 " is also used by other metadata or data", c);
    if (fix_ == RepairMode::kAll) rebuild_ = true;
  }
}

// QEMU's check_refblocks(): every refcount block must be a cluster of its own
// inside the file; anything else means the refcount structure is rebuilt.
void ReferenceWalk::check_refblocks() {
  for (uint64_t i = 0; i < img_.refcount_table.size(); ++i) {
    const uint64_t raw = img_.refcount_table[i];
    const uint64_t offset = raw & kReftableOffsetMask;
    const uint64_t cluster = offset >> img_.cluster_bits();
    if (raw & kReftableReservedMask) {
      note(res_, "ERROR refcount table entry %" PRIu64 " has reserved bits set", i);
    } else if (img_.geo.offset_into_cluster(offset)) {
      note(res_, "ERROR refcount block %" PRIu64 " is not cluster aligned; refcount table entry "
                 "corrupted", i);
    } else if (cluster >= refs_.clusters()) {
      // QEMU grows the file to make room for the block, then rebuilds anyway
      // since the new block holds only zeros. This rebuilds directly and
      // never extends the file to an offset read from the image.
      note(res_, "%s refcount block %" PRIu64 " is outside image",
           fix_ == RepairMode::kAll ? "Repairing" : "ERROR", i);
      ++res_.corruptions;
      if (fix_ == RepairMode::kAll) rebuild_ = true;
      continue;
    } else {
      if (offset == 0) continue;
      inc(offset, img_.cluster_size());
      const uint64_t refcount = refs_.get(cluster);
      if (refcount == 1) continue;
      note(res_, "ERROR refcount block %" PRIu64 " refcount=%" PRIu64, i, refcount);
    }
    ++res_.corruptions;
    rebuild_ = true;
  }
}

// --- Comparing with the refcounts on disk ---------------------------------

struct CompareState {
  CheckedImage& img;
  CheckResult& res;
  RepairMode fix;
  bool& rebuild;
  uint64_t& highest;
};

// One cluster of compare_refcounts(). Returns true if it changed the block.
bool compare_cluster(CompareState& st, DiskRefcounts& disk, DiskRefcounts::Block& block,
                     uint64_t cluster, uint64_t expected) {
  const uint64_t recorded = disk.get(block, cluster);
  if (recorded > 0 || expected > 0) st.highest = cluster;
  if (recorded == expected) return false;
  uint64_t* fixed = nullptr;
  if (recorded == 0) {
    // No refcount block to fix, or one that says the cluster is free: only a
    // rebuild can be trusted here.
    st.rebuild = true;
  } else if (recorded > expected && st.fix != RepairMode::kNone) {
    fixed = &st.res.leaks_fixed;
  } else if (recorded < expected && st.fix == RepairMode::kAll) {
    fixed = &st.res.corruptions_fixed;
  }
  note(st.res, "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
       fixed ? "Repairing" : recorded < expected ? "ERROR" : "Leaked", cluster, recorded, expected);
  if (fixed) {
    disk.set(block, cluster, expected);
    ++*fixed;
    return true;
  }
  if (recorded < expected) {
    ++st.res.corruptions;
  } else {
    ++st.res.leaks;
  }
  return false;
}

// QEMU's compare_refcounts(), one refcount block at a time. Fixed refcounts
// are written back and flushed before it returns.
Task<Status> compare_refcounts(CompareState st, const RefcountArray& refs, DiskRefcounts& disk) {
  st.highest = 0;
  const uint64_t per_block = uint64_t{1} << st.img.refblock_bits;
  bool changed = false;
  for (uint64_t first = 0; first < refs.clusters(); first += per_block) {
    const uint64_t end = std::min(refs.clusters(), first + per_block);
    auto block = co_await disk.block(first);
    if (!block.ok()) {
      for (uint64_t c = first; c < end; ++c) {
        note(st.res, "Can't get refcount for cluster %" PRIu64 ": %s", c, std::strerror(block.error().code()));
        ++st.res.check_errors;
      }
      continue;
    }
    for (uint64_t c = first; c < end; ++c) {
      changed |= compare_cluster(st, disk, *block, c, refs.get(c));
    }
  }
  if (changed) {
    Status s = co_await disk.flush();
    if (!s.ok()) {
      note(st.res, "ERROR: Could not write refcount blocks: %s", s.message().c_str());
      ++st.res.check_errors;
      co_return s;
    }
  }
  co_return Status();
}

// --- OFLAG_COPIED ------------------------------------------------------------

// COPIED must be set exactly when the refcount is 1. Entries of an external
// data file always have refcount 1.
Task<bool> check_l2_copied(CheckedImage& img, CheckResult& res, bool repair, DiskRefcounts& disk,
                           std::span<uint8_t> table) {
  bool dirty = false;
  L2Slice l2(table.data(), img.geo);
  for (uint64_t j = 0; j < img.geo.l2_entries; ++j) {
    const uint64_t l2e = l2.entry(j);
    ClusterType type = cluster_type(img, l2e);
    if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
    uint64_t refcount = 1;
    if (!img.has_data_file()) {
      auto r = co_await disk.get((l2e & kL2OffsetMask) >> img.cluster_bits());
      if (!r.ok()) continue;  // already reported by compare_refcounts()
      refcount = *r;
    }
    if ((refcount == 1) == ((l2e & kOflagCopied) != 0)) continue;
    note(res, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
         repair ? "Repairing" : "ERROR", l2e, refcount);
    if (repair) {
      l2.set_entry(j, refcount == 1 ? l2e | kOflagCopied : l2e & ~kOflagCopied);
      dirty = true;
      ++res.corruptions_fixed;
    } else {
      ++res.corruptions;
    }
  }
  co_return dirty;
}

// QEMU's check_oflag_copied() over the active L1 table and its L2 tables.
// -r all always repairs; -r leaks only when the pass found nothing else
// wrong, as the refcounts can then be trusted.
Task<Status> check_oflag_copied(CheckedImage& img, CheckResult& res, RepairMode fix, DiskRefcounts& disk) {
  const bool repair = fix == RepairMode::kAll ||
                      (fix == RepairMode::kLeaks && !res.check_errors && !res.corruptions && !res.leaks);
  std::vector<uint8_t> table(img.cluster_size());
  bool wrote = false;
  for (uint64_t i = 0; i < img.l1.size(); ++i) {
    const uint64_t l1e = img.l1[i];
    const uint64_t l2_offset = l1e & kL1OffsetMask;
    if (!l2_offset) continue;
    auto refcount = co_await disk.get(l2_offset >> img.cluster_bits());
    if (!refcount.ok()) continue;  // already reported by compare_refcounts()
    if ((*refcount == 1) != ((l1e & kOflagCopied) != 0)) {
      note(res, "%s OFLAG_COPIED L2 cluster: l1_index=%" PRIu64 " l1_entry=%" PRIx64 " refcount=%" PRIu64,
           repair ? "Repairing" : "ERROR", i, l1e, *refcount);
      if (repair) {
        img.l1[i] = *refcount == 1 ? l1e | kOflagCopied : l1e & ~kOflagCopied;
        Status s = co_await check_internal::write_l1_entry(img, i);
        if (!s.ok()) {
          ++res.check_errors;
          co_return s;
        }
        ++res.corruptions_fixed;
      } else {
        ++res.corruptions;
      }
    }
    Status s = co_await img.file.co_read(l2_offset, as_bytes(table));
    if (!s.ok()) {
      note(res, "ERROR: Could not read L2 table: %s", s.message().c_str());
      ++res.check_errors;
      co_return s;
    }
    // (Not awaited inside the condition: GCC 12 miscompiles that form.)
    bool table_changed = co_await check_l2_copied(img, res, repair, disk, table);
    if (!table_changed) continue;
    s = co_await check_internal::write_l2_table(img, l2_offset, table);
    if (!s.ok()) {
      note(res, "ERROR: Could not write L2 table: %s", s.message().c_str());
      ++res.check_errors;
      co_return s;
    }
    wrote = true;
  }
  if (wrote) UQ_CO_TRY(co_await img.file.co_flush());
  co_return Status();
}

// --- The whole check -------------------------------------------------------

// The -r all branch of qcow2_check_refcounts() when the refcount structure is
// broken: rebuild it, count the references again (the new structure is now
// referenced, the old one is not) and free the old structure. Fix counts are
// what the rebuild made disappear; leaks it could not free are added back.
Task<Status> rebuild_and_recount(CheckedImage& img, CheckResult& res, RefcountArray& refs,
                                 DiskRefcounts& disk, uint64_t& highest) {
  const CheckResult old = counts_of(res);
  note(res, "Rebuilding refcount structure");
  Status s = co_await check_internal::rebuild_refcount_structure(img, refs);
  if (!s.ok()) {
    note(res, "ERROR rebuilding the refcount structure: %s", s.message().c_str());
    ++res.check_errors;
    co_return s;
  }
  disk.reset();
  // QEMU counts the allocation statistics a second time here; they are
  // counted afresh instead.
  res.corruptions = 0;
  res.leaks = 0;
  res.allocated_clusters = res.fragmented_clusters = res.compressed_clusters = 0;
  bool rebuild = false;
  refs.clear();
  UQ_CO_TRY(co_await ReferenceWalk(img, res, refs, RepairMode::kNone).run());
  const CheckResult saved = counts_of(res);
  set_counts(res, CheckResult{});
  UQ_CO_TRY(co_await compare_refcounts({img, res, RepairMode::kLeaks, rebuild, highest}, refs, disk));
  if (rebuild) note(res, "ERROR rebuilt refcount structure is still broken");
  const uint64_t fresh_leaks = res.leaks;
  set_counts(res, saved);
  if (res.corruptions < old.corruptions) res.corruptions_fixed += old.corruptions - res.corruptions;
  if (res.leaks < old.leaks) res.leaks_fixed += old.leaks - res.leaks;
  res.leaks += fresh_leaks;
  co_return Status();
}

// QEMU's qcow2_check_refcounts(): one pass of checking (and repairing).
Task<Status> check_refcounts(CheckedImage& img, CheckResult& res, RepairMode fix) {
  const uint64_t nb_clusters = img.geo.size_to_clusters(img.file_length);
  if (nb_clusters > INT_MAX) {
    ++res.check_errors;
    co_return Error(EFBIG, "the file has more than INT_MAX clusters");
  }
  res.total_clusters = img.geo.size_to_clusters(img.header.size);
  RefcountArray refs(img.header.refcount_order, img.cluster_bits());
  refs.grow(nb_clusters);
  ReferenceWalk walk(img, res, refs, fix);
  UQ_CO_TRY(co_await walk.run());
  bool rebuild = walk.rebuild();

  // When nothing needs a rebuild but something needs fixing, the comparison
  // runs again with fixing on; its first counts are then discarded.
  const CheckResult before_compare = counts_of(res);
  DiskRefcounts disk(img);
  uint64_t highest = 0;
  UQ_CO_TRY(co_await compare_refcounts({img, res, RepairMode::kNone, rebuild, highest}, refs, disk));
  if (rebuild && fix == RepairMode::kAll) {
    UQ_CO_TRY(co_await rebuild_and_recount(img, res, refs, disk, highest));
  } else if (fix != RepairMode::kNone) {
    if (rebuild) {
      note(res, "ERROR need to rebuild refcount structures");
      ++res.check_errors;
      co_return Error(EIO, "the refcount structure must be rebuilt, which only -r all does");
    }
    if (res.leaks || res.corruptions) {
      set_counts(res, before_compare);
      UQ_CO_TRY(co_await compare_refcounts({img, res, fix, rebuild, highest}, refs, disk));
    }
  }
  UQ_CO_TRY(co_await check_oflag_copied(img, res, fix, disk));
  res.image_end_offset = (highest + 1) * img.cluster_size();
  co_return Status();
}

// The pass after a repair: a fresh load and a check without fixing, whose
// counts are what remains. The fix counts of the repair are kept.
Task<Result<CheckResult>> recheck(BlockDevice& file, BlockDevice* data_file, CheckResult repaired) {
  auto img = co_await check_internal::load_image(file, data_file);
  if (!img.ok()) co_return std::move(img).error().with_context("after repairing");
  CheckResult res;
  res.messages = std::move(repaired.messages);
  res.stopped = co_await check_refcounts(*img, res, RepairMode::kNone);
  res.corruptions_fixed = repaired.corruptions_fixed;
  res.leaks_fixed = repaired.leaks_fixed;
  res.rechecked = true;
  co_return res;
}

}  // namespace

Task<Result<CheckResult>> check_image(BlockDevice& file, BlockDevice* data_file, RepairMode mode,
                                      bool remove_inconsistent_bitmaps) {
  UQ_CO_ASSIGN_OR_RETURN(auto img, co_await check_internal::load_image(file, data_file));
  CheckResult res;
  if (mode == RepairMode::kAll && remove_inconsistent_bitmaps) {
    UQ_CO_TRY(co_await check_internal::remove_inconsistent_bitmaps(img, res));
  }
  res.stopped = co_await check_refcounts(img, res, mode);
  if (mode == RepairMode::kNone || !res.stopped.ok()) co_return res;

  uint64_t incompatible = img.header.incompatible_features;
  if (res.corruptions_fixed || res.leaks_fixed) {
    UQ_CO_ASSIGN_OR_RETURN(res, co_await recheck(file, data_file, std::move(res)));
    if (!res.stopped.ok()) co_return res;
  }
  // A repair that leaves no corruption makes the image consistent again; on
  // a lazy-refcounts image the refcounts are then exact, so it is clean.
  if (res.check_errors == 0 && res.corruptions == 0 && (incompatible & (kIncompatDirty | kIncompatCorrupt))) {
    Status s = co_await check_internal::clear_incompatible_bits(img, kIncompatDirty | kIncompatCorrupt);
    if (!s.ok()) res.stopped = std::move(s);
  }
  co_return res;
}

}  // namespace uqcow::qcow2
