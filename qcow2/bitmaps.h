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
//   the old directory referenced; IN_USE is cleared when the image is
//   closing. A crash at any point leaves the old or the new directory
//   complete (at most leaked clusters).
//
// Every member that touches the disk runs with the image's metadata lock
// held and no request in flight (open, close, the bitmap operations, resize).
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
  // Read-write opens: sets IN_USE on disk on every consistent bitmap (the
  // directory rewritten in place, bracketed by clearing and setting the
  // autoclear bit, each step synced: QEMU's
  // update_ext_header_and_dir_in_place).
  Task<Status> mark_in_use();

  // True when some bitmap tracks writes.
  bool tracking() const { return !enabled_.empty(); }
  // Marks [offset, offset + len) in every enabled bitmap. No allocation, no
  // I/O: the write path calls it for every request.
  void mark_dirty(uint64_t offset, uint64_t len) {
    for (Bitmap* b : enabled_) {
      b->bits->set(offset, len);
      b->changed = true;
    }
  }

  // Writes back what changed (see the top). `closing` clears IN_USE on the
  // consistent bitmaps; otherwise it stays set (the image is still open).
  // Nothing to do, nothing written, when nothing changed and not closing.
  Task<Status> store(bool closing);

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
  void refresh_enabled();
  Task<Status> load_data(Bitmap& b);
  Task<Result<std::vector<uint64_t>>> read_table(uint64_t offset, uint32_t entries);
  // Writes the bitmap's non-zero clusters and its table to fresh clusters.
  Task<Result<Table>> write_bitmap(const Bitmap& b);
  // Frees a table's data clusters and the table.
  Task<Status> free_table(Table t);
  std::vector<BitmapDirEntry> directory_entries(bool closing) const;
  // Points the header at `dir` (or drops the extension for no bitmaps),
  // autoclear bit set; syncs before and after.
  Task<Status> write_header_extension(std::optional<BitmapsExtension> ext);

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
};

}  // namespace uqcow::qcow2
