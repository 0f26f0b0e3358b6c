// The guest operations of the simulation and their random generation.
//
// Ops are drawn to OVERLAP: most offsets fall near a few hot spots of the
// seed (cluster and L2-slice boundaries, the end of the disk), and sizes run
// from 1 byte to several clusters, unaligned or aligned, so that requests in
// flight together keep meeting the same clusters, subclusters and slices.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/result.h"
#include "tests/sim/layouts.h"
#include "tests/sim/oracle.h"

namespace uqcow::sim {

enum class OpKind {
  kRead,
  kWrite,
  kWriteZeroes,
  kDiscard,
  kCompressed,
  kFlush,
  kSnapshotCreate,
  kSnapshotApply,
  kSnapshotDelete,
  kResize,
};

struct Op {
  uint64_t id = 0;  // unique within a seed; the data pattern's key
  OpKind kind = OpKind::kRead;
  uint64_t offset = 0, length = 0;
  bool may_unmap = false;  // write_zeroes; false is NBD's NO_HOLE
  bool runs = false;       // compressible data (data_byte's runs)
  std::string snapshot;    // snapshot ops: the name
  uint64_t new_size = 0;   // resize (smaller than the size: a shrink)
  std::vector<std::byte> buf;  // the data written, or the bytes read
  uint64_t issue = 0, complete = kNever;
  Status status;
  // Refused with no effect: a compressed write to an allocated cluster, or a
  // request admitted after a resize that its range no longer fits.
  bool no_op = false;
  bool refused_past_end = false;  // no_op: refused whole past a shrunk end (never started)
  bool resize_in_flight = false;  // a resize was in flight when this op was issued
  uint64_t resizes_before = 0;    // resizes issued before this op

  bool writes_data() const { return kind == OpKind::kWrite || kind == OpKind::kCompressed; }
  // "#12 write 4096+512 [t3..t9] ok", for traces.
  std::string describe() const;
};

// What the generator may do at this point of the batch.
struct WorkloadState {
  uint64_t size = 0;                         // disk size ops must stay within
  std::map<std::string, uint64_t> snapshots; // existing snapshots -> disk size
  std::set<std::string> snapshot_names_used; // touched by an op of this batch
  bool resize_in_batch = false;
  bool apply_in_batch = false;
  bool bitmaps = false;                      // a dirty bitmap exists: no snapshot_apply (refused, as QEMU)
  uint64_t max_size = 0;                     // resize never grows past this
  uint64_t min_size = 0;                     // nor shrinks below this
};

class Workload {
 public:
  Workload(const Layout& layout, std::mt19937_64& rng);

  // A new op (id `id`) valid in `state`, which it updates (names, resize).
  Op next(uint64_t id, WorkloadState& state);

 private:
  uint64_t below(uint64_t n) { return n == 0 ? 0 : std::uniform_int_distribution<uint64_t>(0, n - 1)(rng_); }
  uint64_t pick_length();
  uint64_t pick_offset(uint64_t length, uint64_t size);
  uint64_t pick_smaller_size(const WorkloadState& st);
  void fill(Op& op);

  const Layout& layout_;
  std::mt19937_64& rng_;
  std::vector<uint64_t> hot_;  // hot spots of this seed (guest offsets)
  unsigned next_snapshot_ = 1;
};

}  // namespace uqcow::sim
