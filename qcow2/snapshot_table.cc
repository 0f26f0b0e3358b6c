#include "qcow2/snapshot_table.h"

#include <algorithm>
#include <cstdlib>

#include "qcow2/header_io.h"

namespace uqcow::qcow2 {

Task<Status> SnapshotTable::load() {
  if (header_.nb_snapshots == 0) co_return Status();
  UQ_CO_ASSIGN_OR_RETURN(const uint64_t file_len, file_.length());
  UQ_CO_ASSIGN_OR_RETURN(snapshots_, co_await read_snapshot_table(file_, header_, file_len));
  co_return Status();
}

const Snapshot* SnapshotTable::find(const std::string& key) const {
  for (const auto& s : snapshots_) {
    if (s.id == key) return &s;
  }
  for (const auto& s : snapshots_) {
    if (s.name == key) return &s;
  }
  return nullptr;
}

std::string SnapshotTable::next_id() const {
  uint64_t max_id = 0;
  for (const auto& s : snapshots_) max_id = std::max<uint64_t>(max_id, std::strtoull(s.id.c_str(), nullptr, 10));
  return std::to_string(max_id + 1);
}

uint64_t SnapshotTable::clusters_bytes() const {
  if (header_.nb_snapshots == 0) return 0;
  auto table = serialize_snapshot_table(snapshots_);
  return table.ok() ? round_up(table->size(), geo_.cluster_size) : 0;
}

Task<Status> SnapshotTable::replace(std::vector<Snapshot> next, bool discard_old) {
  UQ_CO_ASSIGN_OR_RETURN(const std::vector<uint8_t> table, serialize_snapshot_table(next));
  UQ_CO_ASSIGN_OR_RETURN(const uint64_t offset, co_await refcounts_.write_new_metadata(table, MetadataKind::kSnapshotTable));
  UQ_CO_TRY(co_await refcounts_.cache().flush());
  UQ_CO_TRY(co_await map_.l2_cache().flush());
  UQ_CO_TRY(co_await file_.co_flush());
  // nb_snapshots and snapshots_offset change in one write.
  file_.debug_event(BlkDebugEvent::kSnapshotUpdate);
  UQ_CO_TRY(co_await write_header_fields(file_, {kOffNbSnapshots, next.size()}, {kOffSnapshotsOffset, offset}));
  UQ_CO_TRY(co_await file_.co_flush());
  const uint64_t old_offset = header_.snapshots_offset;
  const uint64_t old_bytes = clusters_bytes();
  header_.nb_snapshots = static_cast<uint32_t>(next.size());
  header_.snapshots_offset = offset;
  snapshots_ = std::move(next);
  if (old_bytes) {
    overlap_.remove(MetadataKind::kSnapshotTable, old_offset, old_bytes);
    UQ_CO_TRY(co_await refcounts_.update_refcount(old_offset, old_bytes, -1, discard_old));
  }
  co_return Status();
}

}  // namespace uqcow::qcow2
