// The driver: runs one seed of the simulation over one layout.
//
// A seed opens the layout's image (over a SimDevice, with its backing file
// over another SimDevice on the same scheduler) and runs batches of
// overlapping guest ops, many in flight at once. Inside a batch the driver
// interleaves, by the seed's RNG, "issue a new op" and "let the scheduler
// complete one device request", so the order of everything is a function of
// the seed. After each batch every reply is checked by the oracle, the
// whole disk is read back, snapshots are read back, and the metadata is
// checked. Crash seeds also take a post-crash image in the middle of one
// batch and check it after a read-write reopen. The seed ends with close,
// a strict check, a reopen, and qemu-img's check and convert.
#pragma once

#include <cstdint>
#include <string>

#include "tests/sim/layouts.h"
#include "tests/sim/sim_device.h"

namespace uqcow::sim {

struct SeedOptions {
  bool slow = false;         // qemu-img check of a copy after every batch
  bool crash = false;        // take a crash image in one batch
  uint64_t batches = 5;
  uint64_t max_depth = 32;   // most ops in flight (1: sequential, which
                             // tells a concurrency bug from another)
};

struct SeedReport {
  bool failed = false;
  std::string failure;   // what failed, the replay line and the batch trace
  uint64_t ops = 0;
  uint64_t batches = 0;
  uint64_t completions = 0;  // device requests completed
  uint64_t decisions = 0;    // completions picked among >= 2 eligible requests
  bool crashed = false;
  bool bitmap = false;       // a dirty bitmap tracked the seed's ops (checked per batch)
  uint64_t crash_bitmaps_consistent = 0;  // crash images whose bitmap was stored clean
  CrashStats crash_stats;
  bool crash_copied_window = false;  // OFLAG_COPIED errors of a snapshot op, repaired
  uint64_t order_hash = 0;   // the scheduler's completion order (determinism)
};

SeedReport run_seed(const Layout& layout, const LayoutImages& images, uint64_t seed, const SeedOptions& options);

// The command that replays one seed of one layout.
std::string replay_command(const Layout& layout, uint64_t seed);

}  // namespace uqcow::sim
