// Internals of the checker (check.cc) and its repairs (repair.cc): the
// checker's own view of the image, the in-memory refcount array, access to
// the refcounts the image records, and the operations that write the image.
// Not part of the qcow2 library's interface; include check.h instead.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qcow2/bitmap_directory.h"
#include "qcow2/check.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/refcount_entry.h"
#include "qcow2/snapshot.h"
#include "uring/block_device.h"

namespace uqcow::qcow2::check_internal {

// Appends a printf-formatted line to res.messages.
void note(CheckResult& res, const char* format, ...) __attribute__((format(printf, 2, 3)));

// The image as the checker reads it from disk. Repairs update it in place so
// that later stages see what is on disk.
struct CheckedImage {
  CheckedImage(BlockDevice& f, BlockDevice* df, Header h)
      : file(f), data_file(df), header(std::move(h)), geo(header.geometry()) {}

  BlockDevice& file;
  BlockDevice* data_file = nullptr;
  Header header;
  Geometry geo;
  uint64_t file_length = 0;
  uint64_t data_file_length = 0;      // valid when data_file != nullptr
  std::vector<uint64_t> l1;           // the active L1 table, as on disk
  std::vector<Snapshot> snapshots;
  uint64_t snapshot_table_bytes = 0;
  std::vector<uint64_t> refcount_table;
  uint32_t refblock_bits = 0;         // log2(refcounts per refcount block)

  uint64_t cluster_size() const { return geo.cluster_size; }
  uint32_t cluster_bits() const { return geo.cluster_bits; }
  bool has_data_file() const { return header.has_data_file(); }
};

// Loads the header, the active L1 table, the snapshot table and the refcount
// table. Every size is bounded before it is used (by parse_header, the
// snapshot parser and the file length). Errors: EINVAL naming the field, or
// the I/O error.
Task<Result<CheckedImage>> load_image(BlockDevice& file, BlockDevice* data_file);

// Expected refcounts, one per host cluster, stored at the image's refcount
// width and laid out exactly like refcount blocks (QEMU's in-memory refcount
// table), so that block(i) can be written to disk as refcount block i.
class RefcountArray {
 public:
  RefcountArray(uint32_t refcount_order, uint32_t cluster_bits);

  uint64_t clusters() const { return clusters_; }
  // Covers at least `clusters` clusters; new refcounts are 0. Storage is a
  // whole number of refcount blocks.
  void grow(uint64_t clusters);
  void clear();
  uint64_t get(uint64_t cluster) const {
    return get_refcount_entry(bytes_.data(), cluster, order_);
  }
  void set(uint64_t cluster, uint64_t value) { set_refcount_entry(bytes_.data(), cluster, order_, value); }
  uint64_t max() const { return max_refcount(order_); }
  // Refcount block `index` (one cluster of bytes); index < blocks().
  std::span<const uint8_t> block(uint64_t index) const;
  uint64_t blocks() const { return bytes_.size() >> cluster_bits_; }
  // True if refcount block `index` holds a non-zero refcount.
  bool block_in_use(uint64_t index) const;

 private:
  uint32_t order_;
  uint32_t cluster_bits_;
  uint32_t block_bits_;  // log2(refcounts per block)
  uint64_t clusters_ = 0;
  std::vector<uint8_t> bytes_;
};

// The refcounts the image records, read through its refcount table one
// refcount block at a time (QEMU's qcow2_get_refcount / update_refcount).
// Blocks stay in a small direct-mapped cache; changed blocks are written back
// on eviction and by flush().
class DiskRefcounts {
 public:
  explicit DiskRefcounts(CheckedImage& img);

  // A resident refcount block. `data` is nullptr when the refcount table has
  // no block for the cluster (its refcounts are all 0). Valid until the next
  // call of block() or flush().
  struct Block {
    uint8_t* data = nullptr;
    size_t slot = 0;
  };
  // The block holding `cluster`'s refcount. EIO (QEMU: "Can't get refcount")
  // when the refcount table entry is not cluster aligned.
  Task<Result<Block>> block(uint64_t cluster);
  uint64_t get(const Block& b, uint64_t cluster) const;
  // Changes a refcount inside an existing block (b.data != nullptr).
  void set(Block& b, uint64_t cluster, uint64_t value);
  Task<Result<uint64_t>> get(uint64_t cluster);
  // Writes back every changed block and flushes the file, then discards the
  // clusters whose refcount dropped to 0 (QEMU discards them as well).
  Task<Status> flush();
  // Forgets every cached block (after the refcount table was replaced).
  void reset();

 private:
  struct Slot {
    uint64_t offset = 0;  // 0: empty
    bool dirty = false;
    std::vector<uint8_t> data;
  };
  Task<Status> write_back(Slot& s);

  CheckedImage& img_;
  std::vector<Slot> slots_;
  std::vector<uint64_t> freed_;
};

// --- Repairs (repair.cc). Each one makes its change durable (co_flush)
// before returning, unless it says otherwise.

// QEMU's fix_l2_entry_by_zero(): rewrites entry `index` of the L2 table at
// `l2_offset` (whose bytes are `table`, updated too) so that the cluster
// reads as zeros and owns no host cluster: offset 0 with the zero flag, or
// with extended L2 the allocated subclusters turned into zero subclusters.
// v2 images have no zero flag; there the entry becomes unallocated.
Task<Status> zero_l2_entry(CheckedImage& img, uint64_t l2_offset, std::span<uint8_t> table,
                           uint64_t index);

// Writes entry `index` of the active L1 table (img.l1[index]) to disk.
Task<Status> write_l1_entry(CheckedImage& img, uint64_t index);

// Writes a whole L2 table back (COPIED fixes). Not flushed: the caller
// flushes once at the end of the pass.
Task<Status> write_l2_table(CheckedImage& img, uint64_t l2_offset, std::span<const uint8_t> table);

// QEMU's rebuild_refcount_structure(): writes a new refcount structure
// holding `refs` at the cluster-aligned end of the file (blocks, then the
// table), and only once it is on disk points the header at it. `refs` grows
// to cover the new clusters (refcount 1). Updates img.refcount_table and the
// header fields. The old structure is then leaked; the caller frees it.
Task<Status> rebuild_refcount_structure(CheckedImage& img, RefcountArray& refs);

// Clears `bits` in the v3 header's incompatible_features (dirty, corrupt).
Task<Status> clear_incompatible_bits(CheckedImage& img, uint64_t bits);

// --- Persistent bitmaps (check_bitmaps.cc) --------------------------------
// The bitmap directory, validated as QEMU's bitmap_list_load: no entries
// when the autoclear bit says the bitmaps are to be ignored; EINVAL naming
// the field otherwise.
Task<Result<std::vector<BitmapDirEntry>>> load_bitmap_directory(CheckedImage& img);
// -r all: drops the bitmaps a crash left in use (inconsistent) from the
// directory and the header; their clusters become leaks for the refcount
// pass to free.
Task<Status> remove_inconsistent_bitmaps(CheckedImage& img, CheckResult& res);

}  // namespace uqcow::qcow2::check_internal
