// Refcounts: QEMU's qcow2-refcount.c as a component. It owns the refcount
// table (in memory), the refcount block cache, the free-cluster search
// state, the partly filled cluster for compressed data and the discards of
// freed clusters, and allocates host clusters of the image file.
//
// Every member runs with the image's metadata lock held.
//
// On-disk invariants kept here:
// - A refcount block reaches the disk before the refcount table entry that
//   points at it (refcount_block_for).
// - A new refcount table and its blocks reach the disk before the header
//   points at them; the old table is freed only afterwards
//   (grow_refcount_table). A crash at any point leaves a consistent image
//   that at most leaks clusters.
// - Freeing: the L2 tables that dropped the references reach the disk
//   before the refcount blocks that free the clusters (the refcount cache
//   depends on the L2 cache).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cache.h"
#include "qcow2/corruption.h"
#include "qcow2/header.h"
#include "qcow2/overlap_guard.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class Refcounts {
 public:
  // `header` is the image's: the refcount table's offset and size in it are
  // updated here when the table moves. `l2_cache` is the image's L2 cache:
  // freed clusters leave it, and frees wait for it (see above).
  Refcounts(BlockDevice& file, Header& header, const Geometry& geo, std::unique_ptr<MetadataCache> cache,
            MetadataCache& l2_cache, OverlapGuard& overlap, CorruptionReporter& reporter);
  Refcounts(const Refcounts&) = delete;
  Refcounts& operator=(const Refcounts&) = delete;

  MetadataCache& cache() { return *refcount_cache_; }
  // The in-memory copy of the refcount table (host-endian).
  const std::vector<uint64_t>& table() const { return reftable_; }
  // End of the highest cluster allocated or found in the file at load.
  uint64_t alloc_end() const { return alloc_end_; }

  // Reads the refcount table (read-write opens only).
  Task<Status> load_refcount_table();
  // The refcount block of refcount table index `rt_index` (present).
  Task<Result<MetadataCache::Ref>> load_refcount_block(uint64_t rt_index);
  Task<Result<uint64_t>> get_refcount(uint64_t cluster_index);
  // The refcount when its block is cached (or the cluster has no block: 0);
  // nullopt when get_refcount would have to load the block. No suspension.
  std::optional<uint64_t> cached_refcount(uint64_t cluster_index);

  // n contiguous fresh clusters, counted once: their host offset.
  Task<Result<uint64_t>> alloc_clusters(uint64_t n);
  // QEMU's qcow2_alloc_bytes: `size` bytes for compressed data, packed into
  // a partly used cluster; each cluster touched gains one reference.
  Task<Result<uint64_t>> alloc_bytes(uint64_t size);
  // Adds `delta` to every cluster touching [offset, offset + length).
  // Freed clusters are punched (discard passthrough) when `discard_freed`.
  // Returns EAGAIN (having undone its counts) when allocating a refcount
  // block took one of the clusters being counted up: the caller searches
  // again. EIO (corruption) on an overflow or underflow.
  Task<Status> update_refcount(uint64_t offset, uint64_t length, int64_t delta, bool discard_freed);
  // Punches the clusters freed so far (advisory), before anything reuses
  // them.
  Task<Status> process_discards();
  // Allocates clusters for `data` (zero-padded to whole clusters), writes it
  // there after the overlap check, and registers them as metadata of
  // `kind`: their host offset (0 for empty data, nothing allocated).
  Task<Result<uint64_t>> write_new_metadata(const std::vector<uint8_t>& data, MetadataKind kind);

  // --- Shrinking (refcount_shrink.cc) ----------------------------------------
  // Drops refcount blocks that count nothing but themselves from the
  // refcount table and frees them; a block not covered by the refcount
  // structures marks the image corrupt (QEMU's qcow2_shrink_reftable).
  Task<Status> shrink_refcount_table();
  // Truncates the image file after its last referenced cluster.
  Task<Status> truncate_to_last_cluster();

 private:
  Task<Result<uint64_t>> find_free_clusters(uint64_t n);
  Task<Result<MetadataCache::Ref>> refcount_block_for(uint64_t cluster_index, bool& allocated_block);
  Task<Status> grow_refcount_table(uint64_t min_entries);
  Task<Status> free_refcount_block(uint64_t block);
  Error corruption(const std::string& what) const { return reporter_->corruption(what); }
  Error fatal_corruption(Error e) { return reporter_->fatal(std::move(e)); }

  BlockDevice* const file_;
  Header& header_;
  const Geometry& geo_;
  std::unique_ptr<MetadataCache> refcount_cache_;
  MetadataCache* const l2_cache_;
  OverlapGuard* const overlap_;
  CorruptionReporter* const reporter_;

  std::vector<uint64_t> reftable_;          // host-endian copy of the refcount table
  uint32_t refblock_bits_ = 0;              // log2(refcounts per block)
  uint64_t free_cluster_index_ = 0;         // no free cluster below this one
  uint64_t free_byte_offset_ = 0;           // partly used cluster for compressed data
  uint64_t alloc_end_ = 0;                  // end of the highest allocated cluster
  std::vector<uint64_t> pending_discards_;  // freed clusters to punch
};

}  // namespace uqcow::qcow2
