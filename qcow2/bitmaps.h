// PersistentBitmaps: QEMU's qcow2-bitmap.c as a component. It owns the
// image's persistent dirty bitmaps: the directory as loaded, one in-memory
// DirtyBitmap per consistent bitmap, and writing them back.
//
// Lifecycle (as QEMU's qcow2_load_dirty_bitmaps / qcow2_store_persistent_
// dirty_bitmaps):
// - load(): the directory and the data of every consistent bitmap. A bitmap
//   whose IN_USE flag is set on disk was left in use by a crash (or by a
//   writer that still has it): it is inconsistent, its data is not read, it
//   cannot be used, and it stays on disk as it is until removed.
// - mark_in_use() (read-write opens): IN_USE is set on disk on every
//   consistent bitmap before any write can reach the disk, so that a crash
//   from now on leaves them inconsistent, never silently wrong.
// - mark_dirty(): every write, write-zeroes, discard and compressed write
//   sets its range in each enabled bitmap (memory only).
// - store(): writes every changed bitmap to fresh clusters, then a new
//   directory, then the header that points at it, and only then frees what
//   the old directory referenced. A crash at any point leaves the old or the
//   new directory complete (at most leaked clusters). At close, and at a
//   guest flush (bitmap-store-interval), IN_USE is cleared: a crash then
//   finds the bitmaps consistent.
//
// The invariant that makes a consistent bitmap on disk trustworthy: no
// write, write-zeroes, discard or compressed write changes the disk while
// an enabled bitmap's stored state lacks it and its IN_USE flag is clear on
// disk. Writers check ready_for_writes() and mark_dirty() with no suspension
// in between; store() makes ready_for_writes() false before it serialises
// anything, so a writer arriving during a store waits (for the metadata
// lock) and sets IN_USE again (mark_in_use) before it marks and writes. A
// writer that marked before the store began is in the stored bits, even if
// its data reaches the disk later.
//
// Every member that touches the disk runs with the image's metadata lock
// held (open, close, flush, the write path's mark_in_use, resize).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/dirty_bitmap.h"
#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/bitmap_directory.h"
#include "qcow2/header.h"
#include "qcow2/overlap_guard.h"
#include "qcow2/refcounts.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

struct BitmapInfo {
  std::string name;
  uint64_t granularity = 0;
  bool in_use = false;        // the IN_USE flag as qemu-img info shows it
  bool enabled = false;       // the "auto" flag: tracks writes
  bool inconsistent = false;  // IN_USE when loaded: unusable
};

class PersistentBitmaps {
 public:
  // `refcounts` may be null for a read-only open (nothing is stored then).
  PersistentBitmaps(BlockDevice& file, Header& header, const Geometry& geo, Refcounts* refcounts,
                    OverlapGuard& overlap);
  PersistentBitmaps(const PersistentBitmaps&) = delete;
  PersistentBitmaps& operator=(const PersistentBitmaps&) = delete;

  // Reads the directory the header points at and every consistent bitmap's
  // data, for a disk of `disk_size` bytes. EINVAL naming the field (and
  // bitmap) for a damaged directory or bitmap table; the image does not
  // open then, as in QEMU.
  Task<Status> load(uint64_t disk_size);
  // Sets IN_USE on disk on every consistent bitmap (read-write opens, and
  // the first write or resize after a store that cleared it): the directory
  // rewritten in place, bracketed by clearing and setting the autoclear bit,
  // each step synced (QEMU's update_ext_header_and_dir_in_place); when the
  // set of bitmaps changed since the last store, a store with IN_USE set.
  Task<Status> mark_in_use();
  bool in_use_on_disk() const { return in_use_on_disk_; }

