// The internal snapshot table (docs/interop/qcow2.txt, "Snapshots").
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/header.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

struct Snapshot {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;   // the 64-bit field when present
  uint64_t disk_size = 0;       // virtual size at snapshot time
  bool has_icount = false;
  uint64_t icount = 0;
  // Extra data beyond the fields above, kept verbatim.
  std::vector<uint8_t> unknown_extra;
};

// Parses `nb` entries from `table` (the bytes at snapshots_offset). Every
// size field is bounded against the buffer; errors name the field and the
// snapshot index. `h` supplies defaults (disk size for v2 entries).
// Returns ENODATA when `table` ends before the entries do (more bytes may
// make it parse), EINVAL for a bad entry.
Result<std::vector<Snapshot>> parse_snapshot_table(std::span<const uint8_t> table, uint32_t nb,
                                                   const Header& h);

// Upper bound of the table's byte size for `nb` entries, used to size the
// read before parsing (each entry: 40 bytes + extra data + id + name).
inline constexpr uint64_t kMaxSnapshotEntryBytes = 40 + 1024 + 65535 + 65535 + 8;

Result<std::vector<uint8_t>> serialize_snapshot_table(const std::vector<Snapshot>& snapshots);

// Reads and parses the snapshot table `h` points at (nothing if
// nb_snapshots is 0) from `file`, `file_length` bytes long. EINVAL, with the
// file named, for a table that is bad or runs past the end of the file.
Task<Result<std::vector<Snapshot>>> read_snapshot_table(BlockDevice& file, const Header& h, uint64_t file_length);

}  // namespace uqcow::qcow2
