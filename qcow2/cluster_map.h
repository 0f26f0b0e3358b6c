// ClusterMap: guest offset -> host cluster, QEMU's qcow2-cluster.c lookup
// half. It owns the active L1 table (in memory) and the L2 cache, decodes
// L2 entries, and writes L1 entries.
//
// Invariant that makes the lock-free read path safe: the in-memory L1
// table and every cached L2 slice are always a consistent, fully
// initialised view of the mapping; a slice pointer from the cache's
// lookup() is used before the next suspension point and never kept.
// map_fast() neither suspends nor allocates.
//
// Writers of the L1 table keep the overlap guard's active-L2 regions in
// step (set_active_l1_entry, replace_l1).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cache.h"
#include "qcow2/corruption.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/overlap_guard.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

// A contiguous guest range with one mapping, QEMU's qcow2_get_host_offset().
struct Mapping {
  SubclusterType type = SubclusterType::kUnallocatedPlain;
  bool copied = false;       // the host cluster has refcount 1 (OFLAG_COPIED)
  uint64_t host_offset = 0;  // for kNormal/kZeroAlloc/kUnallocatedAlloc: host
                             // byte offset of the guest offset; kCompressed:
                             // the raw L2 entry
  uint64_t bytes = 0;        // length of the run from the guest offset
};

class ClusterMap {
 public:
  // `header` is the image's (its L1 table offset is read when writing L1
  // entries). `slice_bytes`: the L2 cache's entry size.
  ClusterMap(BlockDevice& file, const Header& header, const Geometry& geo, std::unique_ptr<MetadataCache> l2_cache,
             uint32_t slice_bytes, OverlapGuard& overlap);
  ClusterMap(const ClusterMap&) = delete;
  ClusterMap& operator=(const ClusterMap&) = delete;

  MetadataCache& l2_cache() { return *l2_cache_; }
  const MetadataCache& l2_cache() const { return *l2_cache_; }
  // The active L1 table (or, for an open of a snapshot, the snapshot's).
  const std::vector<uint64_t>& l1() const { return l1_; }
  uint32_t slice_bytes() const { return slice_bytes_; }
  uint64_t entries_per_slice() const { return uint64_t{1} << slice_bits_; }

  // Reads the L1 table at `offset` (`entries` bounded by the parsers: 32
  // MiB) and makes it the mapping.
  Task<Status> load_l1(uint64_t offset, uint32_t entries);
  // The one writer of single L1 entries in memory: the active L2 regions
  // follow.
  void set_active_l1_entry(uint64_t index, uint64_t entry);
  // A whole new active L1 table, already on disk; the active L2 regions
  // follow.
  void replace_l1(std::vector<uint64_t> table);
  // Grows the in-memory L1 table with unallocated entries (the disk's was
  // grown and switched to first).
  void grow_l1(uint64_t entries) { l1_.resize(entries, 0); }
  // Rewrites the 512-byte sector of the active L1 table that holds entry
  // `index`, after the overlap check.
  Task<Status> write_l1_entry(uint64_t index);

  // Host offset of the L2 table that maps `offset`; 0 for none. EIO (not
  // yet reported) for an unaligned L1 entry.
  Result<uint64_t> l2_table_of(uint64_t offset) const;
  // Host offset of the L2 slice that maps `offset`, given its L2 table.
  uint64_t slice_offset(uint64_t l2_table, uint64_t offset) const {
    return l2_table + (geo_.l2_index(offset) >> slice_bits_) * slice_bytes_;
  }
  // Index of the entry that maps `offset` within its L2 slice.
  uint64_t slice_index(uint64_t offset) const { return geo_.l2_index(offset) & (entries_per_slice() - 1); }

  // Why an L2 entry (and its extended bitmap) is damaged, as the read and
  // the write path judge it (QEMU's qcow2_get_subcluster_type plus the
  // alignment checks), or nullptr when it is valid.
  const char* l2_entry_problem(uint64_t l2e, uint64_t bitmap) const;
  Error bad_l2_entry(uint64_t slice_host, uint64_t index, uint64_t l2e, const char* why) const;
  // Decodes the mapping of `offset` from an L2 slice at host `slice_host`
  // (no I/O, no lock). EIO (not yet reported) for a damaged entry.
  Result<Mapping> decode_l2(const uint8_t* slice, uint64_t slice_host, uint64_t offset, uint64_t max_bytes) const;
  // The mapping of [offset, offset + max_bytes) up to the end of one L2
  // slice, from memory: false when the slice is not cached (`out`
  // untouched). Neither suspends nor allocates.
  bool map_fast(uint64_t offset, uint64_t max_bytes, Result<Mapping>& out);

 private:
  BlockDevice& file_;
  const Header& header_;
  const Geometry& geo_;
  std::unique_ptr<MetadataCache> l2_cache_;
  const uint32_t slice_bytes_;
  const uint32_t slice_bits_;  // log2(L2 entries per slice)
  OverlapGuard& overlap_;
  std::vector<uint64_t> l1_;  // host-endian
};

}  // namespace uqcow::qcow2
