// Image checking and repair, QEMU's qcow2_check_refcounts().
//
// The checker reads the raw on-disk structures itself through a BlockDevice
// (never through an open Qcow2Image and its caches): it computes the refcount
// every cluster should have from everything that references it, compares that
// with the refcounts the image records, and checks the L1/L2 entries on the
// way. With a repair mode it then fixes what it may, and checks again.
//
// Semantics, messages and counts follow QEMU 7.2 so that `uqcow check` and
// `qemu-img check` agree on every image. Where this checker repairs more than
// QEMU does, the comment at the repair says so.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/result.h"
#include "engine/task.h"
#include "qcow2/header.h"
#include "qcow2/header_io.h"
#include "uring/block_device.h"

namespace uqcow::qcow2 {

// What `qemu-img check` reports (QEMU's BdrvCheckResult and BlockFragInfo).
struct CheckResult {
  uint64_t corruptions = 0;        // refcount lower than the references, bad entries
  uint64_t leaks = 0;              // refcount higher than the references
  uint64_t check_errors = 0;       // parts that could not be checked (I/O errors...)
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  uint64_t image_end_offset = 0;   // end of the highest used cluster
  uint64_t total_clusters = 0;     // guest clusters (virtual size)
  uint64_t allocated_clusters = 0; // guest clusters with a host cluster (active L1)
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  // One line per finding, in the order found, worded like QEMU's
  // ("ERROR cluster 5 refcount=0 reference=1", "Leaked cluster ...",
  // "Repairing ..."). A repair run holds the lines of both passes, up to
  // kMaxCheckMessages; the lines past that are only counted.
  std::vector<std::string> messages;
  uint64_t messages_dropped = 0;
  // Not ok when the check stopped before the end (QEMU's ret < 0): the counts
  // are then partial and qemu-img prints no summary, only "Check failed".
  Status stopped;
  // True when a repair changed something and the counts above come from the
  // check that ran after it ("Double checking the fixed image now...").
  bool rechecked = false;
};

// The most finding lines a CheckResult keeps (the counts stay exact).
inline constexpr size_t kMaxCheckMessages = 100000;

// kLeaks: lower refcounts that are too high. kAll: also raise refcounts that
// are too low, fix OFLAG_COPIED flags and bad L2 entries, and rebuild the
// refcount structure when it is itself broken (QEMU's -r leaks / -r all).
enum class RepairMode { kNone, kLeaks, kAll };

// Checks the qcow2 image in `file`; with a repair mode other than kNone the
// file must be writable and is repaired in place (every write is followed by
// co_flush before the check returns). `data_file` is the image's external
// data file, if it has one: references past its end are reported (nullptr
// skips that check).
//
// Returns an Error only when the image cannot be checked at all (no valid
// qcow2 header, I/O error on it); problems found inside the image are counts
// in the CheckResult, and a check that stopped early has `stopped` set. After
// a successful repair (no check errors and no corruptions left) the dirty and
// corrupt bits are cleared, as qemu-img does.
//
// `remove_inconsistent_bitmaps` (uqcow check -r all): persistent bitmaps a
// crash left in use are dropped before the refcount pass, which then frees
// their clusters as leaks. The repair of a dirty lazy-refcounts image at open
// leaves them: the image being opened has already loaded its bitmaps.
Task<Result<CheckResult>> check_image(BlockDevice& file, BlockDevice* data_file, RepairMode mode,
                                      bool remove_inconsistent_bitmaps = false);

}  // namespace uqcow::qcow2
