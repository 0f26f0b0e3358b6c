// Qcow2Image: a qcow2 image opened on the calling thread's reactor.
//
// Concurrency model (single reactor thread, cooperative):
// - `lock_` (a CoMutex, QEMU's s->lock) serialises every operation that
//   changes or loads metadata across suspension points: L2/refcount cache
//   misses, allocations, metadata writes.
// - The read hot path takes no lock: it maps the request through the
//   in-memory L1 table and the L2 cache's lookup(), which neither allocates
//   nor suspends, and goes straight to the data file's read. Only on an L2
//   cache miss does it take the lock to load the slice.
// - Invariant that makes this safe: the in-memory L1 table and every cached
//   L2 slice are always a consistent, fully initialised view of the mapping;
//   a slice pointer from lookup() is used before the next suspension point
//   and never kept.
//
// Requests in flight (the guarantees are in README "Concurrency"):
// - Every request holds a ticket of `requests_` (engine/in_flight.h) from
//   start to finish.
// - A host cluster that a request may have mapped without the lock (reads,
//   in-place writes to COPIED clusters) is never reused while that request
//   is in flight: FreedClusters::defer holds the free until every request
//   older than the unlink has finished (its grace period).
// - An allocation in flight (qcow2/inflight.h, QEMU's QCowL2Meta) owns the L2
//   entries of its guest range until it links them: allocating and
//   compressed writes wait for it (wait_for_dependencies), zero writes and
//   discards too (wait_for_overlapping), and link_l2 checks the entries are
//   still the ones its plan saw.
// - Snapshot create/apply/delete, resize and close run in a drained section:
//   no request is in flight and none starts until they finish, so clearing
//   OFLAG_COPIED or swapping the L1 table cannot race with an in-place write.
//   They also exclude each other (`exclusive_`, taken before the drain):
//   drained sections nest, and resize releases the metadata lock while it
//   zeroes, so without it a snapshot could record half a shrink, or set
//   OFLAG_COPIED under a zero write in flight.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/disk.h"
#include "block/options.h"
#include "engine/co_mutex.h"
#include "engine/in_flight.h"
#include "engine/task_group.h"
#include "qcow2/bitmaps.h"
#include "qcow2/mapping_writer.h"
#include "qcow2/metadata_walk.h"
#include "qcow2/cache.h"
#include "qcow2/cluster_map.h"
#include "qcow2/corruption.h"
#include "qcow2/create_options.h"
#include "qcow2/encryption.h"
#include "qcow2/freed_clusters.h"
#include "qcow2/header.h"
#include "qcow2/l1_resize.h"
#include "qcow2/inflight.h"
#include "qcow2/overlap.h"
#include "qcow2/overlap_guard.h"
#include "qcow2/refcounts.h"
#include "qcow2/snapshot.h"
#include "qcow2/snapshot_refcounts.h"
#include "qcow2/snapshot_table.h"
#include "uring/block_device.h"
#include "uring/ops.h"

namespace uqcow::qcow2 {

struct CacheSizes {
  uint64_t l2_cache_bytes = 0;
  uint32_t l2_entry_size = 0;
  uint64_t refcount_cache_bytes = 0;
};

// QEMU's read_cache_sizes() for Linux: by default an L2 cache that covers the
// whole disk, capped at 32 MiB, 4 KiB slices, and 4 clusters of refcounts.
Result<CacheSizes> compute_cache_sizes(const Header& h, const OpenOptions& o);

class Qcow2Image final : public Disk {
 public:
  // Opens the image in `file`. `open_backing` opens a backing file by
  // (resolved path, format or "") and is called for the backing chain.
  using BackingOpener = std::function<Task<Result<std::unique_ptr<Disk>>>(
      const std::string& path, const std::string& format)>;
  static Task<Result<std::unique_ptr<Qcow2Image>>> open(std::unique_ptr<BlockDevice> file,
                                                        OpenOptions options,
                                                        BackingOpener open_backing);
  ~Qcow2Image() override;

  uint64_t size() const override { return size_; }
  bool read_only() const override { return options_.read_only; }
  std::string format_name() const override { return "qcow2"; }
  const std::string& filename() const override { return file_->name(); }
  Disk* backing() const override { return backing_.get(); }

