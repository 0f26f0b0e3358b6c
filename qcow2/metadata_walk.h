// Finding every metadata structure of an image by walking its tables: the
// regions the overlap check guards (overlap_guard.h). The image builds them
// at a read-write open, and verify_metadata_regions() walks again to check
// the guard's incremental bookkeeping against a fresh walk.
//
// Tables are registered in whole clusters, as every incremental update
// does (L2 allocation in mapping_writer.cc, refcount blocks and table
// growth in refcounts.cc, L1 growth in l1_resize.cc, snapshots in
// snapshot_ops.cc); QEMU counts bytes, which a cluster-aligned check cannot
// tell apart.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/header.h"
#include "qcow2/overlap.h"
#include "qcow2/snapshot.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

// What the walk starts from: the header and the tables the image keeps in
// memory. Snapshot L1 tables are read from `file`, one at a time (at most
// 32 MiB each: the snapshot-table parser bounds l1_size), and only when
// inactive L2 tables are tracked.
struct ImageTables {
  const Header& header;
  const Geometry& geo;
  const std::vector<uint64_t>& active_l1;
  const std::vector<uint64_t>& refcount_table;
  const std::vector<Snapshot>& snapshots;
  uint64_t snapshot_table_bytes;  // whole clusters
};

// The regions of the kinds in `tracked`. An error reading a snapshot's L1
// table names the snapshot.
Task<Result<MetadataRegions>> collect_metadata_regions(BlockDevice& file, ImageTables t, OverlapMask tracked);

}  // namespace uqcow::qcow2
