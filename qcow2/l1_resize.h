// L1Resize: growing and shrinking the active L1 table, QEMU's
// qcow2_grow_l1_table and qcow2_shrink_l1_table (qcow2-cluster.c), for
// resize(). Both run in resize's drained section with the metadata lock
// held: no request is in flight, none holds an L1 entry.
//
// Crash safety:
// - grow: the new table, and its refcount, are on disk before the header
//   points at it (l1_size and l1_table_offset are adjacent and change in one
//   write); the old table is freed afterwards. A failure before the header
//   write leaks the new table's clusters at most, and changes nothing in
//   memory.
// - shrink: the entries past the new end are zero on disk before their L2
//   tables are freed, so a crash in between leaks the tables and never
//   reuses one the table on disk still points at. The table keeps its size,
//   as QEMU's.
#pragma once

#include <cstdint>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cluster_map.h"
#include "qcow2/corruption.h"
#include "qcow2/header.h"
#include "qcow2/overlap_guard.h"
#include "qcow2/refcounts.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class L1Resize {
 public:
  // `header`'s l1_table_offset and l1_size follow the table.
  L1Resize(BlockDevice& file, Header& header, const Geometry& geo, ClusterMap& map, Refcounts& refcounts,
           OverlapGuard& overlap, CorruptionReporter& reporter)
      : file_(file), header_(header), geo_(geo), map_(map), refcounts_(refcounts), overlap_(overlap),
        reporter_(reporter) {}
  L1Resize(const L1Resize&) = delete;
  L1Resize& operator=(const L1Resize&) = delete;

  // Makes the active L1 table large enough for a disk of `disk_size` bytes,
  // growing it by at least half (as QEMU, so repeated growth stays cheap),
  // whole clusters of entries. EFBIG when that needs more than 32 MiB (QEMU's
  // QCOW_MAX_L1_SIZE). `discard_old`: the old table's clusters are
  // discarded in the file too when freed.
  Task<Status> grow_for(uint64_t disk_size, bool discard_old);

  // Zeroes the L1 entries from `entries` on (on disk first) and frees the L2
  // tables they pointed at. An unaligned L2 table offset is reported
  // (non-fatal) and leaked. Nothing past the new end may be mapped in place
  // by a request (resize drains them).
  Task<Status> shrink_to(uint64_t entries);

 private:
  BlockDevice& file_;
  Header& header_;
  const Geometry& geo_;
  ClusterMap& map_;
  Refcounts& refcounts_;
  OverlapGuard& overlap_;
  CorruptionReporter& reporter_;
};

}  // namespace uqcow::qcow2