  Task<Status> read(uint64_t offset, std::span<std::byte> buf) override {
    return read_range(offset, buf, Entry::kNewRequest);
  }
  Task<Status> write(uint64_t offset, std::span<const std::byte> buf) override {
    return write_range(offset, buf, Entry::kNewRequest);
  }
  Task<Status> write_zeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Task<Status> discard(uint64_t offset, uint64_t len) override;
  Task<Status> flush() override;
  Task<Result<BlockStatus>> block_status(uint64_t offset, uint64_t max_len) override;
  Task<Status> close() override;
  Result<uint64_t> allocated_bytes() const override;
  Result<const DirtyBitmap*> dirty_bitmap(const std::string& name) const override;

  // Writes whole clusters compressed (qemu-io write -c, convert -c). Only
  // unallocated clusters can be written this way (EIO otherwise, as QEMU);
  // an incompressible cluster is written normally.
  Task<Status> write_compressed(uint64_t offset, std::span<const std::byte> buf);
  // Changes the virtual size, as QEMU's qcow2_co_truncate: grows (enlarging
  // the L1 table if needed) or shrinks, discarding what lies past the new
  // end. EINVAL for a size that is not a multiple of 512; ENOTSUP for a v2
  // image with snapshots. Bytes past the old end read as zero afterwards.
  Task<Status> resize(uint64_t new_size);
  // Allocates every cluster of a freshly created image (create.h).
  Task<Status> preallocate(Preallocation mode);

 private:
  // The length QEMU gives a preallocated external data file for a disk of
  // `disk_size` bytes.
  uint64_t data_file_end(uint64_t disk_size) const;
  // --- resize.cc ------------------------------------------------------------
  // resize() with exclusive_ held (snapshot_apply resizes to the snapshot's
  // size inside its own exclusive section, without zeroing the new area:
  // the snapshot's L1 table replaces the mapping right after).
  Task<Status> resize_exclusive(uint64_t new_size, bool zero_new_area);
  // When growing over a backing file longer than the old size, zeroes the
  // whole clusters added that it would show through (QEMU's
  // BDRV_REQ_ZERO_WRITE in bdrv_co_truncate).
  Task<Status> zero_over_backing(uint64_t old_size, uint64_t new_size);
  Task<Status> drop_tail(uint64_t new_size);
  Task<Status> zero_partial_cluster(uint64_t from, uint64_t to);

 public:

  // --- Internal snapshots (snapshot_ops.cc), qemu-img snapshot -c/-a/-d ---
  // Each returns OK or the error: EEXIST (name taken), ENOENT (no such id or
  // name), ENOTSUP (external data file), or an I/O / corruption error. A
  // crash at any point leaves at most leaked clusters.
  // Records the active state as snapshot `name` (id = highest id + 1).
  Task<Status> snapshot_create(const std::string& name);
  // Makes the snapshot (by id, else by name) the active state.
  Task<Status> snapshot_apply(const std::string& id_or_name);
  // Removes the snapshot and frees what only it referenced.
  Task<Status> snapshot_delete(const std::string& id_or_name);

  // --- Persistent dirty bitmaps (bitmaps.h; bitmap_ops.cc) -------------------
  // qemu-img bitmap's actions. Each changes the bitmaps in memory at once
  // (writes that follow are tracked accordingly); the image file gets them
  // at close, as with QEMU. EROFS on a read-only open; ENOENT, EEXIST,
  // EINVAL (constraints, inconsistent bitmap) as PersistentBitmaps says.
  std::vector<BitmapInfo> bitmap_list() const;
  Status bitmap_add(const std::string& name, uint64_t granularity, bool enabled);
  Status bitmap_remove(const std::string& name);
  Status bitmap_clear(const std::string& name);
  Status bitmap_set_enabled(const std::string& name, bool enabled);
  Status bitmap_merge(const std::string& name, const DirtyBitmap& src);

  // Consistency check of the overlap-check bookkeeping (overlap.cc): OK if
  // the regions kept in memory are the ones a fresh walk of the image's
  // tables finds (EIO naming the first difference otherwise). Read-only
  // opens keep none: OK.
  Task<Status> verify_metadata_regions();

 private:
  Status check_snapshot_support() const;
  // Writes `table` as the active L1; l1_ becomes `table` only if it succeeds.
  Task<Status> write_active_l1(const std::vector<uint64_t>& table);
  Task<Status> flush_metadata();
  // --- End of internal snapshots --------------------------------------------

 public:

