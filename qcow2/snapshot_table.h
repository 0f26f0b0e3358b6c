// SnapshotTable: the internal snapshot table as a component. It owns the
// parsed table and is the only writer of it: a new table is written to
// fresh clusters, the header switched to it in one write, and the old one
// freed afterwards. Snapshot create/apply/delete (snapshot_ops.cc) decide
// what the next table holds; this decides how it reaches the disk.
//
// On-disk invariant (replace): everything the new table references
// (refcounts, L1 copies, L2 tables) is on disk before the header points at
// it; the old table is freed only after the switch. A crash at any point
// leaves the old table or the new one in charge, leaking at most clusters.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/cluster_map.h"
#include "qcow2/header.h"
#include "qcow2/refcounts.h"
#include "qcow2/snapshot.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

class SnapshotTable {
 public:
  SnapshotTable(BlockDevice& file, Header& header, const Geometry& geo, ClusterMap& map, Refcounts& refcounts,
                OverlapGuard& overlap)
      : file_(file), header_(header), geo_(geo), map_(map), refcounts_(refcounts), overlap_(overlap) {}
  SnapshotTable(const SnapshotTable&) = delete;
  SnapshotTable& operator=(const SnapshotTable&) = delete;

  const std::vector<Snapshot>& list() const { return snapshots_; }
  // Reads the table the header points at.
  Task<Status> load();
  // By id, else by name (QEMU's find_snapshot_by_id_or_name); nullptr if
  // none. Valid until the next replace().
  const Snapshot* find(const std::string& id_or_name) const;
  // The id a new snapshot gets: one above the highest numeric id.
  std::string next_id() const;
  // The table's size on disk in whole clusters (0 without snapshots).
  uint64_t clusters_bytes() const;

  // Makes `next` the snapshot table (see the invariant above); the old
  // table's clusters are freed, and punched when `discard_old`.
  Task<Status> replace(std::vector<Snapshot> next, bool discard_old);

 private:
  BlockDevice& file_;
  Header& header_;
  const Geometry& geo_;
  ClusterMap& map_;
  Refcounts& refcounts_;
  OverlapGuard& overlap_;
  std::vector<Snapshot> snapshots_;
};

}  // namespace uqcow::qcow2