  // True when some bitmap tracks writes.
  bool tracking() const { return !enabled_.empty(); }
  // A write may mark and proceed (see the invariant above); else it must
  // have mark_in_use() done first.
  bool ready_for_writes() const { return enabled_.empty() || in_use_on_disk_; }
  // The disk's size may change (a stored table covers the old size only).
  bool ready_for_resize() const { return in_use_on_disk_ || !has_consistent(); }
  // Marks [offset, offset + len) in every enabled bitmap. No allocation, no
  // I/O: the write path calls it for every request.
  void mark_dirty(uint64_t offset, uint64_t len) {
    for (Bitmap* b : enabled_) {
      b->bits->set(offset, len);
      b->changed = true;
    }
  }

  // Writes back what changed (see the top). `clear_in_use` (close, flush)
  // clears IN_USE on the consistent bitmaps; otherwise it stays set.
  // Nothing is written when nothing changed and IN_USE is as asked.
  Task<Status> store(bool clear_in_use);
  // A guest flush: store(true) when IN_USE is set and at least `interval`
  // seconds passed since the last store or mark_in_use().
  Task<Status> store_on_flush(uint64_t interval_seconds);

  std::vector<BitmapInfo> list() const;
  bool empty() const { return bitmaps_.empty(); }
  // The usable bitmap `name`: ENOENT if none, EINVAL if inconsistent.
  Result<const DirtyBitmap*> find(const std::string& name) const;

  // --- qemu-img bitmap's actions (in memory; store() writes them) ----------
  // A new, empty bitmap. EEXIST if the name is taken; EINVAL if QEMU's
  // constraints refuse it (check_bitmap_constraints) or the image is v2.
  Status add(const std::string& name, uint64_t granularity, bool enabled);
  // Forgets the bitmap; its clusters are freed by the next store().
  Status remove(const std::string& name);
  Status clear(const std::string& name);
  Status set_enabled(const std::string& name, bool enabled);
  // Marks in `name` everything dirty in `src`.
  Status merge(const std::string& name, const DirtyBitmap& src);

  // Whole-disk changes. Resizing needs every bitmap usable (QEMU's
  // qcow2_truncate_bitmaps_check): ENOTSUP naming an inconsistent one.
  Status check_resize() const;
  void resize(uint64_t new_size);

 private:
  struct Bitmap {
    std::string name;
    uint32_t granularity_bits = 16;
    bool enabled = false;
    bool inconsistent = false;
    bool changed = true;               // memory differs from the table on disk
    uint64_t table_offset = 0;         // on disk; 0: not stored yet
    uint32_t table_size = 0;
    std::optional<DirtyBitmap> bits;   // absent when inconsistent
  };
  struct Table {
    uint64_t offset;
    uint32_t size;
  };

  Bitmap* lookup(const std::string& name) const;
  bool has_consistent() const;
  void refresh_enabled();
  Task<Status> load_data(Bitmap& b);
  Task<Result<std::vector<uint64_t>>> read_table(uint64_t offset, uint32_t entries);
  // Writes the bitmap's non-zero clusters and its table to fresh clusters.
  Task<Result<Table>> write_bitmap(const Bitmap& b);
  // Frees a table's data clusters and the table.
  Task<Status> free_table(Table t);
  std::vector<BitmapDirEntry> directory_entries(bool clear_in_use) const;
  // Points the header at `ext` (or drops the extension for no bitmaps),
  // autoclear bit set; syncs before and after. `written`: the header write
  // itself succeeded (memory then follows it even if the sync failed).
  Task<Status> write_header_extension(std::optional<BitmapsExtension> ext, bool& written);

  BlockDevice& file_;
  Header& header_;
  const Geometry& geo_;
  Refcounts* const refcounts_;
  OverlapGuard& overlap_;
  uint64_t disk_size_ = 0;
  std::vector<std::unique_ptr<Bitmap>> bitmaps_;  // directory order; pointers stay valid
  std::vector<Bitmap*> enabled_;                  // the consistent enabled ones
  std::vector<Table> dropped_;                    // on disk, no longer referenced after store()
  bool directory_changed_ = false;                // names, flags or the set changed
  bool in_use_on_disk_ = false;                   // mark_in_use() done, not yet cleared
  uint64_t last_store_ns_ = 0;                    // steady clock: open, or the last store
};

}  // namespace uqcow::qcow2