  const Header& header() const { return header_; }
  const Geometry& geometry() const { return geo_; }
  const std::vector<Snapshot>& snapshots() const { return snapshots_->list(); }
  const CacheSizes& cache_sizes() const { return cache_sizes_; }
  const MetadataCache& l2_cache() const { return map_->l2_cache(); }
  // Times the metadata lock was taken since open (benchmarks: the cached
  // read path must not add to it).
  uint64_t metadata_lock_acquisitions() const { return lock_.acquisitions(); }
  const std::string& data_file_name() const;
  // The full path of the backing file as resolved at open ("" if none).
  const std::string& backing_path() const { return backing_path_; }

  // Maps [offset, offset + max_bytes) up to the end of one L2 slice. Takes
  // the lock only on an L2 cache miss.
  Task<Result<Mapping>> map_range(uint64_t offset, uint64_t max_bytes);

 private:
  Qcow2Image(std::unique_ptr<BlockDevice> file, OpenOptions options);

  Task<Status> load(BackingOpener& open_backing);
  Task<Status> prepare_read_write();
  // Rebuilds refcounts of an image left dirty (lazy refcounts) by a crash.
  Task<Status> repair_after_crash();
  Task<Status> select_snapshot(const std::string& id_or_name);
  // The caches, the cluster map and the refcounts, once the header (and
  // the data file) are known.
  Status create_components();
  // map_range() on an L2 cache miss, or a damaged entry (marked corrupt).
  Task<Result<Mapping>> map_slow(uint64_t offset, uint64_t max_bytes);

  // --- Write path (write.cc, zero.cc) --------------------------------------
  Status check_writable(uint64_t offset, uint64_t len) const;
  // The bodies of read(), write() and write_zeroes(). A new request waits to
  // be admitted and holds a ticket of requests_; a caller already inside a
  // request (copy-on-write reads, zero buffers, unaligned encrypted writes)
  // must not: in a drained section it would wait for itself.
  enum class Entry { kNewRequest, kWithinRequest };
  Task<Status> read_range(uint64_t offset, std::span<std::byte> buf, Entry entry);
  Task<Status> write_range(uint64_t offset, std::span<const std::byte> buf, Entry entry);
  Task<Status> write_zeroes_range(uint64_t offset, uint64_t len, bool may_unmap);
  Task<Status> write_zero_buffers(uint64_t offset, uint64_t len);
  // Handles a prefix of the write under the lock (one MappingWriter
  // step); returns the bytes done.
  Task<Result<size_t>> write_allocating(uint64_t offset, std::span<const std::byte> buf);
  // The copy-on-write source of writer_: what the guest sees at [guest,
  // guest + out.size()) now, zeros past the end of the disk.
  Task<Status> read_cow(uint64_t guest, std::span<std::byte> out);
  Task<Status> mark_dirty_for_lazy_refcounts();
  // Every guest-visible change (write, write-zeroes, discard, compressed
  // write) marks the enabled dirty bitmaps: no I/O, no allocation, once
  // bitmaps_ready() (bitmaps.h's invariant). Callers loop
  //   while (!bitmaps_ready()) co_await set_bitmaps_in_use();
  //   track_change(...);
  // with no suspension between the last check and the mark.
  bool bitmaps_ready() const { return !bitmaps_ || bitmaps_->ready_for_writes(); }
  Task<Status> set_bitmaps_in_use();
  void track_change(uint64_t offset, uint64_t len) {
    if (bitmaps_ && bitmaps_->tracking()) bitmaps_->mark_dirty(offset, len);
  }
  // Read-write opens: the bitmaps extension as this implementation keeps
  // it (dropped if a program without bitmap support wrote the image), and
  // IN_USE set on disk before any write.
  Task<Status> prepare_bitmaps();
  Task<Status> write_header_incompatible(uint64_t bits);
  // The locked protocol around MappingWriter::zero_clusters: waits for the
  // allocations in flight on the range, then changes its entries; zeros
  // that can only be written (part of a compressed cluster) are written
  // after the lock is released.
  using ZeroMode = MappingWriter::ZeroMode;
  Task<Status> zero_clusters(uint64_t offset, uint64_t len, ZeroMode mode);
  Task<Status> write_compressed_cluster(uint64_t offset, std::span<const uint8_t> data);

  // --- Overlap check (overlap.cc): building the regions the guard checks ---
  // What collect_metadata_regions (metadata_walk.h) walks.
  ImageTables image_tables() const;
  Task<Status> build_metadata_regions();

