// SnapshotRefcounts: QEMU's qcow2_update_snapshot_refcount, the walk over
// everything one L1 table reaches, for snapshot create, apply and delete.
//
// Refcount model (QEMU's): a data cluster's refcount is the number of L1
// tables (active or snapshot) that reach it, an L2 table's the number of L1
// tables that point at it. OFLAG_COPIED is set in the active tables exactly
// where that count is 1, which is what makes the write path copy on write.
//
// The image lock is held and no request is in flight (a drained section)
// in every member function. The walks change L2 slices through the cluster
// map's L2 cache and refcounts through Refcounts; the caller orders the
// flushes between them (snapshot_ops.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cluster_map.h"
#include "qcow2/corruption.h"
#include "qcow2/format.h"
#include "qcow2/refcounts.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class SnapshotRefcounts {
 public:
  // `external_data`: data clusters live in an external data file and are
  // not counted (nor checked against the qcow2 file's end).
  SnapshotRefcounts(const Geometry& geo, BlockDevice& file, bool external_data, ClusterMap& map,
                    Refcounts& refcounts, CorruptionReporter& reporter)
      : geo_(geo), file_(file), external_data_(external_data), map_(map), refcounts_(refcounts),
        reporter_(reporter) {}

  // Refuses (EIO, nothing changed) when a cluster `l1` reaches lies beyond
  // the end of the image file; marks the image corrupt on a damaged entry.
  Task<Status> check_in_file(const std::vector<uint64_t>& l1);
  // Adds `addend` (+1 or -1) to every L2 table and data cluster `l1`
  // reaches, then recomputes OFLAG_COPIED in the L2 entries and in `l1`
  // (dropping never sets it; `l1_changed` says whether `l1` changed, and the
  // caller writes it back if it is active).
  Task<Status> update(std::vector<uint64_t>& l1, int64_t addend, bool discard, bool& l1_changed);
  // QEMU's addend = 0: no count changes, OFLAG_COPIED recomputed from the
  // refcounts as they are now.
  Task<Status> recompute_copied_flags(std::vector<uint64_t>& l1, bool& l1_changed) {
    return update(l1, 0, false, l1_changed);
  }

 private:
  Task<Status> l2_refcount(uint64_t l2_offset, int64_t addend, bool discard);
  Task<Status> slice_refcounts(const uint8_t* slice, uint64_t entries, int64_t addend, bool discard);
  Task<Status> slice_copied(uint8_t* slice, uint64_t entries, int64_t addend, bool& changed);

  const Geometry& geo_;
  BlockDevice& file_;
  const bool external_data_;
  ClusterMap& map_;
  Refcounts& refcounts_;
  CorruptionReporter& reporter_;
};

}  // namespace uqcow::qcow2