  // --- Encrypted data (encrypted_io.cc) --------------------------------------
  // Unlocks the image's encryption with options_.passphrase (then wiped).
  // Without a passphrase a read-only open still succeeds for metadata work
  // (check, map); data reads and read-write opens fail with ENOKEY.
  Task<Status> open_encryption();
  Error missing_key() const;
  // Reads and decrypts an encrypted normal cluster run.
  Task<Status> read_encrypted(uint64_t guest, uint64_t host, std::span<std::byte> buf);
  // Requests not aligned to 512 bytes go through whole sectors.
  Task<Status> read_unaligned(uint64_t offset, std::span<std::byte> buf);
  Task<Status> write_unaligned(uint64_t offset, std::span<const std::byte> buf);
  bool encrypted() const { return header_.crypt_method != CryptMethod::kNone; }

  Task<Status> read_mapped(const Mapping& m, uint64_t offset, std::span<std::byte> buf);
  Task<Status> read_backing(uint64_t offset, std::span<std::byte> buf);
  Task<Status> read_compressed(uint64_t l2_entry, uint64_t offset, std::span<std::byte> buf);
  // Damage reports (corruption.h): a read-write image is marked corrupt on
  // a fatal one (writes refused from now on, the incompatible bit written
  // in the background by mark_corrupt_on_disk).
  Error corruption(const std::string& what) const { return reporter_.corruption(what); }
  Error fatal_corruption(Error e) { return reporter_.fatal(std::move(e)); }
  void nonfatal_corruption(const std::string& what) { reporter_.nonfatal(what); }
  void mark_corrupt_on_disk();
  Task<void> clean_timer();

  std::unique_ptr<BlockDevice> file_;
  std::unique_ptr<BlockDevice> data_file_storage_;  // external data file, if any
  BlockDevice* data_file_ = nullptr;                // file_ or the external one
  std::string data_file_path_;
  OpenOptions options_;
  Header header_;
  Geometry geo_;
  uint64_t size_ = 0;
  bool v3_ = true;
  std::unique_ptr<Disk> backing_;
  std::string backing_path_;
  CacheSizes cache_sizes_;
  // The mapping (L1 table, L2 cache), refcounts and cluster allocation;
  // set up by load() (create_components).
  std::optional<ClusterMap> map_;
  std::optional<Refcounts> refcounts_;
  std::optional<SnapshotTable> snapshots_;
  std::optional<SnapshotRefcounts> snapshot_refs_;
  std::optional<L1Resize> l1_resize_;
  // Persistent dirty bitmaps; set up by load().
  std::optional<PersistentBitmaps> bitmaps_;
  std::optional<AllocationsInFlight> inflight_;  // set up by load() (needs the cluster size)
  // Allocating writes; set up by prepare_read_write() (read-only opens
  // never change the mapping).
  std::optional<MappingWriter> writer_;
  // Every request in flight (read, write, write_zeroes, discard, compressed
  // write) holds a ticket: snapshots, resize and close drain them, and
  // freed host clusters wait out their grace period (FreedClusters).
  InFlightTracker requests_;
  // Host clusters of unlinked L2 entries, freed once no request in flight
  // can still use them and the unlink is durable (FreedClusters::defer).
  std::optional<FreedClusters> freed_;
  CorruptionReporter reporter_;
  // Set up by load(), once the cluster size and the data file are known.
  std::optional<OverlapGuard> overlap_;
  bool lazy_refcounts_ = false;
  bool marked_dirty_ = false;         // dirty bit set on disk (lazy refcounts)
  CoMutex lock_;
  std::unique_ptr<ImageEncryption> crypto_;  // null: not encrypted, or no key
  // Serialises unaligned (read-modify-write) writes of an encrypted image
  // among themselves. An aligned write racing with one to the same 512-byte
  // sector is as unordered as any two overlapping concurrent writes, except
  // that the RMW may also restore the bytes around the unaligned range.
  CoMutex unaligned_write_lock_;
  // One whole-image operation at a time: snapshot create/apply/delete,
  // resize, close. Taken before their drained section.
  CoMutex exclusive_;
  TaskGroup background_;
  uring::TimeoutOp* clean_sleep_ = nullptr;  // the clean timer's pending sleep
  bool closing_ = false;
  bool closed_ = false;
};

}  // namespace uqcow::qcow2
